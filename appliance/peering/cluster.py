"""Federation membership: which peers are up, what they serve, how busy they are, and where to forward.

A background task probes every peer's GET /v1/cluster/state every `probe_interval_s`, signed
with the cluster secret. A peer is `down` after `down_after_failures` failed probes in a row (a
refused or failed forward counts too), `unauthorised` as soon as it refuses our signature, and
`up` again after one good probe.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Literal

import httpx
import msgspec

from appliance.engines.registry import ModelRegistry
from appliance.errors import ModelNotFound, PeerUnavailable
from appliance.peering.auth import PROBE_PRINCIPAL_TENANT, SignatureVerifier, sign
from appliance.protocol.cluster import ModelState, NodeState
from appliance.settings import ClusterSettings
from appliance.types import EngineStats, Principal

log = logging.getLogger(__name__)

STATE_PATH = "/v1/cluster/state"
FORWARDED_PATHS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
    "/api/chat", "/api/generate", "/api/embed", "/api/embeddings",  # Ollama's
})
PeerStatus = Literal["unknown", "up", "down", "unauthorised"]
_PROBE_PRINCIPAL = Principal(tenant=PROBE_PRINCIPAL_TENANT, key_id=None, role="user")


class PeerState:
    """What this node knows about one peer, from its last probes and forwards."""

    def __init__(self, name: str, url: str, secret: str) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.secret = secret
        self.status: PeerStatus = "unknown"
        self.failures = 0
        self.last_error: str | None = None
        self.last_ok: float | None = None
        self.reported_node: str | None = None
        self.models: dict[str, ModelState] = {}
        self._names: dict[str, str] = {}
        self.started_since_probe = 0
        """Our forwards started since the last probe and still running: its reported load misses them."""
        self._epoch = 0
        self.forwards = 0
        self.forward_failures = 0

    @property
    def up(self) -> bool:
        return self.status == "up"

    def resolve(self, name: str) -> ModelState | None:
        model_id = self._names.get(name)
        return None if model_id is None else self.models[model_id]

    def load(self, model: ModelState) -> int:
        return model.load + self.started_since_probe

    def probed(self, state: NodeState) -> None:
        if self.status != "up":
            log.info("cluster peer %s (%s) is up", self.name, self.url)
        self.status, self.failures, self.last_error = "up", 0, None
        self.last_ok = time.monotonic()
        if state.node != self.name and state.node != self.reported_node:
            log.warning("cluster peer %s at %s calls itself %s: check its url and node_name", self.name, self.url, state.node)
        self.reported_node = state.node
        self.models = {m.id: m for m in state.models}
        self._names = {}
        for m in state.models:
            for name in (m.id, *m.aliases):
                self._names.setdefault(name, m.id)
        self.started_since_probe = 0
        self._epoch += 1

    def begin_forward(self) -> int:
        """Count a forward as load until the next probe reports it; returns what end_forward needs."""
        self.forwards += 1
        self.started_since_probe += 1
        return self._epoch

    def end_forward(self, epoch: int) -> None:
        if epoch == self._epoch:
            self.started_since_probe -= 1

    def failed(self, error: str, *, limit: int) -> None:
        self.failures += 1
        self.last_error = error
        if self.status != "down" and (self.status == "unknown" or self.failures >= limit):
            log.warning("cluster peer %s is down after %d failure(s): %s", self.name, self.failures, error)
            self.status = "down"

    def refused(self, error: str) -> None:
        if self.status != "unauthorised":
            log.error("cluster peer %s refused our signature: %s", self.name, error)
        self.failures += 1
        self.status, self.last_error = "unauthorised", error

    def summary(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.status,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_seen_s_ago": None if self.last_ok is None else round(time.monotonic() - self.last_ok, 1),
            "models": {
                m.id: {"status": m.status, "busy_slots": m.busy_slots, "queue_depth": m.queue_depth}
                for m in self.models.values()
            },
            "forwards": self.forwards,
            "forward_failures": self.forward_failures,
        }


def least_loaded(
    peers: list[PeerState], model_name: str, *, below: int | None = None, exclude: frozenset[str] = frozenset()
) -> tuple[PeerState, ModelState] | None:
    """The up peer serving `model_name` (id or alias) with the least load, if any is below `below`.

    Ties go to a ready model over one still loading, then to the peer name, so the choice is stable.
    """
    best: tuple[tuple[int, int, str], PeerState, ModelState] | None = None
    for peer in peers:
        if not peer.up or peer.name in exclude:
            continue
        model = peer.resolve(model_name)
        if model is None or not model.usable:
            continue
        load = peer.load(model)
        if below is not None and load >= below:
            continue
        key = (0 if model.status == "ready" else 1, load, peer.name)
        if best is None or key < best[0]:
            best = (key, peer, model)
    return None if best is None else (best[1], best[2])


class ForwardPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Why and where a request goes: `model` as the caller named it, served by a peer below `below` load."""

    model: str
    below: int | None = None
    """Only peers whose load is below this qualify (forwarding because this node is saturated)."""


