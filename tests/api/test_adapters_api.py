"""LoRA adapters at the HTTP edge (fake engines): the ways a request names one, what reaches the engine,
the listing, a tenant's default adapter and allow-list, and the errors of each wrong name."""

from __future__ import annotations

from litestar.testing import TestClient

from tests.api.conftest import World, make_client
from tests.api.test_gateway import _admin, _bearer, _user
from tests.fakes import manifest

ASK = [{"role": "user", "content": "hi"}]


def _world() -> World:
    world = World()
    world.manifests += [
        manifest("tone", kind="adapter", base="chat-model"),
        manifest("legal", kind="adapter", base="chat-model"),
        manifest("plain", kind="adapter", base="base-model"),
    ]
    return world


def _adapter_of_last(world: World, engine: str = "chat-model") -> str | None:
    request = world.engines[engine].requests[-1]
    return request.adapter.id if request.adapter is not None else None


def test_a_request_names_an_adapter_by_model_id_or_field() -> None:
    world = _world()
    with make_client(world) as client:
        r = client.post("/v1/chat/completions", json={"model": "chat-model:tone", "messages": ASK})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "chat-model:tone" and _adapter_of_last(world) == "tone"
        r = client.post("/v1/chat/completions", json={"model": "chat-alias", "adapter": "legal", "messages": ASK})
        assert r.status_code == 200 and _adapter_of_last(world) == "legal"
        r = client.post("/v1/completions", json={"model": "base-model:plain", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and _adapter_of_last(world, "base-model") == "plain"
        r = client.post("/v1/chat/completions", json={"model": "chat-model", "messages": ASK})
        assert r.status_code == 200 and _adapter_of_last(world) is None
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert listed["chat-model:tone"]["parent"] == "chat-model" and listed["chat-model:tone"]["adapter"] == "tone"
        assert listed["chat-model:tone"]["kind"] == "chat" and "tone" not in listed
        one = client.get("/v1/models/chat-model:legal").json()
        assert one["id"] == "chat-model:legal" and one["status"] == listed["chat-model"]["status"]


def test_wrong_adapter_names_get_clear_errors_and_the_server_goes_on() -> None:
    world = _world()
    with make_client(world) as client:
        cases = [
            ({"model": "chat-model:nope"}, 404, "chat-model has no adapter 'nope' (its adapters: legal, tone)"),
            ({"model": "chat-model", "adapter": "nope"}, 404, "The adapter 'nope' does not exist"),
            ({"model": "chat-model", "adapter": "plain"}, 400, "is for model base-model, not chat-model"),
            ({"model": "chat-model:tone", "adapter": "legal"}, 400, "names adapter 'tone'"),
            ({"model": "tone"}, 400, "use the model 'chat-model:tone'"),
            ({"model": "chat-model", "adapter": ""}, 400, "adapter"),
        ]
        for body, status, message in cases:
            r = client.post("/v1/chat/completions", json={**body, "messages": ASK})
            assert r.status_code == status, (body, r.text)
            assert message in r.json()["error"]["message"], (body, r.text)
        assert client.post("/v1/chat/completions", json={"model": "chat-model:tone", "messages": ASK}).status_code == 200


def test_a_tenants_default_adapter_and_allow_list() -> None:
    world = _world()
    with make_client(world) as client:
        admin = _admin(client)
        auth = _bearer(admin)
        r = client.post("/v1/admin/tenants", json={"name": "acme", "default_adapter": "nope"}, headers=auth)
        assert r.status_code == 400 and "There is no adapter 'nope'" in r.json()["error"]["message"]
        r = client.post("/v1/admin/tenants", json={"name": "acme", "default_adapter": "tone"}, headers=auth)
        assert r.status_code == 201 and r.json()["default_adapter"] == "tone"
        user = _bearer(_user(client, admin, "acme"))
        assert client.post("/v1/chat/completions", json={"model": "chat-model", "messages": ASK}, headers=user).status_code == 200
        assert _adapter_of_last(world) == "tone"
        # A request that names another adapter keeps it; the default never applies to another base model.
        client.post("/v1/chat/completions", json={"model": "chat-model:legal", "messages": ASK}, headers=user)
        assert _adapter_of_last(world) == "legal"
        client.post("/v1/completions", json={"model": "base-model", "prompt": "x", "max_tokens": 2}, headers=user)
        assert _adapter_of_last(world, "base-model") is None
        r = client.patch("/v1/admin/tenants/acme", json={"default_adapter": None}, headers=auth)
        assert r.status_code == 200 and r.json()["default_adapter"] is None
        client.post("/v1/chat/completions", json={"model": "chat-model", "messages": ASK}, headers=user)
        assert _adapter_of_last(world) is None
        # Listing BASE:ADAPTER alone allows that adapter, not the bare base model.
        r = client.patch("/v1/admin/tenants/acme", json={"allowed_models": ["chat-model:tone"]}, headers=auth)
        assert r.status_code == 200
        ok = client.post("/v1/chat/completions", json={"model": "chat-model:tone", "messages": ASK}, headers=user)
        assert ok.status_code == 200
        for model in ("chat-model", "chat-model:legal"):
            r = client.post("/v1/chat/completions", json={"model": model, "messages": ASK}, headers=user)
            assert r.status_code == 404, model
        assert [m["id"] for m in client.get("/v1/models", headers=user).json()["data"]] == ["chat-model:tone"]
