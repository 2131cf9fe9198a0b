"""Which requests speculate: the server's mode (models.speculation), a model's own switch in its manifest,
and the request's `speculation` field (fake engines: what reaches the engine)."""

from __future__ import annotations

import msgspec

from appliance.engines.registry import ModelRegistry
from appliance.services.generation import GenerationService
from tests.api.conftest import World, make_client
from tests.fakes import manifest

ASK = [{"role": "user", "content": "hi"}]


def test_the_mode_the_model_and_the_request_decide() -> None:
    registry = ModelRegistry([manifest("m")], lambda m: None, load_timeout_s=1)  # type: ignore[arg-type,return-value]
    m = registry.resolve("m")
    grounded = GenerationService(registry, speculation="grounded")
    assert grounded.speculates(m, None, grounded=True) and not grounded.speculates(m, None, grounded=False)
    assert grounded.speculates(m, True, grounded=False) and not grounded.speculates(m, False, grounded=True)
    everything = GenerationService(registry, speculation="all")
    assert everything.speculates(m, None, grounded=False)
    off = GenerationService(registry, speculation="off")
    assert not off.speculates(m, True, grounded=True)  # the operator's off wins over the request
    # A model's manifest overrides the server's mode, both ways.
    assert not grounded.speculates(msgspec.structs.replace(m, speculation="off"), True, grounded=True)
    assert off.speculates(msgspec.structs.replace(m, speculation="all"), None, grounded=False)


def test_the_request_field_reaches_the_engine() -> None:
    world = World()
    with make_client(world) as client:
        for body, expected in (({}, False), ({"speculation": True}, True), ({"speculation": False}, False)):
            r = client.post("/v1/chat/completions", json={"model": "chat-model", "messages": ASK, **body})
            assert r.status_code == 200, r.text
            assert world.chat.requests[-1].speculate is expected, body
        r = client.post("/v1/chat/completions", json={"model": "chat-model", "messages": ASK, "speculation": "yes"})
        assert r.status_code == 400 and "speculation" in r.text
    world = World()  # the first client's shutdown closed its engines
    with make_client(world, APPLIANCE_SPECULATION="all") as client:
        assert client.post("/v1/chat/completions", json={"model": "chat-model", "messages": ASK}).status_code == 200
        assert world.chat.requests[-1].speculate is True
