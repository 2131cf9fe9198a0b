"""The gateway through the real ASGI app (fake engines): keys, roles, limits, metering, metrics."""

from __future__ import annotations

import time
from pathlib import Path

from litestar.testing import TestClient

from appliance.storage.sqlite import connect
from tests.api.conftest import World, make_client

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]}


def _admin(client: TestClient, headers: dict[str, str] | None = None) -> str:
    """Create tenant 'ops' and an admin key for it (open mode allows the first one)."""
    r = client.post("/v1/admin/tenants", json={"name": "ops"}, headers=headers)
    assert r.status_code == 201, r.text
    r = client.post("/v1/admin/keys", json={"tenant": "ops", "role": "admin"}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["key"]


def _user(client: TestClient, admin: str, tenant: str, **limits: object) -> str:
    auth = {"Authorization": f"Bearer {admin}"}
    if client.get(f"/v1/admin/tenants/{tenant}", headers=auth).status_code == 404:
        assert client.post("/v1/admin/tenants", json={"name": tenant}, headers=auth).status_code == 201
    r = client.post("/v1/admin/keys", json={"tenant": tenant, **limits}, headers=auth)
    assert r.status_code == 201, r.text
    return r.json()["key"]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_open_mode_until_the_first_key_then_every_route_but_health_needs_one(world: World) -> None:
    with make_client(world) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        admin = _admin(client)
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"].startswith("Bearer")
        for path in ("/v1/models", "/v1/collections", "/v1/usage", "/v1/admin/tenants", "/version"):
            assert client.get(path).status_code == 401, path
        assert client.get("/health").status_code == 200
        assert client.post("/v1/chat/completions", json=CHAT, headers=_bearer(admin)).status_code == 200
        bad = admin[:-4] + ("AAAA" if not admin.endswith("AAAA") else "BBBB")
        assert client.post("/v1/chat/completions", json=CHAT, headers=_bearer(bad)).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": admin}).status_code == 401


def test_keys_are_shown_once_stored_hashed_and_revocation_is_immediate(world: World, tmp_path: Path) -> None:
    with make_client(world, APPLIANCE_DATA_DIR=str(tmp_path)) as client:
        admin = _admin(client)
        user = _user(client, admin, "team-a")
        key_id, secret = user.split(".")
        listed = client.get("/v1/admin/keys", headers=_bearer(admin)).json()["data"]
        assert key_id in {k["id"] for k in listed}
        assert all("key" not in k and "secret_sha256" not in k for k in listed)
        raw = (tmp_path / "gateway.db").read_bytes()
        assert secret.encode() not in raw
        assert client.get("/v1/models", headers=_bearer(user)).status_code == 200
        # A user key may not manage tenants or keys.
        assert client.get("/v1/admin/keys", headers=_bearer(user)).status_code == 403
        assert client.post("/v1/admin/tenants", json={"name": "x"}, headers=_bearer(user)).status_code == 403
        assert client.delete(f"/v1/admin/keys/{key_id}", headers=_bearer(admin)).status_code == 200
        r = client.get("/v1/models", headers=_bearer(user))
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def test_expired_key_stops_working(world: World) -> None:
    with make_client(world) as client:
        admin = _admin(client)
        r = client.post(
            "/v1/admin/keys", json={"tenant": "ops", "expires_at": time.time() + 1.0}, headers=_bearer(admin)
        )
        short = r.json()["key"]
        assert client.get("/v1/models", headers=_bearer(short)).status_code == 200
        time.sleep(1.2)
        r = client.get("/v1/models", headers=_bearer(short))
        assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
        past = client.post("/v1/admin/keys", json={"tenant": "ops", "expires_at": 1.0}, headers=_bearer(admin))
        assert past.status_code == 400


def test_model_allow_list_hides_other_models(world: World) -> None:
    with make_client(world) as client:
        admin = _admin(client)
        auth = _bearer(admin)
        client.post("/v1/admin/tenants", json={"name": "narrow", "allowed_models": ["base-model"]}, headers=auth)
        user = _user(client, admin, "narrow")
        ids = [m["id"] for m in client.get("/v1/models", headers=_bearer(user)).json()["data"]]
        assert ids == ["base-model"]
        r = client.post("/v1/chat/completions", json=CHAT, headers=_bearer(user))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert client.get("/v1/models/chat-model", headers=_bearer(user)).status_code == 404
        r = client.post("/v1/completions", json={"model": "base-model", "prompt": "x"}, headers=_bearer(user))
        assert r.status_code == 200


def test_requests_per_minute_limit_gives_429_with_retry_after(world: World) -> None:
    with make_client(world) as client:
        admin = _admin(client)
        user = _user(client, admin, "team-a", rpm=2)
        codes = [client.get("/v1/models", headers=_bearer(user)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = client.get("/v1/models", headers=_bearer(user))
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # The admin's own key is not limited by team-a's key.
        assert client.get("/v1/models", headers=_bearer(admin)).status_code == 200


def test_tokens_per_minute_counts_prompt_plus_max_tokens(world: World) -> None:
    with make_client(world) as client:
        admin = _admin(client)
        user = _user(client, admin, "team-a", tpm=30)
        body = {**CHAT, "max_tokens": 10}
        assert client.post("/v1/chat/completions", json=body, headers=_bearer(user)).status_code == 200
        assert client.post("/v1/chat/completions", json=body, headers=_bearer(user)).status_code == 200
        r = client.post("/v1/chat/completions", json=body, headers=_bearer(user))
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        huge = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 500}, headers=_bearer(user))
        assert huge.status_code == 429 and huge.json()["error"]["code"] == "tokens_exceed_limit"


def test_budget_reserves_prompt_plus_max_tokens_and_settles_real_use(world: World) -> None:
    with make_client(world) as client:
        admin = _admin(client)
        auth = _bearer(admin)
        client.post("/v1/admin/tenants", json={"name": "small", "daily_tokens": 40}, headers=auth)
        user = _user(client, admin, "small")
        # Fake reply is 5 words; the prompt is a handful of tokens. max_tokens=30 reserves ~35.
        r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 30}, headers=_bearer(user))
        assert r.status_code == 200
        used = r.json()["usage"]["total_tokens"]
        left = client.get("/v1/admin/tenants/small", headers=auth).json()["budget_remaining"]["daily"]
        assert left == 40 - used
        r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 38}, headers=_bearer(user))
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "budget_exceeded" and "retry-after" in r.headers


