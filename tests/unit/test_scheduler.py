"""The continuous-batching loop against a fake llama context that records every decode."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest

from appliance.engines.scheduler import BatchScheduler
from appliance.errors import ApplianceError, ContextLengthExceeded, QueueTimeout, RequestTimeout, ServerOverloaded
from appliance.types import PRIORITY_BATCH, Chunk, GenerationRequest, SamplingParams, TokenAlternative, TokenLogprob

EOG = 0


class ScriptSampler:
    def __init__(self, reply: str) -> None:
        self.reply = [ord(c) for c in reply] + [EOG]
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeBatchContext:
    """Tokens are characters; every sequence 'generates' the reply given by its prompt's first word."""

    n_batch = 16
    n_ctx_per_seq = 64

    def __init__(self, n_seq_max: int = 2, step_delay: float = 0.0) -> None:
        self.n_seq_max = n_seq_max
        self.step_delay = step_delay
        self.decodes: list[list[tuple[int, int, int, bool]]] = []
        self.removed: list[tuple[int, int, int]] = []
        self.samplers: list[ScriptSampler] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False

    def tokenize(self, text: str) -> list[int]:
        return [1] + [ord(c) for c in text]

    def piece(self, token: int) -> bytes:
        return chr(token).encode()

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def compile_schema(self, schema: str) -> str:
        return "root ::= any"

    def compile_tools(self, tools: object) -> str:
        return "root ::= tools"

    def sampler(self, params: SamplingParams, seed: int, grammar: str | None) -> ScriptSampler:
        s = ScriptSampler(self._reply_for)
        self.samplers.append(s)
        return s

    def sample(self, sampler: ScriptSampler, batch_index: int) -> int:
        return sampler.reply.pop(0) if sampler.reply else EOG

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("native failure")
        time.sleep(self.step_delay)
        self.decodes.append(list(entries))

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        self.removed.append((seq, p0, p1))
        return True

    copies: list[tuple[int, int]] = []

    def seq_cp(self, src: int, dst: int) -> None:
        self.copies = [*self.copies, (src, dst)]

    def logprob(self, batch_index: int, token: int, top: int) -> TokenLogprob:
        return TokenLogprob(chr(token).encode(), -0.25, tuple(TokenAlternative(b"?", -2.0) for _ in range(top)))

    def close(self) -> None:
        pass

    _reply_for = "hello"


class Collector:
    def __init__(self) -> None:
        self.items: queue.Queue[Chunk | ApplianceError] = queue.Queue()

    def __call__(self, item: Chunk | ApplianceError) -> None:
        self.items.put(item)

    def result(self, timeout: float = 5) -> tuple[str, Chunk | ApplianceError]:
        text = []
        while True:
            item = self.items.get(timeout=timeout)
            if isinstance(item, ApplianceError):
                return "".join(text), item
            text.append(item.text)
            if item.finish_reason is not None:
                return "".join(text), item


def make(ctx: FakeBatchContext, **kw: Any) -> BatchScheduler:
    args = dict(model_id="fake", max_queue=8, prefix_min_tokens=4, queue_timeout_s=30, request_timeout_s=30)
    args.update(kw)
    return BatchScheduler(ctx, **args)  # type: ignore[arg-type]


def request(prompt: str, **kw: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=kw.pop("max_tokens", None), **kw)


@pytest.fixture
def ctx() -> FakeBatchContext:
    return FakeBatchContext()


def test_generates_until_eog_with_exact_usage(ctx: FakeBatchContext) -> None:
    sched = make(ctx)
    out = Collector()
    sched.submit(request("hi"), out, threading.Event())
    text, last = out.result()
    assert text == "hello"
    assert isinstance(last, Chunk) and last.finish_reason == "stop"
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 5)
    # Prompt in one decode, then one token per step; positions are contiguous.
    assert [e[1] for e in ctx.decodes[0]] == [0, 1, 2]
    assert [d[0][1] for d in ctx.decodes[1:]] == [3, 4, 5, 6, 7]
    assert ctx.samplers[0].closed
    sched.close()


