"""Continuous batching over one llama.cpp context, with per-slot prefix caching and admission control.

One thread owns the context and runs the step loop: each step puts the next token of every
generating sequence plus prompt chunks of newly admitted sequences into a single batch (at most
`n_batch` tokens), decodes once, samples every sequence from its own logits row, and hands the text
to the waiting request through its `emit` callback (which must not block).

A finished sequence leaves its tokens in its slot's KV cells; the next request is placed in the free
slot whose cached tokens share the longest prefix with its prompt, and only the rest is computed.

Speculation (`spec_draft` > 0): while few sequences generate, each one's pending token goes into the
batch with up to `spec_draft` tokens guessed by prompt lookup (engines/speculation.py). The sequence then
samples at the pending token's row as always; while the sampled token equals the next guess, that guess's
row already holds the logits of the following position, so it samples again there. Each sample yields
exactly one emitted token, drawn from the same distribution and RNG as without speculation; the cells of
rejected guesses are removed.

The native side is behind the small `BatchContext` protocol so the loop is testable with a fake.
"""

from __future__ import annotations

import codecs
import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from appliance.engines.speculation import NgramDrafter
from appliance.engines.stops import StopMatcher
from appliance.errors import (
    ApplianceError,
    ContextLengthExceeded,
    EngineError,
    QueueTimeout,
    RequestTimeout,
    ServerOverloaded,
)
from appliance.types import (
    AdapterRef,
    Chunk,
    EngineStats,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    ToolGrammar,
    Usage,
)

log = logging.getLogger(__name__)
Emit = Callable[[Chunk | ApplianceError], None]


class SeqSampler(Protocol):
    def close(self) -> None: ...