def test_every_request_is_metered_and_the_chain_detects_tampering(world: World, tmp_path: Path) -> None:
    with make_client(world, APPLIANCE_DATA_DIR=str(tmp_path)) as client:
        admin = _admin(client)
        user = _user(client, admin, "team-a")
        client.post("/v1/chat/completions", json=CHAT, headers=_bearer(user))
        client.post("/v1/embeddings", json={"model": "embed-model", "input": ["a b c", "d"]}, headers=_bearer(user))
        client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=_bearer(user))
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=_bearer(user)) as r:
            assert r.status_code == 200
            r.read()
        report = client.get("/v1/usage?group_by=model", headers=_bearer(user)).json()["data"]
        by_model = {row["model"]: row for row in report}
        assert by_model["chat-model"]["requests"] == 2
        assert by_model["chat-model"]["completion_tokens"] == 10
        assert by_model["embed-model"]["embedding_tokens"] == 4
        assert client.get("/v1/admin/usage/verify", headers=_bearer(admin)).json()["ok"] is True
        # A user key sees its own tenant only.
        assert client.get("/v1/usage?tenant=ops", headers=_bearer(user)).status_code == 403
    db = connect(tmp_path / "gateway.db")
    rows = db.execute("SELECT seq, tenant, route, status, outcome FROM usage ORDER BY seq").fetchall()
    posts = [r for r in rows if r[1] == "team-a" and r[2].startswith("POST")]
    assert [r[2] for r in posts] == [
        "POST /v1/chat/completions", "POST /v1/embeddings", "POST /v1/chat/completions", "POST /v1/chat/completions",
    ]
    assert [r[3] for r in posts] == [200, 200, 404, 200]
    assert [r[2] for r in rows if r[1] == "team-a"][-2:] == ["GET /v1/usage", "GET /v1/usage"]
    from appliance.policy.metering import UsageMeter

    meter = UsageMeter(db)
    assert meter.verify().ok
    db.execute("UPDATE usage SET completion_tokens = 1 WHERE seq = 3")
    bad = meter.verify()
    assert not bad.ok and bad.first_bad_seq == 3 and "edited" in (bad.problem or "")