def test_max_tokens_and_stop_strings(ctx: FakeBatchContext) -> None:
    sched = make(ctx)
    out = Collector()
    sched.submit(request("hi", max_tokens=3), out, threading.Event())
    text, last = out.result()
    assert (text, last.finish_reason) == ("hel", "length")  # type: ignore[union-attr]
    out = Collector()
    sched.submit(request("hi", stop=("ll",)), out, threading.Event())
    text, last = out.result()
    assert (text, last.finish_reason) == ("he", "stop")  # type: ignore[union-attr]
    assert last.usage.completion_tokens == 4  # type: ignore[union-attr]
    sched.close()


def test_sequences_share_one_batch(ctx: FakeBatchContext) -> None:
    ctx.gate.clear()
    sched = make(ctx)
    outs = [Collector(), Collector()]
    sched.submit(request("ab"), outs[0], threading.Event())
    sched.submit(request("cd"), outs[1], threading.Event())
    ctx.gate.set()
    assert [o.result()[0] for o in outs] == ["hello", "hello"]
    mixed = [d for d in ctx.decodes if len({e[2] for e in d}) == 2]
    assert mixed, "the two sequences never shared a decode"
    sched.close()


def test_prefix_of_a_finished_sequence_is_reused(ctx: FakeBatchContext) -> None:
    sched = make(ctx)
    out = Collector()
    sched.submit(request("shared system prompt: one"), out, threading.Event())
    out.result()
    ctx.decodes.clear()
    out = Collector()
    sched.submit(request("shared system prompt: two"), out, threading.Event())
    assert out.result()[0] == "hello"
    first = ctx.decodes[0]
    # Only the differing suffix was computed, starting right after the common prefix.
    assert [chr(e[0]) for e in first] == list("two")
    assert first[0][1] == len("shared system prompt: ") + 1
    snap = sched.engine_stats()
    assert snap.prefix_cache_hit_rate > 0.4 and snap.prefix_hit_tokens > 0
    sched.close()


def test_short_prefix_hits_are_not_reused(ctx: FakeBatchContext) -> None:
    sched = make(ctx, prefix_min_tokens=100)
    for prompt in ("same prompt", "same prompt"):
        out = Collector()
        sched.submit(request(prompt), out, threading.Event())
        out.result()
    assert sched.stats.prefix_hit_tokens == 0
    sched.close()


def test_cancel_frees_the_slot_within_a_step() -> None:
    ctx = FakeBatchContext(n_seq_max=1, step_delay=0.01)
    ctx._reply_for = "x" * 40
    sched = make(ctx)
    cancel = threading.Event()
    first = Collector()
    sched.submit(request("a"), first, cancel)
    first.items.get(timeout=5)  # it is generating
    second = Collector()
    sched.submit(request("b", max_tokens=2), second, threading.Event())
    cancel.set()
    text, last = second.result()
    assert text == "xx"
    assert sched.stats.cancelled == 1
    sched.close()


def test_queue_full_is_refused_with_retry_after() -> None:
    ctx = FakeBatchContext(n_seq_max=1)
    ctx.gate.clear()
    sched = make(ctx, max_queue=1)
    sched.submit(request("a"), Collector(), threading.Event())
    time.sleep(0.1)  # admitted into the only slot, blocked in decode
    sched.submit(request("b"), Collector(), threading.Event())
    with pytest.raises(ServerOverloaded) as info:
        sched.submit(request("c"), Collector(), threading.Event())
    assert info.value.status == 503 and info.value.retry_after
    assert sched.stats.rejected == {"queue_full": 1}
    ctx.gate.set()
    sched.close()


