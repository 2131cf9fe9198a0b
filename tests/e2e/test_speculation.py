"""Draftless speculative decoding on the real Gemma 3 270M: greedy output is the same with and without
it, a copying answer takes fewer decode steps, and the server counts what it guessed and kept."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from appliance.engines.factory import BatchSpec, build_batch_engine
from tests.e2e.conftest import fresh_data_dir, start_server, stop_server
from tests.e2e.test_prefix_sharing import greedy_text, submit_greedy

SOURCE = (
    "The harbour master opens the north lock at six in the morning and closes it at nine in the evening. "
    "Ships longer than ninety metres must book a pilot two days ahead through the port office."
)
COPY = f"Sources: [1] {SOURCE}\nQuestion: When is the north lock open, and what must long ships do?\nAnswer: {SOURCE[:40]}"
OPEN = "Once upon a time, in a village by the sea, there lived"


def _generate(engine, prompt: str, max_tokens: int = 48) -> str:
    return greedy_text(submit_greedy(engine, prompt, max_tokens, speculate=True))


@pytest.fixture(scope="module")
def engines(data_dir: Path):
    path = next((data_dir / "models" / "gemma3-270m").glob("*.gguf"))
    spec = dict(model_id="gemma3-270m", model_path=path, n_ctx_per_seq=1024, n_seq_max=2, n_batch=256, n_threads=2,
                gpu_layers=0, max_queue=4, prefix_min_tokens=0, queue_timeout_s=60, request_timeout_s=300)
    plain = build_batch_engine(BatchSpec(**spec))
    fast = build_batch_engine(BatchSpec(**spec, spec_draft=8))
    yield plain, fast
    plain.close()
    fast.close()


def test_greedy_output_is_unchanged_and_a_copy_is_guessed(engines) -> None:
    plain, fast = engines
    for prompt in (COPY, OPEN):
        assert _generate(fast, prompt) == _generate(plain, prompt)
    stats = fast.engine_stats()
    assert stats.accepted_tokens >= 10, stats
    assert stats.drafted_tokens >= stats.accepted_tokens
    assert plain.engine_stats().drafted_tokens == 0


@pytest.fixture(scope="module")
def speculating(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("speculating")
    # The defaults: guesses of up to 8 tokens, for grounded answers and for requests that ask.
    srv = start_server(fresh_data_dir(data_dir, base / "data"), base / "server.log")
    yield srv
    stop_server(srv)


def test_the_server_counts_guessed_and_kept_tokens(speculating) -> None:
    server = speculating
    # A list that repeats: the second pass is guessed from the first.
    days = "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. "
    body = {"model": "gemma3-270m", "prompt": days * 3 + "Monday,", "max_tokens": 32, "temperature": 0}

    def kept() -> float:
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        accepted = [line for line in metrics.splitlines()
                    if line.startswith('appliance_speculative_tokens_total{model="gemma3-270m",outcome="accepted"}')]
        return float(accepted[0].rsplit(" ", 1)[1]) if accepted else 0.0

    headers = {"Cache-Control": "no-store"}
    # A plain completion does not speculate by default (models.speculation = "grounded")...
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert kept() == 0
    # ... unless it asks; and asking off keeps it off.
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "speculation": True}, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    after = kept()
    assert after > 0
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "speculation": False}, headers=headers, timeout=120)
    assert r.status_code == 200 and kept() == after
