"""LoRA adapters without a model: how a request names one (BASE:ADAPTER, the `adapter` field, a tenant's
default), and how the batch loop decodes each adapter's sequences apart and never shares their cells."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from appliance.engines.registry import ModelRegistry
from appliance.errors import InvalidRequest, ModelNotFound, UnsupportedForModel
from appliance.types import AdapterRef, Chunk
from tests.fakes import manifest
from tests.unit.test_scheduler import SYSTEM, Collector, FakeBatchContext, make, request


def _registry() -> ModelRegistry:
    manifests = [
        manifest("gemma", aliases=["g"]),
        manifest("other"),
        manifest("embed", kind="embedding"),
        manifest("tone", kind="adapter", base="gemma", aliases=["tone-v1"]),
        manifest("legal", kind="adapter", base="gemma"),
        manifest("smol-tone", kind="adapter", base="other"),
        manifest("has:colon"),
    ]
    return ModelRegistry(manifests, lambda m: None, load_timeout_s=1, models_dir=Path("/models"))  # type: ignore[arg-type,return-value]


def test_base_colon_adapter_serves_the_base_engine_with_the_adapter() -> None:
    registry = _registry()
    served = registry.resolve("gemma:tone", kinds=("chat",))
    assert served.id == "gemma:tone" and served.engine_id == "gemma" and served.kind == "chat"
    assert served.adapter == AdapterRef("tone", "/models/tone/model.bin")
    # An alias of the base or of the adapter names the same thing; the field does too.
    assert registry.resolve("g:tone-v1").id == "gemma:tone"
    assert registry.resolve("gemma", adapter="legal").id == "gemma:legal"
    assert registry.resolve("gemma:tone", adapter="tone-v1").id == "gemma:tone"
    # A model id that holds ':' itself is still that model.
    assert registry.resolve("has:colon").adapter is None
    # Adapters have no engine of their own and are listed as BASE:ADAPTER.
    assert {m.id for m in registry.manifests()} == {"gemma", "other", "embed", "has:colon"}
    assert sorted(m.id for m in registry.adapters()) == ["gemma:legal", "gemma:tone", "other:smol-tone"]


def test_a_wrong_adapter_is_refused_with_what_exists() -> None:
    registry = _registry()
    with pytest.raises(ModelNotFound, match=r"gemma has no adapter 'nope' \(its adapters: legal, tone\)"):
        registry.resolve("gemma:nope")
    with pytest.raises(ModelNotFound, match="does not exist"):
        registry.resolve("gemma", adapter="nope")
    with pytest.raises(InvalidRequest, match="is for model other, not gemma") as info:
        registry.resolve("gemma", adapter="smol-tone")
    assert info.value.param == "adapter" and info.value.status == 400
    with pytest.raises(InvalidRequest, match="names adapter 'tone' and the request's \"adapter\" names 'legal'"):
        registry.resolve("gemma:tone", adapter="legal")
    with pytest.raises(UnsupportedForModel, match="use the model 'gemma:tone'"):
        registry.resolve("tone")
    with pytest.raises(ModelNotFound):
        registry.resolve("embed:tone")  # an embedding model takes no adapter
    with pytest.raises(InvalidRequest, match="There is no adapter 'nope' \\(adapters: legal, smol-tone, tone\\)"):
        registry.check_adapter("nope")
    registry.check_adapter("tone")


def test_a_default_adapter_applies_to_its_own_base_only() -> None:
    registry = _registry()
    gemma, other = registry.resolve("gemma"), registry.resolve("other")
    assert registry.with_default_adapter(gemma, "tone").id == "gemma:tone"
    assert registry.with_default_adapter(other, "tone") is other
    assert registry.with_default_adapter(gemma, None) is gemma
    # A request that names an adapter keeps it.
    legal = registry.resolve("gemma:legal")
    assert registry.with_default_adapter(legal, "tone") is legal


class AdapterContext(FakeBatchContext):
    """Records which adapter each decode ran under."""

    def __init__(self, n_seq_max: int = 3) -> None:
        super().__init__(n_seq_max=n_seq_max)
        self.applied: str | None = None
        self.under: list[str | None] = []
        self.loaded: list[str] = []
        self.refuse: set[str] = set()

    def load_adapter(self, adapter: AdapterRef) -> None:
        if adapter.id in self.refuse:
            raise InvalidRequest(f"The adapter '{adapter.id}' could not be loaded", param="adapter")
        self.loaded.append(adapter.id)

    def use_adapter(self, adapter: AdapterRef | None) -> None:
        self.applied = adapter.id if adapter is not None else None

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        super().decode(entries)
        self.under.append(self.applied)


A = AdapterRef("a", "/models/a/a.gguf")
B = AdapterRef("b", "/models/b/b.gguf")


def test_each_adapter_is_decoded_in_a_call_of_its_own() -> None:
    ctx = AdapterContext()
    ctx.gate.clear()
    sched = make(ctx)
    outs = [Collector() for _ in range(3)]
    for out, adapter, prompt in zip(outs, (None, A, B), ("one", "two", "three")):
        sched.submit(request(prompt, adapter=adapter), out, threading.Event())
    ctx.gate.set()
    assert [o.result()[0] for o in outs] == ["hello"] * 3
    sched.close()
    slot_of = {}
    for entries, adapter in zip(ctx.decodes, ctx.under):
        assert len({slot_of.setdefault(e[2], adapter) for e in entries}) == 1, "one decode mixed adapters"
        for e in entries:
            assert slot_of[e[2]] == adapter, "a sequence changed adapter"
    assert set(slot_of.values()) == {None, "a", "b"}
    assert sorted(ctx.loaded) == ["a", "b"]
    # Each sequence's tokens are contiguous in its own decodes: 5 generated tokens + its prompt.
    for slot in slot_of:
        positions = [e[1] for d in ctx.decodes for e in d if e[2] == slot]
        assert positions == list(range(len(positions)))


def test_cells_computed_with_another_adapter_are_no_prefix() -> None:
    ctx = AdapterContext(n_seq_max=3)
    ctx.n_ctx_per_seq = 128
    sched = make(ctx)
    for adapter in (A, B, None, A):
        out = Collector()
        sched.submit(request(SYSTEM + "question?", adapter=adapter), out, threading.Event())
        assert out.result()[0] == "hello"
    sched.close()
    # The same prompt under b and under the base model found a's cells and computed its own; only the second
    # request with adapter `a` found its prefix cached (a's slot).
    assert sched.stats.prefix_hit_tokens >= len(SYSTEM)
    assert sched.stats.prefix_hit_tokens < 2 * len(SYSTEM)
    assert not ctx.copies


def test_an_adapter_llama_refuses_fails_its_request_only() -> None:
    ctx = AdapterContext()
    ctx.refuse = {"b"}
    sched = make(ctx)
    good, bad = Collector(), Collector()
    sched.submit(request("fine", adapter=A), good, threading.Event())
    sched.submit(request("broken", adapter=B), bad, threading.Event())
    text, last = bad.result()
    assert isinstance(last, InvalidRequest) and last.param == "adapter"
    text, last = good.result()
    assert text == "hello" and isinstance(last, Chunk)
    sched.close()
