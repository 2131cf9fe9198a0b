"""Routed model ids: a virtual id (settings [routing.<name>]) names an ordered ladder of candidate models.

The rules of a route choose the ladder for a request (by tenant, by what it needs, by its length); the
ladder is then walked: a candidate that is loading past the route's wait, failed to load, has a full
queue, or timed out before its first token is passed over for the next one. When every candidate was
passed over, a cached answer to the same request (any candidate's) is served if the response cache
holds one; only then does the request fail, with 503 and Retry-After. A generation whose first token
was produced is never moved: by then the client may have output.

Every hop is reported to the request's policy (`note_route`): the gateway writes it into the usage
record, counts it in /metrics, and sends it as the `X-Route` header.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

from appliance.engines.registry import ModelRegistry
from appliance.errors import (
    ApplianceError,
    ContextLengthExceeded,
    EngineError,
    ModelNotFound,
    ModelUnavailable,
    PeerUnavailable,
    QueueTimeout,
    RequestTimeout,
    RouteUnavailable,
    ServerOverloaded,
    SettingsError,
)
from appliance.modelstore.manifest import Manifest
from appliance.protocol.openai import ChatCompletionRequest, CompletionRequest
from appliance.services.generation import Attempt, Generation, GenerationService
from appliance.services.policy import OPEN_POLICY, RequestPolicy
from appliance.settings import RouteRule, RouteSettings

log = logging.getLogger(__name__)

# Errors a candidate raises before its first token that send the request to the next candidate.
# Anything else (a bad request, a rate limit, a guardrail block) is the request's own fault: it fails as is.
_PASS_OVER = (ModelUnavailable, ServerOverloaded, RequestTimeout, EngineError, ContextLengthExceeded)


class RequestFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the rules of a route look at."""

    tenant: str
    needs: frozenset[str] = frozenset()
    """Of "response_format" (a JSON one), "tools", "collection"."""
    prompt_chars: int = 0


class RouteHop(msgspec.Struct, frozen=True):
    model: str
    outcome: str
    """"served", "cached" (the response cache answered for this candidate), "cache" (the last-resort cached
    answer), or why the candidate was passed over: loading, failed, no_room, queue_full, queue_timeout,
    timeout, context, peer_unavailable, error; in cascade mode "low_confidence" (its answer was set aside
    while the next candidate answered) and "worse" (it answered, but an answer set aside scored higher)."""