class BatchContext(Protocol):
    n_seq_max: int
    n_batch: int
    n_ctx_per_seq: int

    def tokenize(self, text: str) -> list[int]: ...
    def piece(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...
    def sampler(self, params: SamplingParams, seed: int, grammar: str | None) -> Any: ...
    def compile_schema(self, schema: str) -> str: ...
    def compile_tools(self, tools: ToolGrammar) -> str: ...
    def sample(self, sampler: Any, batch_index: int) -> int: ...
    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None: ...
    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool: ...
    def seq_cp(self, src: int, dst: int) -> None: ...
    def load_adapter(self, adapter: AdapterRef) -> None: ...
    def use_adapter(self, adapter: AdapterRef | None) -> None: ...
    def logprob(self, batch_index: int, token: int, top: int) -> TokenLogprob: ...
    def close(self) -> None: ...


@dataclass
class SchedulerStats:
    """Counters the gateway will export as metrics. Written by the loop thread only."""

    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batch_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    queue_depth: int = 0
    busy_slots: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    def snapshot(self) -> EngineStats:
        hits = self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        ttft = sorted(self.ttft_s[-1000:])
        return EngineStats(
            requests=self.requests,
            completed=self.completed,
            cancelled=self.cancelled,
            rejected=dict(self.rejected),
            prompt_tokens=self.prompt_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
            prefix_cache_hit_rate=round(hits, 4),
            generated_tokens=self.generated_tokens,
            mean_batch_tokens=round(self.batch_tokens / self.steps, 2) if self.steps else 0.0,
            ttft_p50_s=round(ttft[len(ttft) // 2], 4) if ttft else None,
            queue_depth=self.queue_depth,
            busy_slots=self.busy_slots,
            drafted_tokens=self.drafted_tokens,
            accepted_tokens=self.accepted_tokens,
        )


class _Group:
    """The n sequences of one request. Their chunks carry the sequence's index and, in `generated`, the
    tokens of all of them; the last to finish reports the usage of all (the prompt once, the completions
    summed), so metering settles once."""

    def __init__(self, n: int, emit: Emit) -> None:
        self.n = n
        self.emit = emit
        self.generated = 0
        self.finished = 0
        self.completion_tokens = 0

    def emitter(self, index: int) -> Emit:
        def emit(item: Chunk | ApplianceError) -> None:
            if isinstance(item, ApplianceError):
                self.emit(item)
                return
            usage = None
            if item.usage is not None:
                self.finished += 1
                self.completion_tokens += item.usage.completion_tokens
                if self.finished == self.n:
                    usage = Usage(prompt_tokens=item.usage.prompt_tokens, completion_tokens=self.completion_tokens)
            self.emit(msgspec.structs.replace(item, index=index, usage=usage, generated=self.generated))

        return emit


class _Sequence:
    def __init__(
        self, request: GenerationRequest, prompt: list[int], emit: Emit, cancel: threading.Event,
        index: int = 0, group: _Group | None = None,
    ) -> None:
        self.index = index
        self.group = group
        self.followers: list[_Sequence] = []
        """The other sequences of an n > 1 request: placed with a copy of this one's prompt cells."""
        self.logprobs: list[TokenLogprob] = []
        """Of tokens generated but not yet emitted."""
        self.request = request
        self.adapter = request.adapter.id if request.adapter is not None else None
        self.prompt = prompt
        self.emit = emit
        self.cancel = cancel
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.slot: int = -1
        self.n_past = 0  # tokens of prompt already in the KV cells
        self.pending: int | None = None  # sampled, not yet decoded
        self.generated = 0
        self.sampler: Any = None
        self.stops = StopMatcher(request.stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.batch_index = -1
        self.entries: tuple[int, int] = (0, 0)
        """Where this step's entries of the sequence are in the step's batch (start, end)."""
        self.prefix_hit = 0
        self.grammar: str | None = None
        self.drafter: NgramDrafter | None = None
        """The sequence's tokens so far (cells and pending), indexed for prompt lookup; made at its first draft."""
        self.draft: list[int] = []
        """Guessed tokens decoded after `pending` in this step."""
        self.draft_cap = 0
        """How many tokens the next guess may have: grows while guesses are kept whole, shrinks to what was
        kept after a miss (each guessed row costs a logits row over the whole vocabulary)."""

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


@dataclass
class _Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # what the KV cells of this sequence hold
    adapter: str | None = None  # the LoRA adapter the cells were computed with (another one's are no prefix)
    seq: _Sequence | None = None
    last_used: float = 0.0


class BatchScheduler:
    def __init__(
        self,
        ctx: BatchContext,
        *,
        model_id: str,
        max_queue: int,
        prefix_min_tokens: int = 32,
        queue_timeout_s: float,
        request_timeout_s: float,
        spec_draft: int = 0,
        spec_ngram: int = 3,
        spec_max_active: int = 2,
    ) -> None:
        self.ctx = ctx
        # Every speculating sequence's pending token and guesses fit in one batch.
        self._spec_draft = max(0, min(spec_draft, ctx.n_batch // max(1, spec_max_active) - 1))
        self._spec_ngram = spec_ngram
        self._spec_max_active = spec_max_active
        self.model_id = model_id
        self.n_ctx = ctx.n_ctx_per_seq
        self._max_queue = max_queue
        self._prefix_min = prefix_min_tokens
        self._queue_timeout = queue_timeout_s
        self._request_timeout = request_timeout_s
        self._slots = [_Slot(i) for i in range(ctx.n_seq_max)]
        self._waiting: list[tuple[int, int, _Sequence]] = []  # heap of (priority, arrival, seq)
        self._arrivals = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running = True
        self._adapter: str | None = None
        """The LoRA adapter applied to the context now (None: the base model)."""
        self.stats = SchedulerStats()
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{model_id}", daemon=True)
        self._thread.start()

    # -- request side (any thread) -------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.ctx.tokenize(text)

    @property
    def failure(self) -> str | None:
        """An in-process model cannot lose its footing after loading: always None."""
        return None

    def engine_stats(self) -> EngineStats:
        return self.stats.snapshot()

    def submit(self, request: GenerationRequest, emit: Emit, cancel: threading.Event) -> None:
        """Queue a generation. Raises at once if it can never run or the queue is full."""
        prompt = list(request.prompt_ids) if request.prompt_ids is not None else self.ctx.tokenize(request.prompt)
        if len(prompt) >= self.n_ctx:
            self._count_reject("context_length")
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.n_ctx} tokens, but the prompt has "
                f"{len(prompt)} tokens.",
                param="messages",
            )
        grammar = None
        if request.json_schema is not None:
            grammar = self.ctx.compile_schema(request.json_schema)
        elif request.tools is not None:
            grammar = self.ctx.compile_tools(request.tools)
        if request.n > 1:
            group = _Group(request.n, emit)
            seqs = [_Sequence(request, prompt, group.emitter(i), cancel, i, group) for i in range(request.n)]
            seq = seqs[0]
            seq.followers = seqs[1:]
        else:
            seqs = [seq := _Sequence(request, prompt, emit, cancel)]
        for one in seqs:
            one.grammar = grammar
        with self._lock:
            # Free slots take waiting requests at the next step: only those beyond them are queued.
            free = sum(slot.seq is None for slot in self._slots)
            if len(self._waiting) >= self._max_queue + free:
                self.stats.rejected["queue_full"] = self.stats.rejected.get("queue_full", 0) + 1
                raise ServerOverloaded(
                    f"The server is at capacity ({self._max_queue} requests waiting); retry shortly.",
                    retry_after=max(1, int(len(self._waiting) / max(1, len(self._slots)))),
                )
            heapq.heappush(self._waiting, (request.priority, next(self._arrivals), seq))
            self.stats.requests += 1
            self.stats.queue_depth = len(self._waiting)
            self._wake.notify()

    def _count_reject(self, reason: str) -> None:
        with self._lock:
            self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1

    def close(self) -> None:
        with self._lock:
            self._running = False
            self._wake.notify()
        self._thread.join(timeout=10)
        for _, _, seq in self._waiting:
            seq.emit(EngineError("the server is shutting down"))
        for slot in self._slots:
            if slot.seq is not None:
                slot.seq.emit(EngineError("the server is shutting down"))
        self.ctx.close()

    # -- the loop (one thread) -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._waiting and not self._active():
                    self._wake.wait()
                if not self._running:
                    return
                self._expire_waiting()
                self._admit()
                self.stats.queue_depth = len(self._waiting)
            try:
                self._step()
            except ApplianceError as exc:
                self._fail_all(exc)
            except Exception:
                log.exception("scheduler step failed on %s", self.model_id)
                self._fail_all(EngineError(f"generation failed on model {self.model_id}"))

    def _active(self) -> list[_Sequence]:
        return [s.seq for s in self._slots if s.seq is not None]

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        keep = []
        for item in self._waiting:
            seq = item[2]
            if seq.cancel.is_set():
                self.stats.cancelled += 1
                continue
            if now - seq.submitted > self._queue_timeout:
                self.stats.rejected["queue_timeout"] = self.stats.rejected.get("queue_timeout", 0) + 1
                seq.emit(QueueTimeout(f"The request waited {self._queue_timeout:.0f} s for a free slot; retry shortly."))
                continue
            keep.append(item)
        if len(keep) != len(self._waiting):
            self._waiting = keep
            heapq.heapify(self._waiting)

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s in self._slots if s.seq is None]
            if not free:
                return
            _, _, seq = heapq.heappop(self._waiting)
            if seq.request.adapter is not None:
                try:
                    self.ctx.load_adapter(seq.request.adapter)  # a file llama.cpp refuses fails this request only
                except ApplianceError as exc:
                    seq.emit(exc)
                    continue
            # The slot whose cache serves this prompt best; otherwise the least recently used one, so
            # a short accidental match (the BOS token) never evicts a valuable cached prefix.
            slot = max(free, key=lambda s: (self._reusable(s, seq), -s.last_used))
            self._place(seq, slot)

    def _reusable(self, slot: _Slot, seq: _Sequence) -> int:
        """Prompt tokens a slot's cache would save, below the threshold counted as none. Cells computed
        with another adapter (or without one) hold other keys and values: none."""
        if slot.adapter != seq.adapter:
            return 0
        keep = min(_common_prefix(slot.tokens, seq.prompt), len(seq.prompt) - 1)
        return keep if self._prefix_min and keep >= self._prefix_min else 0

    def _place(self, seq: _Sequence, slot: _Slot) -> None:
        # At least one prompt token is computed: its logits are what the first sample reads. A short
        # hit saves little, and llama.cpp's numerics depend slightly on how a prompt is split into
        # batches, so prompts without a real hit stay bit-identical to a cold run.
        keep = self._reusable(slot, seq)
        if not self.ctx.seq_rm(slot.index, keep, -1):
            self.ctx.seq_rm(slot.index, -1, -1)
            keep = 0
        slot.tokens = seq.prompt[:keep]
        slot.adapter = seq.adapter
        slot.seq = seq
        seq.slot = slot.index
        seq.n_past = keep
        seq.prefix_hit = keep
        self._start_sampling(seq)
        self.stats.prompt_tokens += len(seq.prompt)
        self.stats.prefix_hit_tokens += keep

    def _start_sampling(self, seq: _Sequence) -> None:
        s = seq.request.sampling
        # the i-th of n sequences draws from seed + i: a seeded n > 1 request is reproducible
        seed = (s.seed + seq.index) % (1 << 32) if s.seed is not None else random.getrandbits(32)
        seq.sampler = self.ctx.sampler(s, seed, seq.grammar)

    def _fork(self, leader: _Sequence) -> None:
        """The leader's prompt is in its cells and its logits are fresh: each follower gets a copy of the
        cells and samples its first token from the same logits. A follower without a free slot waits
        in the queue and computes the prompt itself (a cached prefix then serves it)."""
        followers, leader.followers = leader.followers, []
        for seq in followers:
            free = [s for s in self._slots if s.seq is None]
            if not free:
                with self._lock:
                    heapq.heappush(self._waiting, (seq.request.priority, next(self._arrivals), seq))
                continue
            slot = min(free, key=lambda s: s.last_used)
            self.ctx.seq_cp(leader.slot, slot.index)
            slot.tokens = list(leader.prompt)
            slot.adapter = leader.adapter
            slot.seq = seq
            seq.slot = slot.index
            seq.n_past = seq.prefix_hit = len(seq.prompt)
            self._start_sampling(seq)
            self._advance(seq, self.ctx.sample(seq.sampler, leader.batch_index), leader.batch_index)

    def _step(self) -> None:
        active = self._active()
        now = time.monotonic()
        for seq in active:
            if seq.cancel.is_set():
                self._finish(seq, cancelled=True)
            elif now - seq.submitted > self._request_timeout:
                self._finish(seq, error=RequestTimeout(f"The request exceeded {self._request_timeout:.0f} s."))
        active = self._active()
        self.stats.busy_slots = len(active)
        if not active:
            return
        entries: list[tuple[int, int, int, bool]] = []
        # Generating sequences first: one token each keeps their latency flat while prompts stream in.
        speculate = self._spec_draft > 0 and sum(s.pending is not None for s in active) <= self._spec_max_active
        for seq in active:
            seq.batch_index = -1
            seq.draft = []
            seq.entries = (len(entries), len(entries))
            if seq.pending is not None:
                seq.batch_index = len(entries)
                pos = len(self._slots[seq.slot].tokens)
                entries.append((seq.pending, pos, seq.slot, True))
                if speculate and seq.request.speculate:
                    seq.draft = self._guess(seq, pos)
                    entries.extend((t, pos + 1 + i, seq.slot, True) for i, t in enumerate(seq.draft))
                    self.stats.drafted_tokens += len(seq.draft)
                seq.entries = (seq.batch_index, len(entries))
        budget = self.ctx.n_batch - len(entries)
        copied: set[int] = set()
        for seq in active:
            if budget <= 0:
                break
            if seq.prefilling and self._share_prefix(seq, active, copied):
                continue
            if seq.prefilling:
                start = len(entries)
                end = min(len(seq.prompt), seq.n_past + budget)
                for i in range(seq.n_past, end):
                    entries.append((seq.prompt[i], i, seq.slot, i == len(seq.prompt) - 1))
                budget -= end - seq.n_past
                seq.n_past = end
                if end == len(seq.prompt):
                    seq.batch_index = len(entries) - 1
                seq.entries = (start, len(entries))
        if not entries:
            return
        # llama.cpp applies a LoRA adapter to the whole context: each adapter's sequences (and the base
        # model's) are decoded in a call of their own, and sampled before the next call overwrites the logits.
        groups: dict[str | None, list[_Sequence]] = {self._adapter: []}  # the applied one first: a switch less
        for seq in active:
            if seq.entries[1] > seq.entries[0]:
                groups.setdefault(seq.adapter, []).append(seq)
        groups = {adapter: members for adapter, members in groups.items() if members}
        for members in groups.values():
            batch = entries
            if len(groups) > 1:
                batch = []
                for seq in members:
                    start, end = seq.entries
                    if seq.batch_index >= 0:
                        seq.batch_index += len(batch) - start
                    batch.extend(entries[start:end])
            self._decode(batch, members[0].request.adapter)
            self._sample(members)

    def _decode(self, batch: list[tuple[int, int, int, bool]], adapter: AdapterRef | None) -> None:
        name = adapter.id if adapter is not None else None
        if name != self._adapter:
            self.ctx.use_adapter(adapter)
            self._adapter = name
        self.ctx.decode(batch)
        self.stats.steps += 1
        self.stats.batch_tokens += len(batch)

    def _sample(self, members: list[_Sequence]) -> None:
        """After the decode of `members`: their cells hold the batch's tokens (a generating sequence's pending
        one, or a prefilling one's prompt so far); sample each one that has logits."""
        for seq in members:
            if seq.pending is not None:
                self._slots[seq.slot].tokens.append(seq.pending)
            else:
                self._slots[seq.slot].tokens = seq.prompt[: seq.n_past]
        for seq in members:
            if seq.batch_index >= 0:
                if seq.followers:
                    self._fork(seq)
                if seq.draft:
                    self._verify(seq)
                else:
                    self._advance(seq, self.ctx.sample(seq.sampler, seq.batch_index), seq.batch_index)

    def _share_prefix(self, seq: _Sequence, active: list[_Sequence], copied: set[int]) -> bool:
        """Compute a shared prompt prefix once across slots. If another slot's cells (busy or free) hold
        more of this prompt than its own, copy them over and go on from there; if another sequence is
        prefilling the same prefix and is ahead, wait a step for it (True) rather than compute it twice.
        Slots given a copy in this step are no donors: their cells are filled by the coming decode."""
        if not self._prefix_min:
            return False
        slot = self._slots[seq.slot]
        best, shared = None, 0
        for other in self._slots:
            if other is slot or other.index in copied or other.adapter != seq.adapter:
                continue
            n = min(_common_prefix(other.tokens, seq.prompt), len(seq.prompt) - 1)
            if n > shared:
                best, shared = other, n
        if best is not None and shared - seq.n_past >= self._prefix_min:
            self.ctx.seq_cp(best.index, slot.index)
            self.ctx.seq_rm(slot.index, shared, -1)
            slot.tokens = seq.prompt[:shared]
            self.stats.prefix_hit_tokens += shared - seq.n_past
            seq.prefix_hit = seq.n_past = shared
            copied.add(slot.index)
        for other in active:
            if other is seq or not other.prefilling or other.adapter != seq.adapter:
                continue
            common = min(_common_prefix(other.prompt, seq.prompt), len(seq.prompt) - 1)
            ahead = (other.n_past, -other.submitted) > (seq.n_past, -seq.submitted)
            if ahead and other.n_past < common and common - seq.n_past >= self._prefix_min:
                return True
        return False

    def _guess(self, seq: _Sequence, pos: int) -> list[int]:
        """Tokens to decode after the pending one at `pos`: what followed the last n-gram before, as
        many as the draft size, the sequence's context, its max_tokens and the batch allow."""
        if seq.drafter is None:
            seq.drafter = NgramDrafter(self._slots[seq.slot].tokens + [seq.pending], self._spec_ngram)  # type: ignore[list-item]
        if seq.draft_cap == 0:
            seq.draft_cap = self._spec_draft
        limit = min(seq.draft_cap, self.n_ctx - pos - 2)
        if seq.request.max_tokens is not None:
            limit = min(limit, seq.request.max_tokens - seq.generated - 1)
        return seq.drafter.draft(limit)

    def _verify(self, seq: _Sequence) -> None:
        """Sample along the decoded guesses while the model agrees with them (see the module's doc)."""
        slot = self._slots[seq.slot]
        index = seq.batch_index
        kept = 0
        for guess in seq.draft:
            token = self.ctx.sample(seq.sampler, index)
            self._advance(seq, token, index)
            if seq.pending is None or token != guess:
                break
            # The guess's cell already holds this token: it is decoded, not pending.
            slot.tokens.append(token)
            seq.pending = None
            kept += 1
            index += 1
        else:
            self._advance(seq, self.ctx.sample(seq.sampler, index), index)
        self.stats.accepted_tokens += kept
        whole = kept == len(seq.draft)
        seq.draft_cap = min(self._spec_draft, 2 * seq.draft_cap) if whole else max(1, kept + 1)
        self.ctx.seq_rm(slot.index, len(slot.tokens), -1)

    def _advance(self, seq: _Sequence, token: int, batch_index: int) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
            self.stats.ttft_s.append(seq.first_token_at - seq.submitted)
            if len(self.stats.ttft_s) > 4096:
                del self.stats.ttft_s[:2048]
        seq.pending = None
        if self.ctx.is_eog(token):
            self._finish(seq, reason="stop")
            return
        seq.generated += 1
        if seq.group is not None:
            seq.group.generated += 1
        self.stats.generated_tokens += 1
        if seq.request.logprobs is not None:
            seq.logprobs.append(self.ctx.logprob(batch_index, token, seq.request.logprobs))
        text, hit = seq.stops.feed(seq.decoder.decode(self.ctx.piece(token)))
        if text:
            seq.emit(Chunk(text=text, generated=seq.generated, logprobs=tuple(seq.logprobs)))
            seq.logprobs.clear()
        if hit:
            self._finish(seq, reason="stop", stopped_by_text=True)
            return
        limit = seq.request.max_tokens
        room = self.n_ctx - len(seq.prompt) - seq.generated
        if (limit is not None and seq.generated >= limit) or room <= 0:
            self._finish(seq, reason="length")
            return
        seq.pending = token
        if seq.drafter is not None:
            seq.drafter.extend([token])

    def _finish(
        self,
        seq: _Sequence,
        *,
        reason: str = "stop",
        stopped_by_text: bool = False,
        cancelled: bool = False,
        error: ApplianceError | None = None,
    ) -> None:
        slot = self._slots[seq.slot]
        slot.seq = None
        slot.last_used = time.monotonic()
        self.stats.busy_slots = len(self._active())
        if seq.sampler is not None:
            seq.sampler.close()
        if cancelled:
            self.stats.cancelled += 1
            return
        if error is not None:
            seq.emit(error)
            return
        tail = ""
        if not stopped_by_text:
            # Text held back as a possible stop-string prefix was not one: release it.
            tail, hit = seq.stops.feed(seq.decoder.decode(b"", final=True))
            if not hit:
                tail += seq.stops.flush()
        self.stats.completed += 1
        usage = Usage(prompt_tokens=len(seq.prompt), completion_tokens=seq.generated)
        seq.emit(Chunk(text=tail, finish_reason=reason, usage=usage, generated=seq.generated,  # type: ignore[arg-type]
                       logprobs=tuple(seq.logprobs)))

    def _fail_all(self, exc: ApplianceError) -> None:
        for slot in self._slots:
            if slot.seq is not None:
                seq = slot.seq
                self._finish(seq, error=exc)
            # The cells' content is unknown after a failed decode: forget the cached prefix.
            self.ctx.seq_rm(slot.index, -1, -1)
            slot.tokens = []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
