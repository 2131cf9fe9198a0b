"""A prompt prefix shared across slots on the real Gemma 3 270M: computed once, copied into the other
slot (busy or not), and the answers are the same as computed cold."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from appliance.engines.factory import BatchSpec, build_batch_engine
from appliance.types import AdapterRef, Chunk, GenerationRequest, SamplingParams

MANUAL = " ".join(
    f"Rule {i}: the north lock opens at {6 + i % 3} in the morning and vessels over {80 + i} metres need a pilot."
    for i in range(24)
)


def submit_greedy(
    engine, prompt: str, max_tokens: int = 24, adapter: AdapterRef | None = None, speculate: bool = False
) -> queue.Queue:
    """A greedy generation on a batch engine; its chunks arrive on the returned queue (see greedy_text)."""
    items: queue.Queue = queue.Queue()
    request = GenerationRequest(
        prompt=prompt, max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0), adapter=adapter,
        speculate=speculate,
    )
    engine.submit(request, items.put, threading.Event())
    return items


def greedy_text(items: queue.Queue) -> str:
    text = []
    while True:
        item = items.get(timeout=300)
        assert isinstance(item, Chunk), item
        text.append(item.text)
        if item.finish_reason is not None:
            return "".join(text)


@pytest.fixture(scope="module")
def spec(data_dir: Path) -> dict:
    path = next((data_dir / "models" / "gemma3-270m").glob("*.gguf"))
    # Flash attention off: its CPU kernel's results depend on which sequences share a batch, and this test
    # checks the copies' answers against cold runs token for token (see README, Numerics).
    return dict(model_id="gemma3-270m", model_path=path, n_ctx_per_seq=1024, n_seq_max=2, n_batch=128, n_threads=2,
                gpu_layers=0, max_queue=4, queue_timeout_s=120, request_timeout_s=600, flash_attn="off")


def test_a_prefix_computed_once_gives_the_cold_answers(spec: dict) -> None:
    prompts = [f"{MANUAL}\nQuestion: when does the north lock open?\nAnswer:",
               f"{MANUAL}\nQuestion: which vessels need a pilot?\nAnswer:"]
    cold = build_batch_engine(BatchSpec(**spec, prefix_min_tokens=0))
    try:
        expected = [greedy_text(submit_greedy(cold, p)) for p in prompts]
    finally:
        cold.close()
    shared = build_batch_engine(BatchSpec(**spec, prefix_min_tokens=32))
    try:
        # Both at once: one computes the manual, the other waits and gets a copy.
        together = [submit_greedy(shared, p) for p in prompts]
        assert [greedy_text(q) for q in together] == expected
        stats = shared.engine_stats()
        manual_tokens = len(shared.tokenize(MANUAL))
        assert stats.prefix_hit_tokens >= 0.95 * manual_tokens, stats
        # A busy slot lends its prefix: the second arrives while the first is generating.
        first = submit_greedy(shared, prompts[0].replace("north", "north "), max_tokens=48)
        deadline = time.monotonic() + 120
        while shared.engine_stats().busy_slots == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = shared.engine_stats().prefix_hit_tokens
        assert greedy_text(submit_greedy(shared, prompts[1])) == expected[1]
        greedy_text(first)
        assert shared.engine_stats().prefix_hit_tokens - before >= 0.95 * manual_tokens
    finally:
        shared.close()
