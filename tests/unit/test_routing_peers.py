"""Cluster peers as route candidates (no server): settings, and the ladder's peer rungs with fake peers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.engines.registry import ModelRegistry
from appliance.errors import PeerUnavailable, SettingsError
from appliance.peering.forward import Forwarded, PeerReach, renamed
from appliance.protocol.openai import ChatCompletionRequest, decode_request
from appliance.services.generation import Generation, GenerationService
from appliance.services.policy import OPEN_POLICY
from appliance.services.routing import RoutingService
from tests.api.test_routing_api import FullEngine
from tests.fakes import manifest
from tests.unit.test_routing import _settings

ROUTES = """
[routing.auto]
candidates = ["small", "remote", "big"]
load_wait_s = 1
cached_fallback = false
"""


class FakePeers:
    """Peers as the routing service sees them: what each serves, and what each forward answers."""

    def __init__(self, serves: dict[str, PeerReach], answers: dict[str, int | Exception] | None = None,
                 allowed: list[str] | None = None) -> None:
        self.serves = serves
        self.answers = answers or {}
        self.allowed = allowed
        self.forwarded: list[str] = []

    def allows(self, model: str) -> bool:
        return self.allowed is None or model in self.allowed

    def reach(self, model: str) -> PeerReach:
        return self.serves.get(model, "none")

    def known_by(self, model: str) -> list[str]:
        return ["node-b"] if model in self.serves else []

    async def forward(self, model: str, tried: set[str]) -> Forwarded:
        self.forwarded.append(model)
        if self.serves[model] == "down":
            raise PeerUnavailable(f"No peer could take the request for model '{model}'.")
        tried.add("node-b")
        answer = self.answers.get(model, 200)
        if isinstance(answer, Exception):
            raise answer
        headers = {"retry-after": "7"} if answer in (429, 503) else {}
        return Forwarded(peer="node-b", model=model, status=answer, headers=headers, body=b"{}")


class RecordingPolicy(type(OPEN_POLICY)):  # type: ignore[misc]
    def __init__(self) -> None:
        self.path: str | None = None

    def note_route(self, route: str, hops: list[tuple[str, str]], path: str, variant: str | None = None) -> None:
        self.path = path


def _routing(tmp_path: Path, small_full: bool = False) -> RoutingService:
    small, big = FullEngine("small"), FullEngine("big")
    small.full, big.full = small_full, False
    engines = {"small": small, "big": big}
    registry = ModelRegistry([manifest("small"), manifest("big"), manifest("embed", kind="embedding")],
                             lambda m: engines[m.id], load_timeout_s=5)
    return RoutingService(_settings(tmp_path, ROUTES).routing, registry, GenerationService(registry), peers=True)


def _chat(routing: RoutingService, peers: FakePeers | None) -> tuple[Generation | Forwarded, str | None]:
    policy = RecordingPolicy()
    request = decode_request(b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}', ChatCompletionRequest)

    async def run() -> Generation | Forwarded:
        return await routing.chat(request, policy, tenant="t", peers=peers)

    return asyncio.run(run()), policy.path


def test_settings_leave_unknown_candidates_to_peers_only_when_there_are_peers(tmp_path: Path) -> None:
    registry = ModelRegistry([manifest("small"), manifest("embed", kind="embedding")], lambda m: None, load_timeout_s=1)
    settings = _settings(tmp_path, '[routing.auto]\ncandidates = ["small", "remote"]\n').routing
    with pytest.raises(SettingsError, match=r"candidate 'remote' is not a chat or completion model of this node.*\[cluster\] peers"):
        RoutingService(settings, registry, GenerationService(registry))
    routing = RoutingService(settings, registry, GenerationService(registry), peers=True)
    assert [m.id for m in routing.models_of("auto")] == ["small"] and routing.remote_of("auto") == ["remote"]
    # A model of this node of the wrong kind is refused all the same, and so is a shadow only peers serve.
    embed = _settings(tmp_path, '[routing.auto]\ncandidates = ["embed"]\n').routing
    with pytest.raises(SettingsError, match="'embed' is not a chat or completion model"):
        RoutingService(embed, registry, GenerationService(registry), peers=True)
    shadow = _settings(tmp_path, '[routing.auto]\ncandidates = ["small"]\nshadow = {model = "remote"}\n').routing
    with pytest.raises(SettingsError, match="routing.auto.shadow"):
        RoutingService(shadow, registry, GenerationService(registry), peers=True)


def test_a_candidate_only_a_peer_serves_is_forwarded_there(tmp_path: Path) -> None:
    routing = _routing(tmp_path, small_full=True)
    peers = FakePeers({"remote": "up"})
    answer, path = _chat(routing, peers)
    assert isinstance(answer, Forwarded) and answer.model == "remote"
    assert path == "auto>small(queue_full)>remote@node-b" and peers.forwarded == ["remote"]


def test_local_then_the_same_model_on_a_peer_then_the_next_candidate(tmp_path: Path) -> None:
    routing = _routing(tmp_path, small_full=True)
    peers = FakePeers({"small": "up", "remote": "up"})
    answer, path = _chat(routing, peers)
    assert isinstance(answer, Forwarded)
    assert path == "auto>small(queue_full)>small@node-b" and peers.forwarded == ["small"]
    # the local model serves: no peer is asked
    answer, path = _chat(_routing(tmp_path), peers)
    assert isinstance(answer, Generation) and path == "auto>small" and peers.forwarded == ["small"]


def test_peers_that_cannot_serve_are_passed_over_with_why(tmp_path: Path) -> None:
    routing = _routing(tmp_path, small_full=True)
    cases = [
        (FakePeers({"small": "up", "remote": "down"}, {"small": 503}),
         "auto>small(queue_full)>small@node-b(peer_unavailable)>remote@node-b(peer_unavailable)>big"),
        (FakePeers({}), "auto>small(queue_full)>remote(unknown)>big"),
        (FakePeers({"remote": "up"}, {"remote": 429}), "auto>small(queue_full)>remote@node-b(peer_unavailable)>big"),
        (FakePeers({"remote": "up"}, {"remote": 504}), "auto>small(queue_full)>remote@node-b(timeout)>big"),
        (FakePeers({"remote": "up"}, allowed=["small", "big"]), "auto>small(queue_full)>big"),
        (None, "auto>small(queue_full)>remote(unsupported)>big"),
    ]
    for peers, expected in cases:
        answer, path = _chat(routing, peers)
        assert isinstance(answer, Generation) and answer.manifest.id == "big", expected
        assert path == expected


def test_a_peer_refusing_the_request_itself_is_relayed_not_retried(tmp_path: Path) -> None:
    routing = _routing(tmp_path, small_full=True)
    peers = FakePeers({"remote": "up"}, {"remote": 400})
    answer, path = _chat(routing, peers)
    assert isinstance(answer, Forwarded) and answer.status == 400
    assert path == "auto>small(queue_full)>remote@node-b(rejected)"


def test_the_forwarded_body_names_the_candidate() -> None:
    body = b'{"model": "auto:latest", "messages": [{"role": "user", "content": "hi"}], "stream": false}'
    assert renamed(body, "gemma3-270m") == (
        b'{"model":"gemma3-270m","messages":[{"role":"user","content":"hi"}],"stream":false}'
    )
