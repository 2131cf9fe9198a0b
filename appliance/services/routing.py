"""Routed model ids: a virtual id (settings [routing.<name>]) names an ordered ladder of candidate models.

The rules of a route choose the ladder for a request (by tenant, by what it needs, by its length); the
ladder is then walked: a candidate that is loading past the route's wait, failed to load, has a full
queue, or timed out before its first token is passed over for the next one. When every candidate was
passed over, a cached answer to the same request (any candidate's) is served if the response cache
holds one; only then does the request fail, with 503 and Retry-After. A generation whose first token
was produced is never moved: by then the client may have output.

Candidates may be served by cluster peers: a name this node does not serve is forwarded to an up peer that
serves it, and a local candidate passed over is tried on a peer that serves it too before the next candidate
(local model, then a peer). A peer is tried only before any output, through the `RoutePeers` the API edge
hands in; its hop is `model@peer`. A peer that cannot be reached or answers 429/502/503 is passed over
(`peer_unavailable`), a name no peer reports is passed over as `unknown`.

Every hop is reported to the request's policy (`note_route`): the gateway writes it into the usage
record, counts it in /metrics, and sends it as the `X-Route` header.

Traffic shaping, for changing models safely: a route's `split` gives each request a variant by weight
(canary, A/B), the same one for the same API key or conversation (a hash, no state); its `shadow` copies a
share of the requests to a candidate model after the served answer is complete, and hands the candidate's
answer to the policy (`note_shadow`) to be recorded beside the served one. The client never sees it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

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
from appliance.peering.forward import Forwarded, PeerReach
from appliance.policy.experiments import ShadowOutcome, ShadowRecord
from appliance.protocol.openai import ChatCompletionRequest, CompletionRequest
from appliance.services.generation import Attempt, Generation, GenerationService
from appliance.services.policy import OPEN_POLICY, OpenPolicy, OutputFilter, RequestPolicy
from appliance.settings import RouteRule, RouteSettings, ShadowSettings, SplitVariant
from appliance.types import Chunk

log = logging.getLogger(__name__)

# A peer's answers that send the request on (the outcome in its hop); other statuses are relayed as they are.
_PEER_STATUS = {429: "peer_unavailable", 502: "peer_unavailable", 503: "peer_unavailable", 504: "timeout",
                404: "unknown", 500: "error"}
# Errors a candidate raises before its first token that send the request to the next candidate.
# Anything else (a bad request, a rate limit, a guardrail block) is the request's own fault: it fails as is.
_PASS_OVER = (ModelUnavailable, ServerOverloaded, RequestTimeout, EngineError, ContextLengthExceeded)


class RoutePeers(Protocol):
    """How one routed request reaches the cluster's peers (peering/forward.py's RouteForwarder)."""

    def allows(self, model: str) -> bool:
        """Whether the caller may use `model` (its tenant's allowed_models)."""

    def reach(self, model: str) -> PeerReach:
        """Whether an up peer serves `model`, only unreachable ones do, or none."""

    def known_by(self, model: str) -> list[str]:
        """The peers that reported serving `model`, up or not."""

    async def forward(self, model: str, tried: set[str]) -> Forwarded:
        """The request on a peer serving `model`; PeerUnavailable when none could be reached."""


Candidate = Manifest | str
"""A rung of a ladder: a model of this node, or the name of one only cluster peers may serve."""


class RequestFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the rules of a route look at."""

    tenant: str
    needs: frozenset[str] = frozenset()
    """Of "response_format" (a JSON one), "tools", "collection"."""
    prompt_chars: int = 0
    caller: str = ""
    """The API key id (the tenant without keys): what `sticky = "key"` hashes."""
    conversation: str = ""
    """The client's X-Conversation-Id, else a digest of the first system and user messages (`sticky = "conversation"`)."""


class RouteHop(msgspec.Struct, frozen=True):
    model: str
    outcome: str
    """"served", "cached" (the response cache answered for this candidate), "cache" (the last-resort cached
    answer), or why the candidate was passed over: loading, failed, no_room, queue_full, queue_timeout,
    timeout, context, peer_unavailable, unknown (no peer serves it), unsupported, error; "rejected" (a peer
    refused the request itself, e.g. 400: its answer is relayed); in cascade mode "low_confidence" (its answer
    was set aside while the next candidate answered) and "worse" (it answered, but an answer set aside scored
    higher). A peer's hop names the model `model@peer`."""


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


def conversation_of(texts: list[str]) -> str:
    """A conversation's id when the client sent none: every turn of a chat re-sends its opening messages."""
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:32]


