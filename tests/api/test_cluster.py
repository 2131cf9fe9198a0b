"""Federation through the real ASGI app (fake engines): signed requests, the state route, health and models."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.peering.auth import sign
from appliance.storage.sqlite import connect
from appliance.types import Principal
from tests.api.conftest import World, make_client

SECRET = "k" * 48
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
CALLER = Principal(tenant="team-a", key_id="ak_0badc0de", role="user")


def signed(
    path: str, method: str = "POST", secret: str = SECRET, principal: Principal = CALLER, body: bytes = b""
) -> dict[str, str]:
    return sign(secret, node="node-a", method=method, path=path, principal=principal, body=body)


def _post(client, path: str, payload: dict, **kw: object):  # type: ignore[no-untyped-def]
    """POST the exact bytes that were signed."""
    body = json.dumps(payload).encode()
    headers = {"content-type": "application/json", **signed(path, body=body, **kw)}  # type: ignore[arg-type]
    return client.post(path, content=body, headers=headers)


def cluster_client(world: World, tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_client(
        world, APPLIANCE_DATA_DIR=str(tmp_path), APPLIANCE_CLUSTER_SECRET=SECRET, APPLIANCE_NODE_NAME="node-b"
    )


def test_a_signed_request_is_served_and_metered_for_the_forwarded_caller(world: World, tmp_path: Path) -> None:
    with cluster_client(world, tmp_path) as client:
        r = _post(client, "/v1/chat/completions", CHAT)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
    row = connect(tmp_path / "gateway.db").execute(
        "SELECT tenant, key_id, outcome, peer, model, completion_tokens FROM usage WHERE route LIKE '%chat%'"
    ).fetchone()
    assert tuple(row) == ("team-a", "ak_0badc0de", "ok", "node-a", "chat-model", 3)


def test_a_wrong_cluster_secret_is_401_in_openai_shape(world: World, tmp_path: Path) -> None:
    with cluster_client(world, tmp_path) as client:
        r = _post(client, "/v1/chat/completions", CHAT, secret="w" * 48)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert "cluster" in r.json()["error"]["message"]
        # A signature never opens the admin API, even with the right secret.
        r = _post(client, "/v1/admin/tenants", {"name": "x"})
        assert r.status_code == 401
    assert world.chat.requests == []


def test_without_federation_cluster_headers_are_ignored_and_key_auth_applies(world: World, tmp_path: Path) -> None:
    with make_client(world, APPLIANCE_DATA_DIR=str(tmp_path)) as client:
        assert client.post("/v1/admin/tenants", json={"name": "ops"}).status_code == 201
        assert client.post("/v1/admin/keys", json={"tenant": "ops", "role": "admin"}).status_code == 201
        r = _post(client, "/v1/chat/completions", CHAT)
        assert r.status_code == 401
        assert "cluster" not in client.get("/health").json()


def test_the_state_route_is_for_peers_and_admins(world: World, tmp_path: Path) -> None:
    with cluster_client(world, tmp_path) as client:
        r = client.get("/v1/cluster/state", headers=signed("/v1/cluster/state", "GET"))
        assert r.status_code == 200, r.text
        state = r.json()
        assert state["node"] == "node-b"
        models = {m["id"]: m for m in state["models"]}
        assert models["chat-model"]["kind"] == "chat" and models["chat-model"]["aliases"] == ["chat-alias"]
        assert {"busy_slots", "queue_depth", "status"} <= set(models["chat-model"])
        r = client.get("/v1/cluster/state", headers=signed("/v1/cluster/state", "GET", secret="w" * 48))
        assert r.status_code == 401
        assert client.post("/v1/admin/tenants", json={"name": "ops"}).status_code == 201
        admin = client.post("/v1/admin/keys", json={"tenant": "ops", "role": "admin"}).json()["key"]
        user = client.post("/v1/admin/keys", json={"tenant": "ops"}, headers={"Authorization": f"Bearer {admin}"})
        assert client.get("/v1/cluster/state").status_code == 401
        r = client.get("/v1/cluster/state", headers={"Authorization": f"Bearer {user.json()['key']}"})
        assert r.status_code == 403
        assert client.get("/v1/cluster/state", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
    # Probes are not metered: a peer probing every second would fill the usage table.
    rows = connect(tmp_path / "gateway.db").execute("SELECT route FROM usage").fetchall()
    assert not [r for r in rows if "cluster" in r[0]]


def test_health_and_models_show_the_cluster_without_changing_the_default_listing(
    world: World, tmp_path: Path
) -> None:
    with cluster_client(world, tmp_path) as client:
        health = client.get("/health").json()
        assert health["cluster"] == {"node": "node-b", "peers": {}}
        plain = client.get("/v1/models").json()["data"]
        assert all("location" not in m for m in plain)
        wide = client.get("/v1/models?scope=cluster").json()["data"]
        assert [m["id"] for m in wide] == [m["id"] for m in plain]
        assert all(m["location"] == ["node-b"] for m in wide)


def test_a_body_changed_after_signing_is_refused(world: World, tmp_path: Path) -> None:
    with cluster_client(world, tmp_path) as client:
        body = json.dumps(CHAT).encode()
        headers = {"content-type": "application/json", **signed("/v1/chat/completions", body=body)}
        tampered = body.replace(b'"hi"', b'"yo"')
        r = client.post("/v1/chat/completions", content=tampered, headers=headers)
        assert r.status_code == 401 and "body does not match" in r.json()["error"]["message"]
    assert world.chat.requests == []
