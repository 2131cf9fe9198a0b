"""Traffic shaping on the real server and the bundled models, through the `openai` client: a canary split
that keeps each API key on its variant, a shadow whose answer is recorded but never sent, feedback, and
`appliance eval compare` (the real CLI on the server's data directory) reporting all of it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.modelstore.catalog import catalog_manifests
from appliance.modelstore.store import ModelStore
from appliance.services.routing import split_point
from appliance.storage.sqlite import connect
from tests.e2e.conftest import REPO, Server, fresh_data_dir, start_server, stop_server

ROUTES = """
[routing.canary]
split = [{model = "smollm2-135m", weight = 50, name = "stable"}, {model = "gemma3-270m", weight = 50, name = "canary"}]
sticky = "key"

[routing.shadowed]
candidates = ["smollm2-135m"]
shadow = {model = "gemma3-270m", share = 1.0}
"""
ASK = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    models = REPO / ".appliance-data" / "routing"
    store = ModelStore(models / "models")
    for template in catalog_manifests():
        if template.id in ("smollm2-135m", "gemma3-270m"):
            store.install(template)
    base = tmp_path_factory.mktemp("traffic")
    data = fresh_data_dir(models, base / "data")
    config = base / "appliance.toml"
    config.write_text(ROUTES)
    srv = start_server(data, base / "server.log", env={"APPLIANCE_CONFIG": str(config)})
    yield srv, data
    stop_server(srv)
    assert "Traceback" not in srv.log.read_text(), "the server logged an unexpected traceback"


def _client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def _keys(server: Server) -> tuple[str, dict[str, str]]:
    """An admin key, and user keys of tenant 'acme' until one falls in each half of the canary split
    (by the documented hash of the route and the key id): {expected variant: key}."""
    admin_api = httpx.Client(base_url=f"{server.url}/v1/admin", timeout=30)
    assert admin_api.post("/tenants", json={"name": "ops"}).status_code == 201
    admin = admin_api.post("/keys", json={"tenant": "ops", "role": "admin"}).json()["key"]
    admin_api.headers["Authorization"] = f"Bearer {admin}"
    assert admin_api.post("/tenants", json={"name": "acme"}).status_code == 201
    keys: dict[str, str] = {}
    for _ in range(64):
        created = admin_api.post("/keys", json={"tenant": "acme"}).json()
        keys.setdefault("stable" if split_point("canary", created["id"]) < 0.5 else "canary", created["key"])
        if len(keys) == 2:
            return admin, keys
    raise AssertionError("64 keys all fell in one half of the split")


def _shadow_row(data: Path, request_id: str) -> Any:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        row = connect(data / "gateway.db").execute("SELECT * FROM shadow WHERE request_id = ?", (request_id,)).fetchone()
        if row is not None:
            return row
        time.sleep(0.2)
    raise AssertionError("the shadow answer was never recorded")


def test_canary_shadow_feedback_and_eval_compare(shaped: tuple[Server, Path]) -> None:
    server, data = shaped
    admin, keys = _keys(server)
    served: dict[str, list[str]] = {}
    # Each key stays on its variant: the header and the answering model say the same every time.
    for expected, key in keys.items():
        client = _client(server, key)
        for _ in range(3):
            raw = client.chat.completions.with_raw_response.create(model="canary", messages=ASK, max_tokens=6, temperature=0)
            assert raw.headers["x-route-variant"] == expected
            served.setdefault(expected, []).append(raw.parse().model)
    assert served == {"stable": ["smollm2-135m"] * 3, "canary": ["gemma3-270m"] * 3}

    # The shadow: the client gets SmolLM2's answer; Gemma's answer to the same prompt is recorded beside it.
    client = _client(server, keys["stable"])
    raw = client.chat.completions.with_raw_response.create(model="shadowed", messages=ASK, max_tokens=12, temperature=0)
    answer = raw.parse()
    assert answer.model == "smollm2-135m" and raw.headers["x-route"] == "shadowed>smollm2-135m"
    row = _shadow_row(data, raw.headers["x-request-id"])
    assert (row["outcome"], row["model"], row["served_model"]) == ("ok", "gemma3-270m", "smollm2-135m")
    assert row["served_output"] == answer.choices[0].message.content
    assert row["output"] and row["completion_tokens"] > 0 and row["latency_ms"] > 0

    # Feedback on a canary answer, through the same client; the variant comes back with it.
    canary = _client(server, keys["canary"])
    rated = canary.chat.completions.with_raw_response.create(model="canary", messages=ASK, max_tokens=6, temperature=0)
    verdict = canary.post("/feedback", cast_to=httpx.Response,
                          body={"request_id": rated.headers["x-request-id"], "score": 1, "comment": "good colour"})
    assert verdict.status_code == 200 and verdict.json()["variant"] == "canary"
    with pytest.raises(openai.NotFoundError):  # another tenant's answer
        _client(server, admin).post("/feedback", cast_to=httpx.Response,
                                    body={"request_id": rated.headers["x-request-id"], "score": -1})
    with pytest.raises(openai.BadRequestError):
        canary.post("/feedback", cast_to=httpx.Response, body={"request_id": rated.headers["x-request-id"], "score": 3})

    # The real CLI, on the data directory the server is writing.
    cli = [sys.executable, "-m", "appliance", "eval", "compare", "--data-dir", str(data)]
    report = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, check=True).stdout)
    rows = {(r["route"], r["variant"]): r for r in report}
    assert rows[("canary", "stable")]["requests"] == 3 and rows[("canary", "stable")]["models"] == {"smollm2-135m": 3}
    assert rows[("canary", "canary")]["requests"] == 4 and rows[("canary", "canary")]["models"] == {"gemma3-270m": 4}
    assert (rows[("canary", "canary")]["feedback"], rows[("canary", "canary")]["feedback_mean"]) == (1, 1.0)
    assert rows[("canary", "stable")]["latency_p50_ms"] > 0 and rows[("canary", "stable")]["completion_tokens"] > 0
    assert rows[("shadowed", "smollm2-135m")]["requests"] == 1
    shadow = rows[("shadowed", "shadow:gemma3-270m")]
    assert shadow["shadow"] and shadow["requests"] == 1 and shadow["completion_tokens"] == row["completion_tokens"]
    table = subprocess.run([*cli, "--route", "canary"], capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["ROUTE", "VARIANT", "REQS"] and "shadowed" not in table
    print(subprocess.run(cli, capture_output=True, text=True, check=True).stdout)  # for the README
    verify = subprocess.run([sys.executable, "-m", "appliance", "usage", "verify", "--data-dir", str(data)],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout.startswith("ok:")