def test_interactive_requests_overtake_batch_requests() -> None:
    ctx = FakeBatchContext(n_seq_max=1)
    ctx.gate.clear()
    sched = make(ctx)
    order: list[str] = []
    done = threading.Event()

    def track(name: str) -> Any:
        def emit(item: Any) -> None:
            if isinstance(item, Chunk) and item.finish_reason:
                order.append(name)
                if len(order) == 4:
                    done.set()

        return emit

    sched.submit(request("running"), track("running"), threading.Event())
    time.sleep(0.1)
    sched.submit(request("b1", priority=PRIORITY_BATCH), track("batch1"), threading.Event())
    sched.submit(request("b2", priority=PRIORITY_BATCH), track("batch2"), threading.Event())
    sched.submit(request("i1"), track("interactive"), threading.Event())
    ctx.gate.set()
    assert done.wait(5)
    assert order == ["running", "interactive", "batch1", "batch2"]
    sched.close()


def test_prompt_that_cannot_fit_is_refused_before_a_slot(ctx: FakeBatchContext) -> None:
    sched = make(ctx)
    with pytest.raises(ContextLengthExceeded):
        sched.submit(request("x" * 80), Collector(), threading.Event())
    assert sched.stats.requests == 0 and ctx.decodes == []
    sched.close()


def test_generation_stops_at_the_context_end(ctx: FakeBatchContext) -> None:
    ctx._reply_for = "y" * 100
    sched = make(ctx)
    out = Collector()
    sched.submit(request("p" * 60), out, threading.Event())
    text, last = out.result()
    assert last.finish_reason == "length"  # type: ignore[union-attr]
    assert len(text) == 64 - 61
    sched.close()


def test_timeouts() -> None:
    ctx = FakeBatchContext(n_seq_max=1, step_delay=0.02)
    ctx._reply_for = "z" * 200
    sched = make(ctx, queue_timeout_s=0.2, request_timeout_s=0.5)
    long, waiting = Collector(), Collector()
    sched.submit(request("a"), long, threading.Event())
    sched.submit(request("b"), waiting, threading.Event())
    _, err = waiting.result()
    assert isinstance(err, QueueTimeout)
    _, err = long.result()
    assert isinstance(err, RequestTimeout)
    sched.close()


def test_native_failure_fails_running_requests_and_loop_survives(ctx: FakeBatchContext) -> None:
    sched = make(ctx)
    ctx.fail_next = True
    out = Collector()
    sched.submit(request("a"), out, threading.Event())
    _, err = out.result()
    assert isinstance(err, ApplianceError) and err.status == 500
    out = Collector()
    sched.submit(request("a"), out, threading.Event())
    assert out.result()[0] == "hello"
    sched.close()


def test_a_cached_prefix_is_not_evicted_by_an_unrelated_prompt() -> None:
    ctx = FakeBatchContext(n_seq_max=3)
    sched = make(ctx)
    for prompt in ("shared manual text A", "unrelated one", "different two", "shared manual text B"):
        out = Collector()
        sched.submit(request(prompt), out, threading.Event())
        out.result()
    # The last prompt found "shared manual text " still cached although two others ran in between.
    assert sched.stats.prefix_hit_tokens == len("shared manual text ") + 1
    sched.close()


def test_n_sequences_share_one_prefill() -> None:
    sched = make(FakeBatchContext(n_seq_max=3))
    inner = sched.ctx  # type: ignore[attr-defined]
    items: queue.Queue[Chunk | ApplianceError] = queue.Queue()
    sched.submit(request("hi", n=3, logprobs=2), items.put, threading.Event())
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    entries = 0
    while True:
        item = items.get(timeout=5)
        assert isinstance(item, Chunk)
        texts[item.index] = texts.get(item.index, "") + item.text
        entries += len(item.logprobs)
        assert all(len(e.top) == 2 for e in item.logprobs)
        if item.finish_reason is not None:
            finishes[item.index] = item.finish_reason
        if item.usage is not None:
            break
    assert texts == {0: "hello", 1: "hello", 2: "hello"} and set(finishes.values()) == {"stop"}
    # the prompt was decoded once, then copied to the two other sequences
    prompt_decodes = [e for d in inner.decodes for e in d if e[1] < 3]
    assert len(prompt_decodes) == 3 and len(inner.copies) == 2 and {src for src, _ in inner.copies} == {0}
    # one usage for the whole request: the prompt once, the completions summed
    assert (item.usage.prompt_tokens, item.usage.completion_tokens) == (3, 15)
    assert entries == 15
    sched.close()


