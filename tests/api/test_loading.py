"""Model loading states as /health and requests see them."""

from __future__ import annotations

import threading

from tests.api.conftest import World, make_client


def test_health_is_503_while_loading_then_200(world: World) -> None:
    gate = threading.Event()
    real = world.factory

    def slow_factory(m):  # type: ignore[no-untyped-def]
        gate.wait(10)
        return real(m)

    world.factory = slow_factory  # type: ignore[method-assign]
    with make_client(world) as client:
        resp = client.get("/health")
        assert resp.status_code == 503
        assert resp.json()["status"] == "loading"
        gate.set()
        # A request arriving during loading waits for its model instead of failing.
        resp = client.post("/v1/completions", json={"model": "chat-model", "prompt": "x"})
        assert resp.status_code == 200
        for _ in range(50):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.1)
        assert client.get("/health").json()["status"] == "ok"


def test_failed_model_degrades_health_and_answers_503(world: World) -> None:
    world.engines["base-model"] = RuntimeError("corrupt tensor data")
    with make_client(world) as client:
        for _ in range(50):
            if client.get("/health").json()["status"] != "loading":
                break
            threading.Event().wait(0.05)
        resp = client.get("/health")
        assert resp.status_code == 503
        assert resp.json()["status"] == "degraded"
        assert resp.json()["models"]["base-model"]["state"] == "failed"
        err = client.post("/v1/completions", json={"model": "base-model", "prompt": "x"})
        assert err.status_code == 503
        assert err.json()["error"]["code"] == "model_unavailable"
        # Other models keep serving.
        assert client.post("/v1/completions", json={"model": "chat-model", "prompt": "x"}).status_code == 200


def test_lazy_mode_loads_on_first_use(world: World) -> None:
    loaded: list[str] = []
    real = world.factory

    def counting(m):  # type: ignore[no-untyped-def]
        loaded.append(m.id)
        return real(m)

    world.factory = counting  # type: ignore[method-assign]
    with make_client(world, APPLIANCE_MODEL_LOAD="lazy") as client:
        health = client.get("/health")
        # ok: the server can serve; the body says which models a first request will still have to load
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["waiting"] == sorted(m.id for m in world.manifests)
        assert {s["state"] for s in health.json()["models"].values()} == {"pending"}
        assert loaded == []
        client.post("/v1/embeddings", json={"model": "embed-model", "input": "x"})
        assert loaded == ["embed-model"]
        health = client.get("/health").json()
        assert "embed-model" not in health["waiting"] and health["models"]["embed-model"]["state"] == "ready"