class Cluster:
    """The peers of this node. Built in create_app, started and stopped with the app."""

    def __init__(self, settings: ClusterSettings, registry: ModelRegistry, *, port: int) -> None:
        self.settings = settings
        self.node = settings.node_name or f"{socket.gethostname()}:{port}"
        self.enabled = settings.enabled
        self._registry = registry
        self.peers = [PeerState(p.name, p.url, p.secret or settings.secret) for p in settings.peers]
        per_peer = {p.name: p.secret for p in settings.peers if p.secret}
        self.verifier: SignatureVerifier | None = None
        if self.enabled:
            self.verifier = SignatureVerifier(
                lambda node: per_peer.get(node) or settings.secret or None,
                paths=FORWARDED_PATHS | {STATE_PATH},
                max_age_s=settings.signature_max_age_s,
            )
        self.client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.enabled or not self.peers:
            return
        s = self.settings
        # httpx logs every request at INFO: probes every few seconds would drown the access log.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # No proxies from the environment: cluster traffic goes straight to the peers' addresses.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(s.request_timeout_s, connect=s.probe_timeout_s),
            trust_env=False,
            follow_redirects=False,
            # No cap on connections: waiting for our own pool must never look like a dead peer.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )
        self._task = asyncio.get_running_loop().create_task(self._probe_loop(), name="cluster-probes")
        log.info("cluster node %s: probing %s", self.node, ", ".join(f"{p.name} ({p.url})" for p in self.peers))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    # -- probes --------------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while True:
            started = time.monotonic()
            results = await asyncio.gather(*(self.probe(p) for p in self.peers), return_exceptions=True)
            for peer, result in zip(self.peers, results):
                if isinstance(result, Exception):  # a bug must not end the probes for good
                    log.error("probing cluster peer %s failed", peer.name, exc_info=result)
                    peer.failed(f"{type(result).__name__}: {result}", limit=self.settings.down_after_failures)
            await asyncio.sleep(max(0.0, self.settings.probe_interval_s - (time.monotonic() - started)))

    async def probe(self, peer: PeerState) -> None:
        assert self.client is not None
        headers = sign(peer.secret, node=self.node, method="GET", path=STATE_PATH, principal=_PROBE_PRINCIPAL)
        try:
            resp = await self.client.get(peer.url + STATE_PATH, headers=headers, timeout=self.settings.probe_timeout_s)
        except httpx.HTTPError as exc:
            peer.failed(f"{type(exc).__name__}: {exc}".rstrip(": "), limit=self.settings.down_after_failures)
            return
        if resp.status_code == 401:
            peer.refused(peer_error_message(resp.content) or "401 Unauthorized")
            return
        if resp.status_code != 200:
            peer.failed(f"HTTP {resp.status_code}", limit=self.settings.down_after_failures)
            return
        try:
            state = msgspec.json.decode(resp.content, type=NodeState)
        except msgspec.MsgspecError as exc:
            peer.failed(f"malformed state: {exc}", limit=self.settings.down_after_failures)
            return
        peer.probed(state)

    # -- this node -----------------------------------------------------------------------------

    def node_state(self) -> NodeState:
        status = self._registry.status()
        models = []
        for m in self._registry.manifests():
            s = status[m.id]
            engine = s.get("engine") or EngineStats()
            models.append(ModelState(
                id=m.id, kind=m.kind, format=m.format, aliases=list(m.aliases), context_length=self._registry.context_window(m),
                created=m.created, status="failed" if s.get("error") else s["state"],
                busy_slots=engine.busy_slots, queue_depth=engine.queue_depth,
            ))
        return NodeState(node=self.node, health=self._registry.health(), models=models, time=time.time())

    # -- forwarding decisions ------------------------------------------------------------------

    def plan(self, principal: Principal | None, model_name: str) -> ForwardPlan | None:
        """Forward this request? None: serve it here (or fail here, as without a cluster).

        Forwarded requests are never forwarded again, so two nodes cannot bounce a request.
        """
        if not self.peers or principal is None or principal.forwarded_by is not None:
            return None
        try:
            manifest = self._registry.resolve(model_name)
        except ModelNotFound:
            if least_loaded(self.peers, model_name) is not None:
                return ForwardPlan(model=model_name)
            known = [p.name for p in self.peers if p.resolve(model_name) is not None]
            if known:
                raise PeerUnavailable(
                    f"The model '{model_name}' is served by {', '.join(known)}, which cannot be reached right now.",
                    retry_after=max(1, round(self.settings.probe_interval_s)),
                ) from None
            return None
        status = self._registry.status()[manifest.engine_id]
        if status["state"] == "failed" or status.get("error"):
            return ForwardPlan(model=model_name) if least_loaded(self.peers, model_name) else None
        engine: EngineStats | None = status.get("engine")
        if not self.settings.forward_when_saturated or engine is None or engine.queue_depth <= 0:
            return None
        local = engine.busy_slots + engine.queue_depth
        return ForwardPlan(model=model_name, below=local) if least_loaded(
            self.peers, model_name, below=local
        ) else None

    def choose(self, plan: ForwardPlan, exclude: frozenset[str]) -> tuple[PeerState, ModelState] | None:
        return least_loaded(self.peers, plan.model, below=plan.below, exclude=exclude)

    # -- reports -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {"node": self.node, "peers": {p.name: p.summary() for p in self.peers}}

    def where(self, model_id: str) -> list[str]:
        return [p.name for p in self.peers if p.up and model_id in p.models]

    def peer_models(self) -> dict[str, ModelState]:
        """Models that only up peers serve, by id (the first peer's card)."""
        out: dict[str, ModelState] = {}
        for peer in self.peers:
            if peer.up:
                for model in peer.models.values():
                    out.setdefault(model.id, model)
        return out


def peer_error_message(body: bytes) -> str | None:
    """The message of an OpenAI-shaped error body, if it is one."""
    try:
        return msgspec.json.decode(body)["error"]["message"]
    except (msgspec.MsgspecError, KeyError, TypeError):
        return None
