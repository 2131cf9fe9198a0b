"""Prometheus metrics (prometheus_client) in one registry per app: no process globals.

Request, token, guardrail and limiter series are updated as requests finish; engine gauges (queue
depth, busy slots, prefix-cache hit rate) are read from the model registry at scrape time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.types import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


_MODEL_STATES = ("pending", "loading", "ready", "failed", "unloaded")


class _EngineCollector(Collector):
    def __init__(
        self,
        status: Callable[[], dict[str, dict[str, Any]]],
        memory: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self._status = status
        self._memory = memory

    def collect(self) -> Iterable[Any]:
        state = GaugeMetricFamily("appliance_model_ready", "1 when the model is loaded and serving", labels=["model"])
        states = GaugeMetricFamily(
            "appliance_model_state", "1 for the model's load state (pending, loading, ready, failed, unloaded)",
            labels=["model", "state"],
        )
        loads = CounterMetricFamily("appliance_model_loads", "Times the model was loaded", labels=["model"])
        unloads = CounterMetricFamily(
            "appliance_model_unloads", "Times the model was unloaded to make room (models.max_memory)", labels=["model"]
        )
        estimate = GaugeMetricFamily(
            "appliance_model_memory_estimate_bytes", "Estimated resident memory of the model when loaded",
            labels=["model"],
        )
        queue = GaugeMetricFamily("appliance_queue_depth", "Requests waiting for a batch slot", labels=["model"])
        busy = GaugeMetricFamily("appliance_busy_slots", "Sequences generating now", labels=["model"])
        hit = GaugeMetricFamily(
            "appliance_prefix_cache_hit_ratio", "Share of prompt tokens served from the prefix cache", labels=["model"]
        )
        prompt = CounterMetricFamily(
            "appliance_engine_prompt_tokens", "Prompt tokens the engine processed", labels=["model"]
        )
        prefix = CounterMetricFamily(
            "appliance_engine_prefix_hit_tokens", "Prompt tokens reused from the prefix cache", labels=["model"]
        )
        speculated = CounterMetricFamily(
            "appliance_speculative_tokens",
            "Tokens guessed by prompt lookup and decoded for checking (drafted), and those the model kept (accepted)",
            labels=["model", "outcome"],
        )
        for model, s in self._status().items():
            state.add_metric([model], 1.0 if s["state"] == "ready" else 0.0)
            for name in _MODEL_STATES:
                states.add_metric([model, name], 1.0 if s["state"] == name else 0.0)
            loads.add_metric([model], s.get("loads", 0))
            unloads.add_metric([model], s.get("unloads", 0))
            if "memory_estimate_bytes" in s:
                estimate.add_metric([model], s["memory_estimate_bytes"])
            engine: EngineStats | None = s.get("engine")
            if engine is None:
                continue
            queue.add_metric([model], engine.queue_depth)
            busy.add_metric([model], engine.busy_slots)
            hit.add_metric([model], engine.prefix_cache_hit_rate)
            prompt.add_metric([model], engine.prompt_tokens)
            prefix.add_metric([model], engine.prefix_hit_tokens)
            speculated.add_metric([model, "drafted"], engine.drafted_tokens)
            speculated.add_metric([model, "accepted"], engine.accepted_tokens)
        yield from (state, states, loads, unloads, estimate, queue, busy, hit, prompt, prefix, speculated)
        if self._memory is not None:
            memory = self._memory()
            if memory["limit_bytes"]:
                yield GaugeMetricFamily(
                    "appliance_models_memory_limit_bytes", "models.max_memory in bytes", value=memory["limit_bytes"]
                )
                yield GaugeMetricFamily(
                    "appliance_models_memory_used_bytes", "Estimated memory of the models loaded or loading",
                    value=memory["used_bytes"],
                )


class LoopLag:
    """How late the event loop runs a timer: a task sleeps `interval_s` again and again and records by how
    much each wake-up overshot. Anything that blocks the loop (a CPU-bound call, a lock) shows up here."""

    def __init__(self, registry: CollectorRegistry, interval_s: float = 0.02, window: int = 6000) -> None:
        self.interval_s = interval_s
        self.samples: deque[float] = deque(maxlen=window)
        """The latest lags in seconds (the last two minutes at the default interval)."""
        self.histogram = Histogram(
            "appliance_event_loop_lag_seconds", "How late the event loop ran a timer (blocking work on the loop)",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=registry,
        )
        registry.register(_LagCollector(self))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - start - self.interval_s)
            self.samples.append(lag)
            self.histogram.observe(lag)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class _LagCollector(Collector):
    def __init__(self, lag: LoopLag) -> None:
        self._lag = lag

    def collect(self) -> Iterable[Any]:
        gauge = GaugeMetricFamily(
            "appliance_event_loop_lag_recent_seconds", "Event loop lag quantiles over the latest samples",
            labels=["quantile"],
        )
        for q in (0.5, 0.99, 1.0):
            gauge.add_metric([str(q)], self._lag.quantile(q))
        yield gauge


class Metrics:
    def __init__(
        self,
        engine_status: Callable[[], dict[str, dict[str, Any]]] | None = None,
        model_memory: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "appliance_requests", "HTTP requests by route, status and tenant", ["route", "status", "tenant"], registry=r
        )
        self.latency = Histogram(
            "appliance_request_seconds", "Request latency (to the last byte)", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "appliance_time_to_first_token_seconds", "Time to the first generated token", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "appliance_time_per_output_token_seconds", "Mean time per generated token after the first", ["model"],
            buckets=_TPOT_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "appliance_tokens", "Tokens by direction (prompt, completion, embedding), model and tenant",
            ["direction", "model", "tenant"], registry=r,
        )
        self.retrieval = Histogram(
            "appliance_retrieval_seconds", "Document search latency (query embedding included)", ["mode"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.guardrails = Counter(
            "appliance_guardrail_actions", "Guardrail actions by stage, kind and action",
            ["stage", "kind", "action"], registry=r,
        )
        self.rejections = Counter(
            "appliance_limiter_rejections", "Requests refused by rate limits or budgets", ["reason", "tenant"],
            registry=r,
        )
        self.cache = Counter("appliance_response_cache", "Response cache lookups by result", ["result"], registry=r)
        self.forwards = Counter(
            "appliance_forwarded_requests", "Requests forwarded to peer appliances", ["peer", "outcome"], registry=r
        )
        self.route_hops = Counter(
            "appliance_route_hops",
            "Candidates tried by routed model ids: served, cached, cache (last-resort answer) or why passed over",
            ["route", "model", "outcome"], registry=r,
        )
        self.routed = Counter(
            "appliance_routed_requests",
            "Requests to routed model ids by result: first (first candidate), fallback (a later one), unavailable (503)",
            ["route", "result"], registry=r,
        )
        self.shadow = Counter(
            "appliance_shadow_requests",
            "Shadow copies of routed requests by outcome: ok, error, skipped_busy, skipped_not_ready, skipped_not_allowed",
            ["route", "model", "outcome"], registry=r,
        )
        if engine_status is not None:
            r.register(_EngineCollector(engine_status, model_memory))
        self.loop_lag = LoopLag(r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
