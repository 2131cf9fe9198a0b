"""One request as the gateway sees it, in three parts:

- `Identity`: who is calling (principal, key, tenant), resolved once at the edge;
- `RequestPolicy` side of `RequestContext`: what the caller may do (model allow-list, limits and budget,
  guardrails), which the services call while they run;
- `RequestUsage`: what the request used, accumulated as it runs and written as one usage record by
  `settle`, which only the gateway middleware calls (api/gateway.py).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import msgspec

from appliance.errors import ModelNotFound, RateLimited
from appliance.modelstore.manifest import Manifest
from appliance.policy.guardrails import GuardrailAction, GuardrailBlocked, GuardrailPolicy, MaskSession, StreamMasker
from appliance.policy.limits import Reservation
from appliance.policy.experiments import ShadowRecord
from appliance.policy.metering import Outcome, UsageRecord
from appliance.policy.tenancy import ApiKey, Tenant, policy_of
from appliance.types import Chunk, Principal, Usage

if TYPE_CHECKING:
    from appliance.policy.gateway import Gateway

_CHECKPOINT_EVERY_S = 1.0
log = logging.getLogger(__name__)


def _log_failure(future: Future[None]) -> None:
    if (exc := future.exception()) is not None:
        log.error("usage checkpoint failed: %s", exc)


class Identity:
    """Who is calling: set once by the middleware (a key, or a peer's signature), read by everyone."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self.principal: Principal | None = None
        self.key: ApiKey | None = None
        self._tenant: Tenant | None = None

    def authenticate(self, authorization: str | None) -> Principal:
        self.principal, self.key = self._gateway.authenticate(authorization)
        return self.principal

    def act_as(self, principal: Principal) -> None:
        """A request a peer forwarded on behalf of its caller (the cluster signature was checked)."""
        self.principal, self.key = principal, None
        self._gateway.tenants.ensure_tenant(principal.tenant)

    @property
    def tenant(self) -> Tenant:
        if self._tenant is None:
            assert self.principal is not None
            self._tenant = self._gateway.tenants.tenant(self.principal.tenant)
        return self._tenant


class RequestUsage:
    """What one request used, and its one usage record."""

    def __init__(self, gateway: Gateway, identity: Identity, request_id: str, route: str, method: str) -> None:
        self._gateway = gateway
        self._identity = identity
        self.request_id = request_id
        self.route = route
        self.method = method
        self.ts = time.time()
        self.started = time.monotonic()
        self.model: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.embedding_tokens = 0
        self.retrieved_chunks = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.guardrails: list[GuardrailAction] = []
        self.output_maskers: list[StreamMasker] = []
        """One per output stream (n > 1 sequences each have one); their actions join the record."""
        self.outcome: Outcome | None = None
        self.peer: str | None = None
        self.route_path: str | None = None
        """A routed model id's hops, e.g. "auto>smollm2-135m(queue_full)>gemma3-270m" (sent as X-Route)."""
        self.variant: str | None = None
        """The split variant of a routed model id (sent as X-Route-Variant)."""
        self.metered = True
        self.hold_record = False
        """Grounded answers check citations after the last token: their record waits for the end of the
        response (still written before its last byte; the in-flight journal covers a crash meanwhile)."""
        self.reservation: Reservation | None = None
        self.earlier_reservations: list[Reservation] = []
        """A routed request in cascade mode: the reservations of candidates whose whole answer was set aside."""
        self._carried_prompt = 0
        self._carried_completion = 0
        """Tokens of those answers: they were computed, so they count (and bill) with the final one."""
        self._journaled = False
        self._checkpoint_at = 0.0
        self._complete = False
        self.recorded = False

    # -- while it runs -------------------------------------------------------------------------

    def reserved(self, manifest: Manifest, prompt_tokens: int, reservation: Reservation) -> None:
        # A routed request on its next candidate:
        if self._complete:  # cascade: the last candidate answered in full; its tokens were spent
            if self.reservation is not None:
                self.earlier_reservations.append(self.reservation)
            self._carried_prompt, self._carried_completion = self.prompt_tokens, self.completion_tokens
            self._complete = False
        elif self.reservation is not None:  # fallback: the last one was passed over before its first token
            self._gateway.budgets.settle(self.reservation, 0)
        self.model = manifest.id
        self.reservation = reservation
        if manifest.kind == "embedding":
            self.embedding_tokens = prompt_tokens
            return
        self.prompt_tokens = self._carried_prompt + prompt_tokens
        self.completion_tokens = self._carried_completion
        self._journaled = True
        self._gateway.meter.begin(self._record("ok", 200))

    def on_chunk(self, chunk: Chunk) -> None:
        now = time.monotonic()
        if chunk.text or chunk.generated:
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
        if self.outcome != "cached":
            counted = self._carried_completion + chunk.generated if chunk.generated else self.completion_tokens + 1
            self.completion_tokens = max(self.completion_tokens, counted)
        if chunk.usage is not None:
            self.finish(chunk.usage)
        elif self._journaled and now - self._checkpoint_at >= _CHECKPOINT_EVERY_S:
            self._checkpoint_at = now
            # A checkpoint is an fsync'd write that may wait for another request's record: not on the loop.
            # One after the record is written updates nothing (its journal row is gone).
            future = self._gateway.journal.submit(
                self._gateway.meter.checkpoint, self.request_id, self.completion_tokens, self._ttft_ms()
            )
            future.add_done_callback(_log_failure)

    def keep_earlier_answer(self) -> None:
        """Cascade mode: the answer set aside stands because the candidates after it failed before any
        output; the usage is that answer's (and the ones before it), not the failed attempt's prompt."""
        if not self._complete:  # a later candidate reserved (and carried the earlier tokens) before it failed
            self.prompt_tokens, self.completion_tokens = self._carried_prompt, self._carried_completion
        self.complete()

    def finish(self, usage: Usage) -> None:
        """The generation's real count is known: the record is written before the last byte goes out."""
        if self.outcome != "cached":  # a cached answer ran no model: it costs no tokens
            self.prompt_tokens = self._carried_prompt + usage.prompt_tokens
            self.completion_tokens = self._carried_completion + usage.completion_tokens
        self.complete()

    def complete(self, outcome: Outcome | None = None) -> None:
        """The answer is whole (or ended with `outcome`): settle before the next byte reaches the client,
        so a client that hangs up once it has the end cannot turn the request into a cancelled one."""
        if outcome is not None:
            self.outcome = outcome
        self._complete = True

    @property
    def ready_to_settle(self) -> bool:
        """Whether the middleware settles now, before sending more (grounded answers hold the record
        until their citations are checked: they settle with the response's last message)."""
        return self._complete and not self.hold_record and not self.recorded

    def guardrail_actions(self) -> list[GuardrailAction]:
        """What the guardrails did so far, output masking of a finished generation included."""
        done = [a for masker in self.output_maskers for a in masker.actions()]
        return [*self.guardrails, *done]

    def _ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.started) * 1000

    # -- the usage record ----------------------------------------------------------------------

    def _record(self, outcome: Outcome, status: int) -> UsageRecord:
        p = self._identity.principal
        return UsageRecord(
            request_id=self.request_id, ts=self.ts, tenant=p.tenant if p else None, key_id=p.key_id if p else None,
            model=self.model, route=f"{self.method} {self.route}", status=status, outcome=outcome,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            embedding_tokens=self.embedding_tokens, retrieved_chunks=self.retrieved_chunks,
            latency_ms=(time.monotonic() - self.started) * 1000, ttft_ms=self._ttft_ms(),
            guardrails=list(self.guardrails), peer=self.peer, route_path=self.route_path, variant=self.variant,
        )

    def settle(self, status: int, outcome: Outcome | None = None) -> None:
        """Write the request's usage record (once), release its budget reservation, count metrics.

        Called by the gateway middleware only (api/gateway.py), at the first of: the answer is complete,
        the response's last message, the request ended without one.
        """
        if self.recorded:
            return
        self.recorded = True
        self.guardrails = self.guardrail_actions()
        self.output_maskers = []
        outcome = outcome or self.outcome or ("ok" if status < 400 else "error")
        if status >= 400 and self.first_token_at is None:
            # Refused or failed before any output (queue full, timeout, engine error): nothing to bill.
            self.prompt_tokens = self.completion_tokens = self.embedding_tokens = 0
        used = self.prompt_tokens + self.completion_tokens + self.embedding_tokens
        for earlier in self.earlier_reservations:  # cascade: `used` counts their tokens too
            self._gateway.budgets.settle(earlier, 0)
        self._gateway.budgets.settle(self.reservation, used)
        if self._identity.principal is None or not self.metered:
            return
        self._gateway.meter.record(self._record(outcome, status))
        self._count(outcome)

    def _count(self, outcome: Outcome) -> None:
        m = self._gateway.metrics
        p = self._identity.principal
        tenant = p.tenant if p else ""
        model = self.model or ""
        for direction, n in (
            ("prompt", self.prompt_tokens), ("completion", self.completion_tokens), ("embedding", self.embedding_tokens)
        ):
            if n:
                m.tokens.labels(direction=direction, model=model, tenant=tenant).inc(n)
        if self.first_token_at is not None and outcome != "cached":
            m.ttft.labels(model=model).observe(self.first_token_at - self.started)
            if self.last_token_at is not None and self.completion_tokens > 1:
                m.tpot.labels(model=model).observe(
                    (self.last_token_at - self.first_token_at) / (self.completion_tokens - 1)
                )
        for action in self.guardrails:
            m.guardrails.labels(stage=action.stage, kind=action.kind, action=action.action).inc(action.count)

    def summary(self) -> dict[str, Any]:
        """Fields for the access log line (never request or response text)."""
        p = self._identity.principal
        return {
            "request_id": self.request_id, "tenant": p.tenant if p else None, "key_id": p.key_id if p else None,
            "route": f"{self.method} {self.route}", "model": self.model,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "embedding_tokens": self.embedding_tokens,
        }


