"""Routing tables: settings validation (cycles, unknown models) and the rules that choose a ladder (no server)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from appliance.engines.registry import ModelRegistry
from appliance.errors import ModelNotFound, SettingsError
from appliance.protocol.openai import ChatCompletionRequest
from appliance.services.generation import GenerationService
from appliance.services.routing import RequestFacts, RouteHop, RoutePath, RoutingService, chat_facts, conversation_of
from appliance.settings import load_settings
from tests.fakes import manifest


def _settings(tmp_path: Path, toml: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "appliance.toml"
    path.write_text(toml)
    return load_settings(path, env={})


def _registry() -> ModelRegistry:
    manifests = [
        manifest("small", aliases=["small-alias"]),
        manifest("big"),
        manifest("base", kind="completion"),
        manifest("embed", kind="embedding"),
    ]
    return ModelRegistry(manifests, lambda m: None, load_timeout_s=1)  # type: ignore[arg-type,return-value]


def _routing(tmp_path: Path, toml: str) -> RoutingService:
    registry = _registry()
    return RoutingService(_settings(tmp_path, toml).routing, registry, GenerationService(registry))


def _ids(routing: RoutingService, name: str, **facts: object) -> list[str]:
    return [m.id for m in routing.ladder(name, RequestFacts(tenant="t", **facts))]  # type: ignore[arg-type]


def test_a_cycle_between_routes_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"cycle \(a -> b -> c -> a\)"):
        _settings(tmp_path, """
[routing.a]
candidates = ["small", "b"]
[routing.b]
candidates = ["big"]
[[routing.b.rules]]
tenants = ["x"]
use = ["c"]
[routing.c]
candidates = ["a"]
""")
    with pytest.raises(SettingsError, match=r"cycle \(self -> self\)"):
        _settings(tmp_path, '[routing.self]\ncandidates = ["self"]\n')


def test_bad_route_tables_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="candidates"):
        _settings(tmp_path, "[routing.auto]\ncandidates = []\n")
    with pytest.raises(SettingsError, match="unknown"):
        _settings(tmp_path, '[routing.auto]\ncandidates = ["small"]\nweights = [1]\n')
    with pytest.raises(SettingsError, match="needs"):
        _settings(tmp_path, '[routing.auto]\ncandidates = ["small"]\n[[routing.auto.rules]]\nneeds = ["vision"]\nuse = ["big"]\n')


def test_a_route_naming_an_unknown_model_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"routing.auto: candidate 'nope' is not a chat or completion model"):
        _routing(tmp_path, '[routing.auto]\ncandidates = ["small", "nope"]\n')
    with pytest.raises(SettingsError, match="candidate 'embed'"):
        _routing(tmp_path, '[routing.auto]\ncandidates = ["small"]\n[[routing.auto.rules]]\nuse = ["embed"]\n')
    with pytest.raises(SettingsError, match="routing.small: a model already has this id"):
        _routing(tmp_path, '[routing.small]\ncandidates = ["big"]\n')


def test_rules_choose_the_ladder_first_match_wins(tmp_path: Path) -> None:
    routing = _routing(tmp_path, """
[routing.auto]
candidates = ["small-alias", "big"]
[[routing.auto.rules]]
tenants = ["premium"]
use = ["big"]
[[routing.auto.rules]]
needs = ["tools", "response_format"]
use = ["big", "small"]
[[routing.auto.rules]]
min_prompt_chars = 1000
use = ["big"]
[[routing.auto.rules]]
max_prompt_chars = 10
use = ["small"]
""")
    assert routing.is_route("auto") and not routing.is_route("small")
    assert _ids(routing, "auto", prompt_chars=100) == ["small", "big"]  # aliases resolve to ids
    assert [m.id for m in routing.ladder("auto", RequestFacts(tenant="premium"))] == ["big"]
    assert _ids(routing, "auto", needs=frozenset({"tools"}), prompt_chars=100) == ["big", "small"]
    assert _ids(routing, "auto", needs=frozenset({"collection"}), prompt_chars=100) == ["small", "big"]
    assert _ids(routing, "auto", prompt_chars=5000) == ["big"]
    assert _ids(routing, "auto", prompt_chars=3) == ["small"]
    assert [m.id for m in routing.models_of("auto")] == ["small", "big"]


def test_routes_nest_and_each_model_is_tried_once(tmp_path: Path) -> None:
    routing = _routing(tmp_path, """
[routing.auto]
candidates = ["fast", "big"]
[routing.fast]
candidates = ["small", "big", "base"]
""")
    assert _ids(routing, "auto") == ["small", "big", "base"]
    assert routing.route_ids() == ["auto", "fast"]


def test_facts_of_a_chat_request() -> None:
    body = msgspec.convert({
        "model": "auto", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"},
    }, ChatCompletionRequest)
    facts = chat_facts(body, "acme")
    assert facts == RequestFacts(tenant="acme", needs=frozenset({"response_format"}), prompt_chars=10, caller="acme",
                                 conversation=conversation_of(["be brief", "hi"]))


def test_the_path_header_names_each_hop_and_why() -> None:
    path = RoutePath("auto")
    path.hops += [RouteHop("smollm2-135m", "queue_full"), RouteHop("gemma3-270m", "served")]
    assert path.header() == "auto>smollm2-135m(queue_full)>gemma3-270m"
    path.hops[-1] = RouteHop("gemma3-270m", "failed")
    path.hops.append(RouteHop("smollm2-135m", "cache"))
    assert path.header() == "auto>smollm2-135m(queue_full)>gemma3-270m(failed)>cache:smollm2-135m"


def test_a_caller_allowed_none_of_the_candidates_gets_404(tmp_path: Path) -> None:
    routing = _routing(tmp_path, '[routing.auto]\ncandidates = ["small", "big"]\n')

    class OnlyBig:
        def allow_model(self, m):  # type: ignore[no-untyped-def]
            if m.id != "big":
                raise ModelNotFound("no")

    assert [m.id for m in routing._allowed(routing.ladder("auto", RequestFacts(tenant="t")), "auto", OnlyBig())] == ["big"]  # type: ignore[arg-type]

    class Nothing:
        def allow_model(self, m):  # type: ignore[no-untyped-def]
            raise ModelNotFound("no")

    with pytest.raises(ModelNotFound, match="'auto'"):
        routing._allowed(routing.ladder("auto", RequestFacts(tenant="t")), "auto", Nothing())  # type: ignore[arg-type]