def test_n_above_the_free_slots_queues_the_rest(ctx: FakeBatchContext) -> None:
    sched = make(ctx)  # two slots
    items: queue.Queue[Chunk | ApplianceError] = queue.Queue()
    sched.submit(request("hi", n=3), items.put, threading.Event())
    done = set()
    while True:
        item = items.get(timeout=5)
        assert isinstance(item, Chunk)
        if item.finish_reason is not None:
            done.add(item.index)
        if item.usage is not None:
            break
    assert done == {0, 1, 2} and item.usage.completion_tokens == 15
    sched.close()


SYSTEM = "You are a careful assistant of the port. "  # 41 characters: several prefill steps at n_batch 16


def _prefilled_tokens(ctx: FakeBatchContext, slot: int) -> int:
    """Prompt tokens decoded for a slot (entries that asked for no logits, plus each prompt's last)."""
    return sum(1 for d in ctx.decodes for e in d if e[2] == slot and not e[3])


def test_concurrent_prompts_compute_their_shared_prefix_once() -> None:
    ctx = FakeBatchContext(n_seq_max=2)
    ctx.n_ctx_per_seq = 128
    sched = make(ctx)
    outs = [Collector(), Collector()]
    for i, out in enumerate(outs):
        sched.submit(request(SYSTEM + f"question {i}?"), out, threading.Event())
    assert [o.result()[0] for o in outs] == ["hello", "hello"]
    sched.close()
    # One slot computed the shared 42 tokens (BOS + SYSTEM); the other waited, got a copy and computed the rest.
    assert ctx.copies and ctx.copies[-1] in ((0, 1), (1, 0))
    follower = ctx.copies[-1][1]
    assert _prefilled_tokens(ctx, follower) < 15
    assert sched.engine_stats().prefix_hit_tokens >= len(SYSTEM)


def test_a_busy_slot_lends_its_cached_prefix() -> None:
    ctx = FakeBatchContext(n_seq_max=2, step_delay=0.01)
    ctx.n_ctx_per_seq = 128
    ctx._reply_for = "a long reply that keeps the first slot busy for a while"
    sched = make(ctx)
    first, second = Collector(), Collector()
    sched.submit(request(SYSTEM + "first?"), first, threading.Event())
    deadline = time.monotonic() + 5
    while sched.engine_stats().generated_tokens < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    sched.submit(request(SYSTEM + "second?"), second, threading.Event())
    assert second.result()[0] == ctx._reply_for and first.result()[0] == ctx._reply_for
    sched.close()
    assert (0, 1) in ctx.copies
    assert _prefilled_tokens(ctx, 1) < 10
    # The copy was trimmed to the shared prefix.
    assert (1, len(SYSTEM) + 1, -1) in ctx.removed


def test_no_queue_still_serves_free_slots() -> None:
    """max_queue = 0: nothing waits, but a request that finds a free slot is served."""
    ctx = FakeBatchContext(n_seq_max=1)
    ctx.gate.clear()
    sched = make(ctx, max_queue=0)
    first = Collector()
    sched.submit(request("a"), first, threading.Event())
    time.sleep(0.1)  # admitted into the only slot, blocked in decode
    with pytest.raises(ServerOverloaded):
        sched.submit(request("b"), Collector(), threading.Event())
    ctx.gate.set()
    assert first.result()[0] == "hello"
    sched.close()