class RequestContext:
    """One request: its `identity`, its `usage`, and the policy the services call (implements
    services.policy.RequestPolicy). Only the gateway middleware settles `usage`."""

    def __init__(self, gateway: Gateway, request_id: str, route: str, method: str) -> None:
        self.gateway = gateway
        self.request_id = request_id
        self.route = route
        self.method = method
        self.identity = Identity(gateway)
        self.usage = RequestUsage(gateway, self.identity, request_id, route, method)
        self._policy: GuardrailPolicy | None = None
        self._mask_session: MaskSession | None = None
        self.pii_map: dict[str, str] | None = None
        """{placeholder: original} of masked input, only when the tenant's policy asks for a reversible mask."""
        self.quarantined: list[dict[str, str]] = []
        """Tool results the injection guardrail replaced with a notice ({"message_index", "tool_call_id"})."""
        self.conversation_id: str | None = None
        """The client's X-Conversation-Id: keeps a conversation on one split variant (`sticky = "conversation"`)."""

    # -- identity, for the edge ----------------------------------------------------------------

    @property
    def principal(self) -> Principal | None:
        return self.identity.principal

    @property
    def tenant(self) -> Tenant:
        return self.identity.tenant

    @property
    def started(self) -> float:
        return self.usage.started

    def authenticate(self, authorization: str | None) -> Principal:
        return self.identity.authenticate(authorization)

    def act_as(self, principal: Principal) -> None:
        self.identity.act_as(principal)
        self.usage.peer = principal.forwarded_by

    def admit_request(self) -> None:
        """Count the request against requests-per-minute (every authenticated route)."""
        try:
            self.gateway.rates.admit_request(self.tenant, self.identity.key)
        except RateLimited as exc:
            self.gateway.metrics.rejections.labels(reason=exc.code or "rate_limit", tenant=self.tenant.name).inc()
            raise

    # -- RequestPolicy -------------------------------------------------------------------------

    def allow_model(self, manifest: Manifest) -> None:
        # A model allowed to a tenant includes its adapters (BASE:ADAPTER); listing BASE:ADAPTER alone
        # allows that adapter without the bare base model.
        allowed = self.tenant.allowed_models
        if allowed is not None and manifest.id not in allowed and (manifest.adapter is None or manifest.engine_id not in allowed):
            raise ModelNotFound(f"The model '{manifest.id}' does not exist.", param="model")

    @property
    def default_adapter(self) -> str | None:
        return self.tenant.default_adapter

    def reserve(self, manifest: Manifest, prompt_tokens: int, max_tokens: int) -> None:
        self.allow_model(manifest)
        self.usage.model = manifest.id
        tokens = prompt_tokens + max_tokens
        try:
            self.gateway.rates.admit_tokens(self.tenant, self.identity.key, tokens)
            reservation = self.gateway.budgets.reserve(self.tenant, tokens)
        except RateLimited as exc:
            self.gateway.metrics.rejections.labels(reason=exc.code or "rate_limit", tenant=self.tenant.name).inc()
            raise
        self.usage.reserved(manifest, prompt_tokens, reservation)

    @property
    def guardrail_policy(self) -> GuardrailPolicy:
        if self._policy is None:
            self._policy = policy_of(self.tenant.guardrails)
        return self._policy

    def screen_input(self, texts: list[str], *, instructions: bool = True) -> list[str]:
        """Apply the tenant's input guardrails; `instructions=False` for data (embeddings, system prompts)."""
        policy = self.guardrail_policy
        if not instructions and policy.injection != "allow":
            policy = msgspec.structs.replace(policy, injection="allow")
        if self._mask_session is None:
            self._mask_session = MaskSession(reversible=policy.reversible_mask)
        out = []
        try:
            for text in texts:
                decision = self.gateway.guardrails.check_input(text, policy, session=self._mask_session)
                self.usage.guardrails.extend(decision.actions)
                out.append(decision.text)
                if decision.mapping:
                    self.pii_map = dict(decision.mapping)
        except GuardrailBlocked as exc:
            self.usage.guardrails.append(GuardrailAction(stage="input", kind=exc.kind, action="block"))
            raise
        return out

    def cap_max_tokens(self, requested: int | None) -> int | None:
        return self.guardrail_policy.cap_max_tokens(requested)

    def output_filter(self, *, audit: bool = True) -> StreamMasker | None:
        masker = self.gateway.guardrails.output_masker(self.guardrail_policy)
        if masker is not None and audit:
            self.usage.output_maskers.append(masker)
        return masker

    def screen_retrieved(self, texts: list[str]) -> list[int]:
        self.usage.retrieved_chunks += len(texts)
        kept, actions = self.gateway.guardrails.check_retrieved(texts, self.guardrail_policy)
        self.usage.guardrails.extend(actions)
        return kept

    def screen_tool_results(self, texts: list[str], call_ids: list[str], indices: list[int]) -> list[int]:
        kept, actions = self.gateway.guardrails.check_retrieved(texts, self.guardrail_policy, stage="tool")
        self.usage.guardrails.extend(actions)
        self.quarantined += [{"message_index": str(indices[i]), "tool_call_id": call_ids[i]}
                             for i in sorted(set(range(len(texts))) - set(kept))]
        return kept

    def on_chunk(self, chunk: Chunk) -> None:
        self.usage.on_chunk(chunk)

    def served_from_cache(self) -> None:
        self.usage.outcome = "cached"
        self.gateway.metrics.cache.labels(result="hit").inc()

    def count_retrieved(self, chunks: int) -> None:
        self.usage.retrieved_chunks += chunks

    def note_grounding(self, grounded: bool) -> None:
        """Grounded answers: an answer whose citations do not check out is flagged in the audit trail."""
        if not grounded:
            self.usage.guardrails.append(GuardrailAction(stage="output", kind="ungrounded", action="flag"))

    def note_route(self, route: str, hops: list[tuple[str, str]], path: str, variant: str | None = None) -> None:
        self.usage.route_path = path
        self.usage.variant = variant
        served = [model for model, outcome in hops if outcome in ("served", "cached", "cache")]
        # The model that answered; none did: the route itself (not the last candidate that refused).
        self.usage.model = served[0] if served else route
        if served and hops[-1][1] not in ("served", "cached", "cache", "worse"):
            self.usage.keep_earlier_answer()  # cascade: an answer set aside stands, the candidates after it failed
        m = self.gateway.metrics
        for model, outcome in hops:
            m.route_hops.labels(route=route, model=model, outcome=outcome).inc()
        result = "unavailable" if not served else "first" if len(hops) == 1 else "fallback"
        m.routed.labels(route=route, result=result).inc()

    def affinity(self) -> tuple[str, str | None]:
        p = self.identity.principal
        caller = (p.key_id or p.tenant) if p is not None else ""
        return caller, self.conversation_id

    def note_shadow(self, record: ShadowRecord) -> None:
        p = self.identity.principal
        record = msgspec.structs.replace(record, request_id=self.request_id, tenant=p.tenant if p else None)
        self.gateway.experiments.record_shadow(record)
        self.gateway.metrics.shadow.labels(route=record.route, model=record.model, outcome=record.outcome).inc()

    def hold_record(self) -> None:
        """Grounded answers: settle with the response's last message, after the citations are checked."""
        self.usage.hold_record = True

    def guardrail_actions(self) -> list[GuardrailAction]:
        return self.usage.guardrail_actions()

    # -- the edge's view of the outcome --------------------------------------------------------

    def complete(self, outcome: Outcome | None = None) -> None:
        self.usage.complete(outcome)

    def forwarded(self, peer: str, model: str) -> None:
        """A peer serves this request: it meters the tokens; this node records the forward and where."""
        self.usage.outcome, self.usage.peer, self.usage.model = "forwarded", peer, model
