"""Schemathesis against the real server's own /openapi.json: no request it generates, valid or not,
may get a 5xx, and every answer must match the described status, media type and schema.

Every operation gets a few positive and a few negative examples (no coverage phase, no shrinking),
which keeps the module under three minutes on two cores. Before a request goes out it is steered
(see `_steer`): most generated model names become a served model so requests reach the engines, and
every generation is capped at four tokens and two sequences. The documents routes work on one
collection made for the run; everything else is as generated.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from tests.e2e.conftest import Server, fresh_data_dir, start_server, stop_server

pytestmark = pytest.mark.e2e
EXAMPLES = 12
COLLECTION = "fuzz"
CHAT_MODEL, EMBEDDING_MODEL = "gemma3-270m", "all-minilm-l6-v2"
MODEL_OF = {
    "/v1/chat/completions": CHAT_MODEL, "/v1/completions": CHAT_MODEL, "/v1/responses": CHAT_MODEL,
    "/v1/collections/{name}/ask": CHAT_MODEL,
    "/api/generate": CHAT_MODEL, "/api/chat": CHAT_MODEL, "/api/show": CHAT_MODEL,
    "/v1/embeddings": EMBEDDING_MODEL, "/api/embed": EMBEDDING_MODEL, "/api/embeddings": EMBEDDING_MODEL,
}
TOKEN_LIMITS = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"), "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",), "/v1/collections/{name}/ask": ("max_tokens",),
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _cli(data: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "--data-dir", str(data), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def fuzz_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    base = tmp_path_factory.mktemp("fuzz")
    data = fresh_data_dir(data_dir, base / "data")
    _cli(data, "tenants", "create", "fuzz-ops")
    # No per-key rate limit: the run sends far more than the default 600 requests a minute.
    key = _cli(data, "keys", "create", "--tenant", "fuzz-ops", "--role", "admin", "--rpm", "0", "--tpm", "0")
    srv = start_server(data, base / "server.log")
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{srv.url}/v1/collections", json={"name": COLLECTION}, headers=auth).status_code == 201
    doc = {"text": "The library opens at nine on weekdays. It closes at five.", "id": "hours"}
    assert httpx.post(f"{srv.url}/v1/collections/{COLLECTION}/documents", json=doc, headers=auth, timeout=60).status_code == 200
    yield srv, key
    stop_server(srv)
    assert "Traceback" not in srv.log.read_text(), "the server logged an unexpected traceback"


@pytest.fixture(scope="module")
def api(fuzz_server: tuple[Server, str]) -> Any:
    server, _ = fuzz_server
    config = schemathesis.Config.from_dict({"phases": {"coverage": {"enabled": False}}})
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


def _steer(case: Any) -> None:
    """Reach the engines cheaply: most generated model names become a served model (an unknown one is a
    404 before any real work), and every generation is capped at a few tokens and two sequences."""
    body = case.body
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if case.path in MODEL_OF and isinstance(model, str) and len(model) != 1:  # one-letter names stay: 404s
        body["model"] = MODEL_OF[case.path]
    if case.path in TOKEN_LIMITS:
        for field in TOKEN_LIMITS[case.path]:
            if not _small_int(body.get(field), 4):
                body[field] = 4
        if "n" in body and not _small_int(body["n"], 2):
            body["n"] = 2
    if case.path in ("/api/generate", "/api/chat"):
        options = body.get("options")
        if not isinstance(options, dict):
            options = body["options"] = {}
        if not _small_int(options.get("num_predict"), 4) or options["num_predict"] < 0:
            options["num_predict"] = 4


def _small_int(value: object, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value <= most


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_answers_match_the_description(
    api: Any, fuzz_server: tuple[Server, str], mode: GenerationMode
) -> None:
    server, key = fuzz_server
    auth = {"Authorization": f"Bearer {key}"}
    failures: list[str] = []
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 25
    for operation in operations:
        fixed = {"name": COLLECTION} if operation.path.startswith("/v1/collections/{name}/") else None

        # No shrinking: against a live server it costs many requests; the first failing request is reported.
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(mode, path_parameters=fixed))
        def run(case: Any) -> None:
            _steer(case)
            case.call_and_validate(base_url=server.url, headers=auth, checks=CHECKS, timeout=60)

        try:
            run()
        except Unsatisfiable:  # negative mode, and the operation takes nothing that could be wrong
            assert mode is GenerationMode.NEGATIVE, operation.label
        except (Exception, FailureGroup) as exc:  # a check failed: go on, report every operation at the end
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