def chat_facts(request: ChatCompletionRequest, tenant: str, policy: RequestPolicy = OPEN_POLICY) -> RequestFacts:
    needs = set()
    if request.response_format is not None and request.response_format.type != "text":
        needs.add("response_format")
    if request.active_tools():
        needs.add("tools")
    if request.collection is not None:
        needs.add("collection")
    chars = sum(len(m.text(i)) for i, m in enumerate(request.messages))
    caller, conversation = policy.affinity()
    if conversation is None:
        opening = [next((m.text(i) for i, m in enumerate(request.messages) if m.role == role), "") for role in ("system", "user")]
        conversation = conversation_of(opening)
    return RequestFacts(tenant=tenant, needs=frozenset(needs), prompt_chars=chars, caller=caller or tenant,
                        conversation=conversation)


def split_point(route: str, sticky_id: str) -> float:
    """Where in [0, 1) a key or conversation falls in a route's split: the same place for the same id, and
    independent between routes. Variants take consecutive ranges in the order listed, so raising the last
    variant's weight only moves ids onto it."""
    digest = hashlib.sha256(f"{route}\0{sticky_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_variant(name: str, route: RouteSettings, facts: RequestFacts) -> SplitVariant:
    """The variant of `route`'s split this request is given (by `route.sticky`)."""
    sticky_id = {"key": facts.caller or facts.tenant, "conversation": facts.conversation or facts.caller}.get(route.sticky)
    point = random.random() if sticky_id is None else split_point(name, sticky_id)
    target = point * sum(v.weight for v in route.split)
    reached = 0
    for variant in route.split:
        reached += variant.weight
        if variant.weight and target < reached:
            return variant
    return next(v for v in reversed(route.split) if v.weight)  # float rounding at the very top


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
        self, routes: Mapping[str, RouteSettings], registry: ModelRegistry, generation: GenerationService,
        *, slots: int = 1, peers: bool = False,
    ) -> None:
        """Raises SettingsError when a route names a model this node does not serve for chat, or shadows one.

        `slots`: generations a model runs at once (models.parallel); a shadow model with all of them busy,
        or anyone waiting, is not given shadow copies. `peers`: this node has cluster peers ([cluster] with
        peers and a secret): a candidate this node does not have is left to them (it is looked for on the
        peers per request). A name that is a model here of the wrong kind is refused all the same."""
        self._routes = dict(routes)
        self._registry = registry
        self._generation = generation
        self._slots = slots
        self._peers = peers
        self._shadows_running: dict[str, int] = {}
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        for name, route in self._routes.items():
            try:
                registry.resolve(name)
            except ModelNotFound:
                pass
            else:
                raise SettingsError(f"routing.{name}: a model already has this id or alias; name the route otherwise")
            if route.shadow is not None:
                try:
                    registry.resolve(route.shadow.model, kinds=("chat",))
                except ApplianceError as exc:
                    known = ", ".join(m.id for m in registry.manifests() if m.kind == "chat")
                    raise SettingsError(
                        f"routing.{name}.shadow: '{route.shadow.model}' is not a chat model of this node "
                        f"({exc.message} Chat models: {known or 'none'})"
                    ) from None
            for candidate in route.names():
                if candidate in self._routes:
                    continue
                try:
                    registry.resolve(candidate, kinds=("chat", "completion"))
                except ModelNotFound as exc:
                    if peers:
                        log.info("routing.%s: candidate '%s' is not a model of this node: left to the cluster's peers",
                                 name, candidate)
                        continue
                    raise self._unknown(name, candidate, exc) from None
                except ApplianceError as exc:
                    raise self._unknown(name, candidate, exc) from None

    def _unknown(self, name: str, candidate: str, exc: ApplianceError) -> SettingsError:
        known = ", ".join(m.id for m in self._registry.manifests() if m.kind in ("chat", "completion"))
        hint = "; a model only cluster peers serve needs [cluster] peers" if isinstance(exc, ModelNotFound) else ""
        return SettingsError(
            f"routing.{name}: candidate '{candidate}' is not a chat or completion model of this node "
            f"({exc.message} Models: {known or 'none'}; routes: {', '.join(self._routes)}{hint})"
        )

    # -- lookup --------------------------------------------------------------------------------

    def is_route(self, name: str) -> bool:
        return name in self._routes

    def route_ids(self) -> list[str]:
        return list(self._routes)

    def models_of(self, name: str) -> list[Manifest]:
        """Every model of this node the route may use, whatever the rules say (for listing and permissions)."""
        everything = self._expand(self._routes[name].names(), RequestFacts(tenant=""), every_rule=True)
        return [c for c in everything if isinstance(c, Manifest)]

    def remote_of(self, name: str) -> list[str]:
        """The candidates of the route that only cluster peers may serve, whatever the rules say."""
        everything = self._expand(self._routes[name].names(), RequestFacts(tenant=""), every_rule=True)
        return [c for c in everything if isinstance(c, str)]

    def ladder(self, name: str, facts: RequestFacts) -> list[Candidate]:
        """The candidates this request tries, in order: the first matching rule's, else the split variant's
        model then the other variants', else the route's own candidates."""
        return self._expand([name], facts)

    def plan(self, name: str, facts: RequestFacts) -> tuple[list[Candidate], str | None]:
        """The ladder, and the split variant the request was given (None: no split decided it)."""
        variants: list[str] = []
        return self._expand([name], facts, variants=variants), (variants[0] if variants else None)

    def _expand(
        self, names: list[str], facts: RequestFacts, *, every_rule: bool = False, variants: list[str] | None = None
    ) -> list[Candidate]:
        out: dict[str, Candidate] = {}

        def add(name: str) -> None:
            route = self._routes.get(name)
            if route is None:
                try:
                    manifest = self._registry.resolve(name)
                except ModelNotFound:
                    if not self._peers:
                        raise
                    out.setdefault(name, name)  # settings let it through: the peers' (or nobody's)
                    return
                out.setdefault(manifest.id, manifest)
                return
            if every_rule:
                chosen = route.names()
            elif (rule := next((r for r in route.rules if _matches(r, facts)), None)) is not None:
                chosen = rule.use
            elif route.split:
                variant = choose_variant(name, route, facts)
                if variants is not None:
                    variants.append(variant.label)
                # A variant's model falls back to the other variants' (weight 0: not even as a fallback).
                others = [v.model for v in route.split if v is not variant and v.weight]
                chosen = [variant.model, *others, *route.candidates]
            else:
                chosen = route.candidates
            for candidate in chosen:
                add(candidate)  # settings refused cycles, so this ends

        for name in names:
            add(name)
        return list(out.values())

    # -- serving -------------------------------------------------------------------------------

    async def chat(
        self, request: ChatCompletionRequest, policy: RequestPolicy = OPEN_POLICY, *, tenant: str = "",
        cache_scope: str | None = None, peers: RoutePeers | None = None,
    ) -> Generation | Forwarded:
        """A chat on the model the request names, or on the first candidate of its route that can serve it.

        `peers`: the way to the cluster's peers for this request (None: candidates only peers serve are
        passed over); a peer's answer comes back as it is, to be relayed."""
        if not self.is_route(request.model):
            return await self._generation.chat(request, policy, cache_scope=cache_scope)
        request.check()
        facts = chat_facts(request, tenant, policy)
        ladder, variant = self.plan(request.model, facts)
        candidates = self._allowed(ladder, request.model, policy, peers)
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

        served = await self._walk(
            request.model, candidates, policy, start, cached, whole=not request.stream and request.n == 1,
            variant=variant, peers=peers,
        )
        if isinstance(served, Forwarded):
            return served  # a peer answered: its answer is relayed, not shadowed
        shadow_request = msgspec.structs.replace(request, n=1, stream=False, stream_options=None, priority="batch")

        async def shadow(manifest: Manifest, shadow_policy: RequestPolicy) -> Generation:
            return await self._generation.start_chat(
                manifest, shadow_request, texts, shadow_policy, attempt=Attempt(load_wait_s=1.0)
            )

        self._shadow(request.model, variant, served, policy, shadow)
        return served

    async def complete(
        self, request: CompletionRequest, policy: RequestPolicy = OPEN_POLICY, *, tenant: str = "",
        cache_scope: str | None = None, peers: RoutePeers | None = None,
    ) -> Generation | Forwarded:
        if not self.is_route(request.model):
            return await self._generation.complete(request, policy, cache_scope=cache_scope)
        request.check()
        caller, conversation = policy.affinity()
        facts = RequestFacts(tenant=tenant, prompt_chars=len(request.prompt_text), caller=caller or tenant,
                             conversation=conversation or conversation_of([request.prompt_text]))
        ladder, variant = self.plan(request.model, facts)
        candidates = self._allowed(ladder, request.model, policy, peers)
        [prompt] = await asyncio.to_thread(policy.screen_input, [request.prompt_text])

        async def start(manifest: Manifest, attempt: Attempt) -> Generation:
            return await self._generation.start_completion(
                manifest, request, prompt, policy, cache_scope=cache_scope, attempt=attempt
            )

        async def cached(manifest: Manifest) -> Generation | None:
            return await asyncio.to_thread(self._generation.cached_completion, manifest, request, prompt, policy, tenant)

        served = await self._walk(
            request.model, candidates, policy, start, cached, whole=not request.stream and request.n == 1,
            variant=variant, peers=peers,
        )
        if isinstance(served, Forwarded):
            return served
        shadow_request = msgspec.structs.replace(request, n=1, stream=False, stream_options=None, priority="batch",
                                                 echo=False)

        async def shadow(manifest: Manifest, shadow_policy: RequestPolicy) -> Generation:
            return await self._generation.start_completion(
                manifest, shadow_request, prompt, shadow_policy, attempt=Attempt(load_wait_s=1.0)
            )

        self._shadow(request.model, variant, served, policy, shadow)
        return served

    async def grounded(
        self, name: str, tenant: str, policy: RequestPolicy, run: Callable[[str], Awaitable[Any]], *, whole: bool
    ) -> Any:
        """A grounded answer (`collection`) on a route: `run(model_id)` per candidate until one starts.

        Retrieval runs again for each candidate tried; the wait for a loading model is models.load_timeout_s.
        `whole`: `run` returns a finished Answer (not a stream), which cascade mode may set aside when it is
        not grounded.
        """
        caller, conversation = policy.affinity()
        facts = RequestFacts(tenant=tenant, needs=frozenset({"collection"}), caller=caller or tenant,
                             conversation=conversation or "")
        ladder, variant = self.plan(name, facts)
        candidates = self._allowed(ladder, name, policy)

        async def start(manifest: Manifest, attempt: Attempt) -> Any:
            return await run(manifest.id)

        async def cached(manifest: Manifest) -> None:
            return None

        return await self._walk(name, candidates, policy, start, cached, whole=whole, assess=_by_grounding,
                                variant=variant)

    def _allowed(
        self, candidates: list[Candidate], name: str, policy: RequestPolicy, peers: RoutePeers | None = None
    ) -> list[Candidate]:
        """The candidates the caller may use; the route exists for a caller who may use one of them."""
        allowed: list[Candidate] = []
        for candidate in candidates:
            if isinstance(candidate, str):
                if peers is None or peers.allows(candidate):
                    allowed.append(candidate)
                continue
            try:
                policy.allow_model(candidate)
            except ModelNotFound:
                continue
            allowed.append(candidate)
        if not allowed:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        return allowed

    async def _walk(
        self,
        name: str,
        candidates: list[Candidate],
        policy: RequestPolicy,
        start: Callable[[Manifest, Attempt], Awaitable[Any]],
        cached: Callable[[Manifest], Awaitable[Generation | None]],
        *,
        whole: bool = False,
        assess: Callable[[Any, float], Awaitable[tuple[Any, float, bool]]] | None = None,
        variant: str | None = None,
        peers: RoutePeers | None = None,
    ) -> Any:
        """Try `candidates` in order. With `whole` (the client takes the answer in one piece) and the route in
        cascade mode, each answer is judged by `assess` (default: its mean token logprob) and a doubtful one
        is kept aside while the next candidate answers; the best-scoring answer is returned.

        A candidate only peers serve is forwarded to one (`peers`); a local candidate passed over is tried on
        a peer that serves it before the next candidate. A peer's answer is returned as it is (a Forwarded)."""
        route = self._routes[name]
        cascade = whole and route.mode == "cascade"
        assess = (assess or _by_logprob) if cascade else None
        attempt = Attempt(load_wait_s=route.load_wait_s, fit_context=True, logprobs=cascade)
        path = RoutePath(name)
        errors: list[ApplianceError] = []
        kept: list[tuple[float, int, Any]] = []  # (score, hop index, answer) of doubtful answers set aside
        try:
            for i, manifest in enumerate(candidates):
                if isinstance(manifest, str):  # only peers may serve it
                    if (answer := await self._on_peer(name, manifest, peers, path, errors)) is not None:
                        return answer
                    continue
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
                    # Local, then a peer serving the same model (not for a prompt too long: it is as long there).
                    if reason != "context" and peers is not None and peers.reach(manifest.id) == "up":
                        if (answer := await self._on_peer(name, manifest.id, peers, path, errors)) is not None:
                            return answer
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
                    if isinstance(manifest, str):
                        continue
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
            policy.note_route(name, [(h.model, h.outcome) for h in path.hops], path.header(), variant)

    async def _on_peer(
        self, name: str, model: str, peers: RoutePeers | None, path: RoutePath, errors: list[ApplianceError]
    ) -> Forwarded | None:
        """Forward the request to a peer serving `model`: its answer (relayed as it is, including a refusal
        that is the request's own fault), or None when it is passed over (the hop says why)."""
        if peers is None:  # this request cannot go to a peer (grounded, /v1/responses, forwarded here)
            path.hops.append(RouteHop(model, "unsupported"))
            return None
        reach = peers.reach(model)
        if reach == "none":
            log.info("route %s: no peer serves %s", name, model)
            path.hops.append(RouteHop(model, "unknown"))
            return None
        tried: set[str] = set()
        try:
            answer = await peers.forward(model, tried)
        except PeerUnavailable as exc:
            where = "+".join(sorted(tried) or peers.known_by(model))
            log.info("route %s: %s on peers passed over: %s", name, model, exc.message)
            path.hops.append(RouteHop(f"{model}@{where}", "peer_unavailable"))
            errors.append(exc)
            return None
        hop = f"{model}@{answer.peer}"
        outcome = _PEER_STATUS.get(answer.status)
        if outcome is None:
            path.hops.append(RouteHop(hop, "served" if answer.status < 400 else "rejected"))
            return answer
        log.info("route %s: peer %s answered %d for %s: passed over", name, answer.peer, answer.status, model)
        path.hops.append(RouteHop(hop, outcome))
        retry = answer.headers.get("retry-after", "")
        errors.append(PeerUnavailable(f"Peer {answer.peer} answered {answer.status}.",
                                      retry_after=int(retry) if retry.isdigit() else None))
        return None

    # -- shadows -------------------------------------------------------------------------------

    def _shadow(
        self, name: str, variant: str | None, served: Generation, policy: RequestPolicy,
        launch: Callable[[Manifest, RequestPolicy], Awaitable[Generation]],
    ) -> None:
        """Draw whether this request is copied to the route's shadow model; if so, run the copy once the
        served answer is complete (an answer the client abandons is not shadowed)."""
        settings = self._routes[name].shadow
        if settings is None or random.random() >= settings.share:
            return
        manifest = self._registry.resolve(settings.model, kinds=("chat",))
        base = ShadowRecord(request_id="", ts=time.time(), tenant=None, route=name, variant=variant,
                            served_model=served.manifest.id, model=manifest.id, outcome="ok")
        try:
            policy.allow_model(manifest)  # a tenant kept off a model does not reach it through a shadow either
        except ModelNotFound:
            self._spawn(asyncio.to_thread(policy.note_shadow, msgspec.structs.replace(base, outcome="skipped_not_allowed")))
            return
        parts: list[str] = []

        def watch(chunk: Chunk) -> None:
            if chunk.index == 0:
                parts.append(chunk.text)
            if chunk.usage is not None:
                text = "".join(parts)
                record = msgspec.structs.replace(
                    base, served_output_sha256=_sha256(text), served_output=text[: settings.keep_chars]
                )
                self._spawn(self._run_shadow(name, settings, manifest, record, policy, launch))

        served.observe(watch)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._shadow_tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._shadow_tasks.discard)

    def _shadow_room(self, name: str, settings: ShadowSettings, manifest: Manifest) -> ShadowOutcome | None:
        """Why the shadow copy may not run now (None: it may). A shadow never loads a model, never queues
        behind real traffic, and never runs more than `max_concurrent` copies of a route at once."""
        if self._shadows_running.get(name, 0) >= settings.max_concurrent:
            return "skipped_busy"
        status = self._registry.status().get(manifest.engine_id, {})
        if status.get("state") != "ready":
            return "skipped_not_ready"
        stats = status.get("engine")
        if stats is not None and (stats.queue_depth > 0 or stats.busy_slots >= self._slots):
            return "skipped_busy"
        return None

    async def _run_shadow(
        self, name: str, settings: ShadowSettings, manifest: Manifest, record: ShadowRecord, policy: RequestPolicy,
        launch: Callable[[Manifest, RequestPolicy], Awaitable[Generation]],
    ) -> None:
        try:
            skipped = self._shadow_room(name, settings, manifest)
            if skipped is not None:
                log.info("route %s: shadow copy to %s skipped (%s)", name, manifest.id, skipped)
                record = msgspec.structs.replace(record, outcome=skipped)
            else:
                record = await self._shadow_answer(name, settings, manifest, record, policy, launch)
            await asyncio.to_thread(policy.note_shadow, record)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("route %s: recording the shadow answer of %s failed", name, manifest.id)

    async def _shadow_answer(
        self, name: str, settings: ShadowSettings, manifest: Manifest, record: ShadowRecord, policy: RequestPolicy,
        launch: Callable[[Manifest, RequestPolicy], Awaitable[Generation]],
    ) -> ShadowRecord:
        self._shadows_running[name] = self._shadows_running.get(name, 0) + 1
        shadow_policy = _ShadowPolicy(policy)
        started = time.monotonic()
        try:
            generation = await launch(manifest, shadow_policy)
            text, _, usage = await generation.collect()
        except ServerOverloaded as exc:  # its queue filled between the check and the submit
            return msgspec.structs.replace(record, outcome="skipped_busy", error=exc.message)
        except ApplianceError as exc:
            log.info("route %s: shadow %s failed: %s", name, manifest.id, exc.message)
            return msgspec.structs.replace(record, outcome="error", error=exc.message)
        finally:
            self._shadows_running[name] -= 1
        first = shadow_policy.first_token_at
        return msgspec.structs.replace(
            record, latency_ms=round((time.monotonic() - started) * 1000, 3),
            ttft_ms=None if first is None else round((first - started) * 1000, 3),
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            output_sha256=_sha256(text), output=text[: settings.keep_chars],
        )

    async def close(self) -> None:
        """Stop shadow copies still running (server shutdown)."""
        for task in list(self._shadow_tasks):
            task.cancel()
        await asyncio.gather(*self._shadow_tasks, return_exceptions=True)

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
            state = self._registry.status()[manifest.engine_id]["state"]
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


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _ShadowPolicy(OpenPolicy):
    """The policy of a shadow copy: the served request's input was screened already, and nothing is billed
    or limited (the copy is the operator's experiment, not the tenant's request). Times the first token."""

    def __init__(self, served: RequestPolicy) -> None:
        self._served = served
        self.started = time.monotonic()
        self.first_token_at: float | None = None

    def on_chunk(self, chunk: Chunk) -> None:
        if self.first_token_at is None and (chunk.text or chunk.generated):
            self.first_token_at = time.monotonic()

    def cap_max_tokens(self, requested: int | None) -> int | None:
        return self._served.cap_max_tokens(requested)

    def output_filter(self, *, audit: bool = True) -> OutputFilter | None:
        # The tenant's output masking applies to the copy as to the served answer: nothing it masks is stored.
        return self._served.output_filter(audit=False)

    def affinity(self) -> tuple[str, str | None]:
        return self._served.affinity()


class _NotForThis(Exception):
    """A candidate of a kind that cannot serve this endpoint (a completion model for a chat)."""
