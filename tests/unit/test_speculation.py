"""Draftless speculative decoding: prompt-lookup guesses, and the scheduler's verification of them
against a fake context whose samplers follow a script (so every guess is checked token by token)."""

from __future__ import annotations

import threading

from appliance.engines.speculation import NgramDrafter
from appliance.types import Chunk, GenerationRequest
from tests.unit.test_scheduler import Collector, FakeBatchContext, make
from tests.unit.test_scheduler import request as plain_request


def test_guesses_what_followed_the_last_ngram_before() -> None:
    d = NgramDrafter([5, 6, 7, 8, 9, 1, 5, 6, 7], n=3)
    assert d.draft(3) == [8, 9, 1]
    assert d.draft(10) == [8, 9, 1, 5, 6, 7]  # up to the end of the history
    assert d.draft(0) == []


def test_the_latest_occurrence_wins_and_the_tail_never_matches_itself() -> None:
    d = NgramDrafter([1, 2, 3], n=3)
    assert d.draft(4) == []  # the only [1, 2, 3] is the tail itself
    d.extend([4, 1, 2, 3])
    assert d.draft(2) == [4, 1]
    d.extend([7, 1, 2, 3])
    assert d.draft(2) == [7, 1]


def test_no_guess_without_a_repeated_ngram() -> None:
    assert NgramDrafter([1, 2, 3, 4, 5, 6], n=2).draft(4) == []
    assert NgramDrafter([1], n=3).draft(4) == []


class CopyContext(FakeBatchContext):
    n_batch = 64
    n_ctx_per_seq = 256


def _generating_entries(ctx: FakeBatchContext, slot: int = 0) -> list[list[tuple[int, int, int, bool]]]:
    return [[e for e in d if e[2] == slot] for d in ctx.decodes[1:]]


def request(prompt: str, **kw: object) -> GenerationRequest:
    """A request that asks to speculate (the service decides it from settings and the request)."""
    return plain_request(prompt, speculate=True, **kw)


def test_a_request_that_does_not_ask_never_speculates() -> None:
    ctx = CopyContext()
    ctx._reply_for = "the quick brown fox; the quick brown fox; the quick brown fox."
    sched = make(ctx, spec_draft=8)
    out = Collector()
    sched.submit(plain_request("copy: the quick brown fox"), out, threading.Event())
    assert out.result()[0] == ctx._reply_for
    assert sched.engine_stats().drafted_tokens == 0
    sched.close()


def test_a_copied_answer_takes_fewer_steps_and_is_unchanged() -> None:
    reply = "the quick brown fox; the quick brown fox; the quick brown fox."
    plain, spec = CopyContext(), CopyContext()
    plain._reply_for = spec._reply_for = reply
    texts = []
    for ctx, draft in ((plain, 0), (spec, 8)):
        sched = make(ctx, spec_draft=draft)
        out = Collector()
        sched.submit(request("copy: the quick brown fox"), out, threading.Event())
        text, last = out.result()
        assert isinstance(last, Chunk) and last.finish_reason == "stop"
        assert last.usage is not None and last.usage.completion_tokens == len(reply)
        texts.append(text)
        stats = sched.engine_stats()
        sched.close()
    assert texts == [reply, reply]
    assert len(spec.decodes) < len(plain.decodes) * 0.6
    assert stats.accepted_tokens > len(reply) // 2 and stats.drafted_tokens >= stats.accepted_tokens
    # Guesses ride after the pending token at consecutive positions of the same sequence.
    multi = [d for d in _generating_entries(spec) if len(d) > 1]
    assert multi and all([e[1] for e in d] == list(range(d[0][1], d[0][1] + len(d))) for d in multi)


def test_rejected_guesses_leave_the_cells() -> None:
    ctx = CopyContext()
    # The prompt says "abcX" after "abc"; the reply goes "abcY": the guess X is decoded, then rejected.
    ctx._reply_for = "abcY"
    sched = make(ctx, spec_draft=4)
    out = Collector()
    sched.submit(request("abcXabc"), out, threading.Event())
    text, _ = out.result()
    sched.close()
    assert text == "abcY"
    # Every verification removes the cells past what was accepted.
    assert ctx.removed and all(p1 == -1 for _, _, p1 in ctx.removed)
    assert sched.engine_stats().drafted_tokens > sched.engine_stats().accepted_tokens


def test_guesses_stop_at_max_tokens() -> None:
    ctx = CopyContext()
    ctx._reply_for = "abcabcabcabcabcabc"
    sched = make(ctx, spec_draft=16)
    out = Collector()
    sched.submit(request("abcabcabc", max_tokens=5), out, threading.Event())
    text, last = out.result()
    sched.close()
    assert text == "abcab" and isinstance(last, Chunk) and last.finish_reason == "length"
    assert all(len(d) <= 5 for d in _generating_entries(ctx))


def test_no_guesses_while_more_sequences_generate_than_allowed() -> None:
    ctx = CopyContext(n_seq_max=2)
    ctx._reply_for = "abcabcabcabc"
    sched = make(ctx, spec_draft=8, spec_max_active=1)
    outs = [Collector(), Collector()]
    for out in outs:
        sched.submit(request("abcabcabc"), out, threading.Event())
    assert [o.result()[0] for o in outs] == ["abcabcabcabc"] * 2
    sched.close()
    # While both generate, each decode carries one token per sequence.
    both = [d for d in ctx.decodes[1:] if {e[2] for e in d} == {0, 1}]
    assert both and all(len(d) == 2 for d in both)


def test_a_missed_guess_shrinks_the_next_one() -> None:
    ctx = CopyContext()
    # The prompt teaches "xyz" -> "abcdefgh"; the reply never follows it, so guesses keep missing.
    ctx._reply_for = "xyz1xyz2xyz3"
    sched = make(ctx, spec_draft=8)
    out = Collector()
    sched.submit(request("xyzabcdefgh xyz"), out, threading.Event())
    assert out.result()[0] == "xyz1xyz2xyz3"
    sched.close()
    sizes = [len(d) for d in _generating_entries(ctx)]
    # The first guess of several tokens misses (the reply never goes on as the prompt did) ...
    first_miss = next(i for i, n in enumerate(sizes) if n > 2)
    # ... and from then on each guess is one token: a miss at the first guess leaves room for one.
    assert sizes[first_miss + 1:] and max(sizes[first_miss + 1:]) <= 2