class RoutePath:
    """The hops one request took through its route."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.hops: list[RouteHop] = []

    def header(self) -> str:
        """`auto>smollm2-135m(queue_full)>gemma3-270m`: the served candidate bare, the others with why."""
        parts = [self.route]
        for hop in self.hops:
            if hop.outcome in ("served", "cached"):
                parts.append(hop.model)
            elif hop.outcome == "cache":
                parts.append(f"cache:{hop.model}")
            else:
                parts.append(f"{hop.model}({hop.outcome})")
        return ">".join(parts)


def chat_facts(request: ChatCompletionRequest, tenant: str) -> RequestFacts:
    needs = set()
    if request.response_format is not None and request.response_format.type != "text":
        needs.add("response_format")
    if request.active_tools():
        needs.add("tools")
    if request.collection is not None:
        needs.add("collection")
    chars = sum(len(m.text(i)) for i, m in enumerate(request.messages))
    return RequestFacts(tenant=tenant, needs=frozenset(needs), prompt_chars=chars)


def _matches(rule: RouteRule, facts: RequestFacts) -> bool:
    if rule.tenants is not None and facts.tenant not in rule.tenants:
        return False
    if rule.needs and not facts.needs & set(rule.needs):
        return False
    if facts.prompt_chars < rule.min_prompt_chars:
        return False
    return rule.max_prompt_chars is None or facts.prompt_chars <= rule.max_prompt_chars


class RoutingService:
    """Resolves routed model ids and walks their ladders. Plain model ids go straight to the generation service."""

    def __init__(
        self, routes: Mapping[str, RouteSettings], registry: ModelRegistry, generation: GenerationService
    ) -> None:
        """Raises SettingsError when a route names a model this node does not serve for chat, or shadows one."""
        self._routes = dict(routes)
        self._registry = registry
        self._generation = generation
        for name, route in self._routes.items():
            try:
                registry.resolve(name)
            except ModelNotFound:
                pass
            else:
                raise SettingsError(f"routing.{name}: a model already has this id or alias; name the route otherwise")
            for candidate in (*route.candidates, *(c for rule in route.rules for c in rule.use)):
                if candidate in self._routes:
                    continue
                try:
                    registry.resolve(candidate, kinds=("chat", "completion"))
                except ApplianceError as exc:
                    known = ", ".join(m.id for m in registry.manifests() if m.kind in ("chat", "completion"))
                    raise SettingsError(
                        f"routing.{name}: candidate '{candidate}' is not a chat or completion model of this node "
                        f"({exc.message} Models: {known or 'none'}; routes: {', '.join(self._routes)})"
                    ) from None

    # -- lookup --------------------------------------------------------------------------------

    def is_route(self, name: str) -> bool:
        return name in self._routes

    def route_ids(self) -> list[str]:
        return list(self._routes)

    def models_of(self, name: str) -> list[Manifest]:
        """Every model the route may use, whatever the rules say (for listing and permissions)."""
        route = self._routes[name]
        names = [*route.candidates, *(c for rule in route.rules for c in rule.use)]
        return self._expand(names, RequestFacts(tenant=""), every_rule=True)

    def ladder(self, name: str, facts: RequestFacts) -> list[Manifest]:
        """The candidates this request tries, in order: the first matching rule's, else the route's own."""
        return self._expand([name], facts)

    def _expand(self, names: list[str], facts: RequestFacts, *, every_rule: bool = False) -> list[Manifest]:
        out: dict[str, Manifest] = {}

        def add(name: str) -> None:
            route = self._routes.get(name)
            if route is None:
                manifest = self._registry.resolve(name)
                out.setdefault(manifest.id, manifest)
                return
            if every_rule:
                chosen = [*route.candidates, *(c for rule in route.rules for c in rule.use)]
            else:
                rule = next((r for r in route.rules if _matches(r, facts)), None)
                chosen = route.candidates if rule is None else rule.use
            for candidate in chosen:
                add(candidate)  # settings refused cycles, so this ends

        for name in names:
            add(name)
        return list(out.values())

    # -- serving -------------------------------------------------------------------------------

    async def chat(
        self, request: ChatCompletionRequest, policy: RequestPolicy = OPEN_POLICY, *, tenant: str = "",
        cache_scope: str | None = None,
    ) -> Generation:
        """A chat on the model the request names, or on the first candidate of its route that can serve it."""
        if not self.is_route(request.model):
            return await self._generation.chat(request, policy, cache_scope=cache_scope)
        request.check()
        facts = chat_facts(request, tenant)
        candidates = self._allowed(self.ladder(request.model, facts), request.model, policy)
        texts = await asyncio.to_thread(self._generation.screen_chat, request, policy)

        async def start(manifest: Manifest, attempt: Attempt) -> Generation:
            if manifest.kind != "chat":
                raise _NotForThis()
            return await self._generation.start_chat(
                manifest, request, texts, policy, cache_scope=cache_scope, attempt=attempt
            )

        async def cached(manifest: Manifest) -> Generation | None:
            if manifest.kind != "chat":
                return None
            return await asyncio.to_thread(self._generation.cached_chat, manifest, request, texts, policy, tenant)

        return await self._walk(request.model, candidates, policy, start, cached, whole=not request.stream and request.n == 1)

    async def complete(
        self, request: CompletionRequest, policy: RequestPolicy = OPEN_POLICY, *, tenant: str = "",
        cache_scope: str | None = None,
    ) -> Generation:
        if not self.is_route(request.model):
            return await self._generation.complete(request, policy, cache_scope=cache_scope)
        request.check()
        facts = RequestFacts(tenant=tenant, prompt_chars=len(request.prompt_text))
        candidates = self._allowed(self.ladder(request.model, facts), request.model, policy)
        [prompt] = await asyncio.to_thread(policy.screen_input, [request.prompt_text])

        async def start(manifest: Manifest, attempt: Attempt) -> Generation:
            return await self._generation.start_completion(
                manifest, request, prompt, policy, cache_scope=cache_scope, attempt=attempt
            )

        async def cached(manifest: Manifest) -> Generation | None:
            return await asyncio.to_thread(self._generation.cached_completion, manifest, request, prompt, policy, tenant)

        return await self._walk(request.model, candidates, policy, start, cached, whole=not request.stream and request.n == 1)

    async def grounded(
        self, name: str, tenant: str, policy: RequestPolicy, run: Callable[[str], Awaitable[Any]], *, whole: bool
    ) -> Any:
        """A grounded answer (`collection`) on a route: `run(model_id)` per candidate until one starts.

        Retrieval runs again for each candidate tried; the wait for a loading model is models.load_timeout_s.
        `whole`: `run` returns a finished Answer (not a stream), which cascade mode may set aside when it is
        not grounded.
        """
        facts = RequestFacts(tenant=tenant, needs=frozenset({"collection"}))
        candidates = self._allowed(self.ladder(name, facts), name, policy)

        async def start(manifest: Manifest, attempt: Attempt) -> Any:
            return await run(manifest.id)

        async def cached(manifest: Manifest) -> None:
            return None

        return await self._walk(name, candidates, policy, start, cached, whole=whole, assess=_by_grounding)

    def _allowed(self, candidates: list[Manifest], name: str, policy: RequestPolicy) -> list[Manifest]:
        """The candidates the caller may use; the route exists for a caller who may use one of them."""
        allowed = []
        for manifest in candidates:
            try:
                policy.allow_model(manifest)
            except ModelNotFound:
                continue
            allowed.append(manifest)
        if not allowed:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        return allowed

    async def _walk(
        self,
        name: str,
        candidates: list[Manifest],
        policy: RequestPolicy,
        start: Callable[[Manifest, Attempt], Awaitable[Any]],
        cached: Callable[[Manifest], Awaitable[Generation | None]],
        *,
        whole: bool = False,
        assess: Callable[[Any, float], Awaitable[tuple[Any, float, bool]]] | None = None,
    ) -> Any:
        """Try `candidates` in order. With `whole` (the client takes the answer in one piece) and the route in
        cascade mode, each answer is judged by `assess` (default: its mean token logprob) and a doubtful one
        is kept aside while the next candidate answers; the best-scoring answer is returned."""
        route = self._routes[name]
        cascade = whole and route.mode == "cascade"
        assess = (assess or _by_logprob) if cascade else None
        attempt = Attempt(load_wait_s=route.load_wait_s, fit_context=True, logprobs=cascade)
        path = RoutePath(name)
        errors: list[ApplianceError] = []
        kept: list[tuple[float, int, Any]] = []  # (score, hop index, answer) of doubtful answers set aside
        try:
            for i, manifest in enumerate(candidates):
                try:
                    result = await start(manifest, attempt)
                    if assess is not None:
                        result, score, good = await assess(result, route.cascade_min_logprob)
                except _NotForThis:
                    path.hops.append(RouteHop(manifest.id, "unsupported"))
                    continue
                except _PASS_OVER as exc:
                    reason = self._reason(manifest, exc)
                    log.info("route %s: %s passed over (%s): %s", name, manifest.id, reason, exc.message)
                    path.hops.append(RouteHop(manifest.id, reason))
                    errors.append(exc)
                    continue
                served = "cached" if getattr(result, "cached", False) else "served"
                if assess is None or good or i == len(candidates) - 1:
                    if kept and assess is not None and not good and max(kept, key=_score)[0] > score:
                        path.hops.append(RouteHop(manifest.id, "worse"))
                        return _choose(kept, path)  # an answer set aside earlier scored better
                    path.hops.append(RouteHop(manifest.id, served))
                    return result
                log.info("route %s: %s answered with low confidence (%.3f): asking the next", name, manifest.id, score)
                kept.append((score, len(path.hops), result))
                path.hops.append(RouteHop(manifest.id, "low_confidence"))
            if kept:  # the later candidates failed: the best answer set aside stands
                return _choose(kept, path)
            if errors and all(isinstance(e, ContextLengthExceeded) for e in errors):
                raise errors[-1]  # the request is too long for every candidate: the caller's to fix
            if route.cached_fallback:
                for manifest in candidates:
                    found = await cached(manifest)
                    if found is not None:
                        path.hops.append(RouteHop(manifest.id, "cache"))
                        return found
            hints = [e.retry_after for e in errors if e.retry_after is not None]
            raise RouteUnavailable(
                f"No model of '{name}' can serve this request now ({path.header()}); retry shortly.",
                param="model", retry_after=min(hints) if hints else None,
            )
        finally:
            policy.note_route(name, [(h.model, h.outcome) for h in path.hops], path.header())

    def _reason(self, manifest: Manifest, exc: ApplianceError) -> str:
        if isinstance(exc, ContextLengthExceeded):
            return "context"
        if isinstance(exc, QueueTimeout):
            return "queue_timeout"
        if isinstance(exc, ServerOverloaded):
            return "queue_full"
        if isinstance(exc, RequestTimeout):
            return "timeout"
        if isinstance(exc, PeerUnavailable):
            return "peer_unavailable"
        if isinstance(exc, ModelUnavailable):
            state = self._registry.status()[manifest.id]["state"]
            return {"failed": "failed", "unloaded": "no_room"}.get(state, "loading")
        return "error"


def _score(entry: tuple[float, int, Any]) -> float:
    return entry[0]


def _choose(kept: list[tuple[float, int, Any]], path: RoutePath) -> Any:
    """The best-scoring answer set aside; its hop becomes the served one."""
    _, hop, answer = max(kept, key=_score)
    path.hops[hop] = RouteHop(path.hops[hop].model, "served")
    return answer


async def _by_logprob(generation: Generation, floor: float) -> tuple[Generation, float, bool]:
    """Cascade mode's confidence: the mean log-probability of the answer's tokens (a cached answer, which
    has none, is trusted)."""
    whole, logprobs = await generation.replay()
    if not logprobs:
        return whole, 0.0, True
    mean = sum(t.logprob for t in logprobs) / len(logprobs)
    return whole, mean, mean >= floor


async def _by_grounding(answer: Any, floor: float) -> tuple[Any, float, bool]:
    """A grounded answer is trusted when its citations check out (or it had no sources to cite)."""
    good = bool(answer.grounded or not answer.sources)
    return answer, 1.0 if good else 0.0, good


class _NotForThis(Exception):
    """A candidate of a kind that cannot serve this endpoint (a completion model for a chat)."""
