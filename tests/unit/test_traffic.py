"""Traffic shaping without a server: split hashing and stickiness, split/shadow validation, feedback storage,
the per-variant comparison, and the usage chain with variants."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from appliance.engines.registry import ModelRegistry
from appliance.errors import RequestNotFound, SettingsError
from appliance.policy.db import open_gateway_db
from appliance.policy.guardrails import GuardrailAction
from appliance.policy.experiments import ExperimentStore, ShadowRecord, compare, percentile
from appliance.policy.metering import UsageMeter, UsageRecord, _digest, _row
from appliance.services.generation import GenerationService
from appliance.services.routing import RequestFacts, RoutingService, choose_variant, split_point
from appliance.settings import Price, RouteSettings, SplitVariant, load_settings
from tests.fakes import manifest

CANARY = """
[routing.canary]
split = [{model = "stable", weight = 90}, {model = "next", weight = 10, name = "candidate"}]
candidates = ["spare"]
[[routing.canary.rules]]
tenants = ["pinned"]
use = ["stable"]
"""


def _settings(tmp_path: Path, toml: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "appliance.toml"
    path.write_text(toml)
    return load_settings(path, env={})


def _routing(tmp_path: Path, toml: str) -> RoutingService:
    registry = ModelRegistry([manifest(m) for m in ("stable", "next", "spare")] + [manifest("embed", kind="embedding")],
                             lambda m: None, load_timeout_s=1)  # type: ignore[arg-type,return-value]
    return RoutingService(_settings(tmp_path, toml).routing, registry, GenerationService(registry))


def _route(*weights: int, sticky: str = "key") -> RouteSettings:
    return RouteSettings(split=[SplitVariant(model=f"m{i}", weight=w) for i, w in enumerate(weights)], sticky=sticky)  # type: ignore[arg-type]


def test_the_split_point_is_stable_per_id_and_independent_between_routes() -> None:
    assert split_point("canary", "ak_1") == split_point("canary", "ak_1")
    assert 0 <= split_point("canary", "ak_1") < 1
    assert split_point("canary", "ak_1") != split_point("other", "ak_1")
    points = [split_point("canary", f"ak_{i}") for i in range(2000)]
    assert 0.45 < sum(p < 0.5 for p in points) / len(points) < 0.55  # uniform enough to split by weight


def test_weights_share_the_keys_and_a_key_keeps_its_variant() -> None:
    route = _route(90, 10)
    seen = Counter(choose_variant("canary", route, RequestFacts(tenant="t", caller=f"ak_{i}")).model for i in range(4000))
    assert 0.08 < seen["m1"] / 4000 < 0.12
    for i in range(50):
        facts = RequestFacts(tenant="t", caller=f"ak_{i}")
        assert len({choose_variant("canary", route, facts).model for _ in range(5)}) == 1
    # Without an API key (open mode) the tenant is the caller: one variant for all its requests.
    assert len({choose_variant("canary", route, RequestFacts(tenant="t")).model for _ in range(20)}) == 1


def test_raising_the_canary_weight_only_moves_keys_onto_it() -> None:
    before, after = _route(90, 10), _route(70, 30)
    for i in range(1000):
        facts = RequestFacts(tenant="t", caller=f"ak_{i}")
        if choose_variant("r", before, facts).model == "m1":
            assert choose_variant("r", after, facts).model == "m1"


def test_weight_zero_takes_nothing_and_sticky_modes_differ() -> None:
    zero = _route(0, 5, 0)
    assert {choose_variant("r", zero, RequestFacts(tenant="t", caller=f"k{i}")).model for i in range(200)} == {"m1"}
    conversation = _route(50, 50, sticky="conversation")
    one = RequestFacts(tenant="t", caller="same-key", conversation="c-1")
    picks = {choose_variant("r", conversation, RequestFacts(tenant="t", caller="same-key", conversation=f"c-{i}")).model
             for i in range(40)}
    assert picks == {"m0", "m1"}  # one key, many conversations: both variants
    assert len({choose_variant("r", conversation, one).model for _ in range(10)}) == 1
    drawn = {choose_variant("r", _route(50, 50, sticky="none"), one).model for _ in range(60)}
    assert drawn == {"m0", "m1"}  # sticky = "none": drawn anew each time


def test_the_variant_model_leads_and_the_rest_is_its_fallback(tmp_path: Path) -> None:
    routing = _routing(tmp_path, CANARY)
    plans = {}
    for i in range(300):
        ladder, variant = routing.plan("canary", RequestFacts(tenant="t", caller=f"ak_{i}"))
        plans[variant] = [m.id for m in ladder]
    assert plans == {"stable": ["stable", "next", "spare"], "candidate": ["next", "stable", "spare"]}
    ladder, variant = routing.plan("canary", RequestFacts(tenant="pinned", caller="ak_1"))
    assert ([m.id for m in ladder], variant) == (["stable"], None)  # a matching rule decides before the split
    assert [m.id for m in routing.models_of("canary")] == ["spare", "stable", "next"]


@pytest.mark.parametrize(("toml", "message"), [
    ('[routing.r]\nsplit = [{model = "stable", weight = 1}]\n', "two variants or more"),
    ('[routing.r]\nsplit = [{model = "stable", weight = 0}, {model = "next", weight = 0}]\n', "add up to 0"),
    ('[routing.r]\nsplit = [{model = "stable", weight = -5}, {model = "next", weight = 5}]\n', ">= 0"),
    ('[routing.r]\nsplit = [{model = "stable", weight = 1.5}, {model = "next", weight = 5}]\n', "Expected `int`"),
    ('[routing.r]\nsplit = [{model = "stable", weight = 1}, {model = "stable", weight = 5}]\n', "names must differ"),
    ('[routing.r]\nsplit = [{model = "stable", weight = 1}, {model = "next", wieght = 5}]\n', "unknown field"),
    ('[routing.r]\nsticky = "user"\ncandidates = ["stable"]\n', "sticky"),
    ('[routing.r]\ncandidates = ["stable"]\nshadow = {model = "next", share = 0}\n', "share"),
    ('[routing.r]\ncandidates = ["stable"]\nshadow = {model = "next", share = 1.5}\n', "share"),
    ('[routing.r]\ncandidates = ["stable"]\nshadow = {model = "s"}\n[routing.s]\ncandidates = ["next"]\n',
     "'s' is a route"),
    ("[routing.r]\nload_wait_s = 1\n", "give `candidates`"),
])
def test_splits_and_shadows_that_make_no_sense_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        _settings(tmp_path, toml)


def test_a_split_or_shadow_naming_an_unknown_model_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"routing.r.shadow: 'nope' is not a chat model of this node"):
        _routing(tmp_path, '[routing.r]\ncandidates = ["stable"]\nshadow = {model = "nope"}\n')
    with pytest.raises(SettingsError, match=r"routing.r.shadow: 'embed'"):
        _routing(tmp_path, '[routing.r]\ncandidates = ["stable"]\nshadow = {model = "embed"}\n')
    with pytest.raises(SettingsError, match=r"candidate 'nope'"):
        _routing(tmp_path, '[routing.r]\nsplit = [{model = "stable", weight = 1}, {model = "nope", weight = 1}]\n')
    with pytest.raises(SettingsError, match=r"cycle \(r -> r\)"):
        _settings(tmp_path, '[routing.r]\nsplit = [{model = "stable", weight = 1}, {model = "r", weight = 1}]\n')


def _usage(meter: UsageMeter, rid: str, **kw: object) -> None:
    fields: dict[str, object] = dict(
        request_id=rid, ts=time.time(), tenant="acme", key_id="ak_1", model="stable", route="POST /v1/chat/completions",
        status=200, outcome="ok", prompt_tokens=10, completion_tokens=5, latency_ms=100.0, ttft_ms=20.0,
        route_path="canary>stable", variant="stable",
    )
    fields.update(kw)
    meter.record(UsageRecord(**fields))  # type: ignore[arg-type]


def test_a_record_without_a_variant_hashes_as_before_the_column_existed() -> None:
    record = UsageRecord(request_id="r", ts=1.0, tenant="t", key_id=None, model="m", route="POST /x", status=200,
                         outcome="ok")
    row = _row(record)
    old = {k: v for k, v in row.items() if k not in ("variant", "route_path")}
    old.update(route_path=None, variant=None)
    assert _digest(1, "0" * 64, row) == _digest(1, "0" * 64, old)
    with_variant = _row(UsageRecord(**{**row, "guardrails": [], "variant": "a"}))  # type: ignore[arg-type]
    assert _digest(1, "0" * 64, with_variant) != _digest(1, "0" * 64, row)


def test_feedback_is_kept_per_tenant_and_the_latest_verdict_counts(tmp_path: Path) -> None:
    conn = open_gateway_db(tmp_path)
    meter = UsageMeter(conn, {})
    store = ExperimentStore(open_gateway_db(tmp_path))
    _usage(meter, "req-1")
    first = store.add_feedback("req-1", tenant="acme", key_id="ak_1", score=-1, comment="wrong")
    assert (first.model, first.variant, first.score) == ("stable", "stable", -1)
    store.add_feedback("req-1", tenant="acme", key_id="ak_1", score=0.5, comment=None)
    with pytest.raises(RequestNotFound, match="No request 'req-1' of this tenant"):
        store.add_feedback("req-1", tenant="other", key_id=None, score=1, comment=None)
    with pytest.raises(RequestNotFound):
        store.add_feedback("made-up", tenant="acme", key_id=None, score=1, comment=None)
    assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 2  # every verdict is kept
    [report] = compare(conn, {})
    assert (report.feedback, report.feedback_mean) == (1, 0.5)
    assert meter.verify().ok  # feedback lives outside the chain


def test_compare_reports_each_variant_and_each_shadow(tmp_path: Path) -> None:
    conn = open_gateway_db(tmp_path)
    meter = UsageMeter(conn, {})
    store = ExperimentStore(open_gateway_db(tmp_path))
    for i, latency in enumerate([100.0, 200.0, 300.0, 400.0]):
        _usage(meter, f"s{i}", latency_ms=latency)
    _usage(meter, "s-hit", latency_ms=2.0, outcome="cached", prompt_tokens=0, completion_tokens=0)
    _usage(meter, "c0", model="next", variant="candidate", route_path="canary>next", latency_ms=50.0,
           prompt_tokens=100, completion_tokens=50)
    # The candidate's variant fell back to the stable model once; and one of its requests failed.
    _usage(meter, "c1", model="stable", variant="candidate", route_path="canary>next(queue_full)>stable")
    _usage(meter, "c2", model="canary", variant="candidate", status=503, outcome="error", prompt_tokens=0,
           completion_tokens=0, route_path="canary>next(queue_full)>stable(queue_full)")
    # A grounded answer whose citations did not check out, on another route without a split.
    _usage(meter, "g0", variant=None, route_path="docs>stable", retrieved_chunks=3,
           guardrails=[GuardrailAction(stage="output", kind="ungrounded", action="flag")])
    _usage(meter, "g1", variant=None, route_path="docs>stable", retrieved_chunks=2)
    _usage(meter, "plain", variant=None, route_path=None)  # not routed: not compared
    store.add_feedback("c0", tenant="acme", key_id=None, score=1, comment=None)
    base = dict(ts=time.time(), tenant="acme", route="canary", variant="stable", served_model="stable", model="next")
    store.record_shadow(ShadowRecord(request_id="s0", outcome="ok", latency_ms=80.0, ttft_ms=10.0, prompt_tokens=10,
                                     completion_tokens=4, output_sha256="a", served_output_sha256="a", **base))  # type: ignore[arg-type]
    store.record_shadow(ShadowRecord(request_id="s1", outcome="ok", latency_ms=120.0, prompt_tokens=10,
                                     completion_tokens=6, output_sha256="b", served_output_sha256="c", **base))  # type: ignore[arg-type]
    store.record_shadow(ShadowRecord(request_id="s2", outcome="skipped_busy", **base))  # type: ignore[arg-type]
    prices = {"next": Price(prompt_per_1k=1.0, completion_per_1k=2.0)}
    reports = {(r.route, r.variant): r for r in compare(conn, prices)}
    assert set(reports) == {("canary", "candidate"), ("canary", "stable"), ("docs", "stable"), ("canary", "shadow:next")}
    stable = reports[("canary", "stable")]
    # A cached answer counts as a request, not in the latencies (no model ran).
    assert (stable.requests, stable.cached, stable.latency_p50_ms, stable.latency_p95_ms) == (5, 1, 250.0, 385.0)
    assert stable.feedback == 0 and stable.feedback_mean is None and stable.grounded_rate is None
    candidate = reports[("canary", "candidate")]
    assert (candidate.requests, candidate.errors, candidate.models) == (3, 1, {"next": 1, "stable": 1})
    assert candidate.cost == pytest.approx((100 * 1.0 + 50 * 2.0) / 1000)
    assert (candidate.feedback, candidate.feedback_mean) == (1, 1.0)
    docs = reports[("docs", "stable")]
    assert (docs.grounded_answers, docs.grounded_rate) == (2, 0.5)
    shadow = reports[("canary", "shadow:next")]
    assert (shadow.shadow, shadow.requests, shadow.skipped, shadow.same_output) == (True, 2, 1, 0.5)
    assert (shadow.completion_tokens, shadow.latency_p50_ms, shadow.cost) == (10, 100.0, round((20 + 20) / 1000, 6))
    only = compare(conn, prices, route="docs")
    assert [(r.route, r.variant) for r in only] == [("docs", "stable")]
    assert compare(conn, prices, since=time.time() + 60) == []


def test_percentiles() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