def test_metrics_are_for_loopback_clients_by_default(world: World) -> None:
    with make_client(world) as client:  # the test client's address is "testclient", not loopback
        r = client.get("/metrics")
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


def test_metrics_and_request_ids(world: World) -> None:
    with make_client(world, APPLIANCE_METRICS_ACCESS="open") as client:
        r = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-12345678"})
        assert r.headers["x-request-id"] == "trace-12345678"
        assert len(client.get("/health").headers["x-request-id"]) == 32
        text = client.get("/metrics").text
        assert 'appliance_requests_total{route="POST /v1/chat/completions",status="200",tenant="default"} 1.0' in text
        assert 'appliance_tokens_total{direction="completion",model="chat-model",tenant="default"} 5.0' in text
        assert "appliance_time_to_first_token_seconds_bucket" in text
        assert "appliance_model_ready" in text


def _usage_outcomes(tmp_path: Path) -> list[tuple[str, int, int]]:
    db = connect(tmp_path / "gateway.db")
    return [
        (r["outcome"], r["prompt_tokens"], r["completion_tokens"])
        for r in db.execute("SELECT * FROM usage WHERE route = 'POST /v1/chat/completions' ORDER BY seq")
    ]


def test_deterministic_responses_are_cached_per_tenant(world: World, tmp_path: Path) -> None:
    with make_client(world, APPLIANCE_DATA_DIR=str(tmp_path)) as client:
        body = {**CHAT, "temperature": 0}
        first = client.post("/v1/chat/completions", json=body)
        second = client.post("/v1/chat/completions", json=body)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert first.json()["choices"] == second.json()["choices"]
        assert len(world.chat.requests) == 1
        # The streamed form of the same request is served from the cache too.
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.headers["x-cache"] == "hit"
            assert "Hello" in r.read().decode()
        assert len(world.chat.requests) == 1
        # Cache-Control: no-cache bypasses; sampling without a seed is never cached; other params miss.
        assert client.post("/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"}).headers["x-cache"] == "miss"
        assert client.post("/v1/chat/completions", json={**CHAT, "temperature": 0.7}).headers["x-cache"] == "miss"
        assert client.post("/v1/chat/completions", json={**CHAT, "temperature": 0.7}).headers["x-cache"] == "miss"
        assert client.post("/v1/chat/completions", json={**body, "max_tokens": 3}).headers["x-cache"] == "miss"
        seeded = {**CHAT, "temperature": 0.9, "seed": 7}
        client.post("/v1/chat/completions", json=seeded)
        assert client.post("/v1/chat/completions", json=seeded).headers["x-cache"] == "hit"
        assert len(world.chat.requests) == 6
        # Another tenant never gets this tenant's cached answer.
        admin = _admin(client)
        other = _user(client, admin, "team-b")
        assert client.post("/v1/chat/completions", json=body, headers=_bearer(other)).headers["x-cache"] == "miss"
    outcomes = _usage_outcomes(tmp_path)
    assert outcomes[1] == ("cached", 0, 0)  # a cached answer ran no model and costs no tokens
    assert outcomes[0][0] == "ok" and outcomes[0][2] == 5


def test_semantic_cache_reuses_answers_to_similar_prompts(world: World) -> None:
    env = {"APPLIANCE_SEMANTIC_CACHE_THRESHOLD": "0.95", "APPLIANCE_EMBEDDING_MODEL": "embed-model"}
    with make_client(world, **env) as client:
        # The fake embedder maps every text to the same vector: any prompt is "similar".
        a = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
        b = client.post("/v1/chat/completions", json={
            **CHAT, "temperature": 0, "messages": [{"role": "user", "content": "hello there"}]})
        assert (a.headers["x-cache"], b.headers["x-cache"]) == ("miss", "hit")
        c = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "max_tokens": 2})
        assert c.headers["x-cache"] == "miss"  # different parameters: a different scope
