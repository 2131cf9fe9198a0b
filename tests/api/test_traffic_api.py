"""Traffic shaping through the real ASGI app (fake engines): a split sticky per key and per conversation,
a shadow that never reaches the client, feedback and its refusals."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from appliance.api.app import create_app
from appliance.engines.registry import ModelRegistry
from appliance.errors import SettingsError
from appliance.settings import load_settings
from appliance.storage.sqlite import connect
from appliance.types import EngineStats
from tests.api.conftest import World, make_client
from tests.fakes import FakeChatEngine, manifest

ROUTES = """
[routing.canary]
split = [{model = "stable", weight = 50}, {model = "next", weight = 50, name = "candidate"}]

[routing.talk]
split = [{model = "stable", weight = 50}, {model = "next", weight = 50}]
sticky = "conversation"

[routing.shadowed]
candidates = ["stable"]
shadow = {model = "next", share = 1.0, keep_chars = 12}
"""


class BusyEngine(FakeChatEngine):
    """A fake whose scheduler reports requests waiting (a shadow must not queue behind them)."""

    def __init__(self, model_id: str, reply: str) -> None:
        super().__init__(model_id, reply=reply, n_ctx=4096)
        self.queue_depth = 0

    def engine_stats(self) -> EngineStats:
        return EngineStats(requests=len(self.requests), queue_depth=self.queue_depth)


class TrafficWorld(World):
    def __init__(self) -> None:
        super().__init__()
        self.stable = BusyEngine("stable", "the stable answer")
        self.next = BusyEngine("next", "the candidate answer is longer")
        self.engines.update({"stable": self.stable, "next": self.next})
        self.manifests += [manifest("stable"), manifest("next")]


@pytest.fixture
def traffic(tmp_path: Path) -> Any:
    world = TrafficWorld()
    config = tmp_path / "appliance.toml"
    config.write_text(ROUTES)
    with make_client(world, APPLIANCE_CONFIG=str(config), APPLIANCE_DATA_DIR=str(tmp_path),
                     APPLIANCE_METRICS_ACCESS="open") as client:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client.get("/health").json()["models"]["next"]["state"] != "ready":
            time.sleep(0.05)
        yield world, client


def _chat(model: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def _keys(client: Any, n: int) -> tuple[str, list[str]]:
    """An admin key of tenant 'ops' (open mode allows the first), and n user keys of tenant 'acme'."""
    client.post("/v1/admin/tenants", json={"name": "ops"})
    admin = client.post("/v1/admin/keys", json={"tenant": "ops", "role": "admin"}).json()["key"]
    auth = {"Authorization": f"Bearer {admin}"}
    assert client.post("/v1/admin/tenants", json={"name": "acme"}, headers=auth).status_code == 201
    return admin, [client.post("/v1/admin/keys", json={"tenant": "acme"}, headers=auth).json()["key"] for _ in range(n)]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _db(tmp_path: Path) -> Any:
    return connect(tmp_path / "gateway.db")


def test_a_split_keeps_each_key_on_its_variant(traffic: Any, tmp_path: Path) -> None:
    _, client = traffic
    _, keys = _keys(client, 12)
    variants: dict[str, str] = {}
    for key in keys:
        seen = set()
        for _ in range(3):
            r = client.post("/v1/chat/completions", json=_chat("canary"), headers=_bearer(key))
            assert r.status_code == 200, r.text
            seen.add((r.headers["x-route-variant"], r.json()["model"], r.headers["x-route"]))
        assert len(seen) == 1, seen  # the same key, the same variant every time
        variants[key] = seen.pop()[0]
    # 12 keys at 50/50 all on one side would be a 1-in-2048 accident: the split is not sending anyone anywhere.
    assert set(variants.values()) == {"stable", "candidate"}
    answers = {v: m for (v, m, _) in [
        (variants[k], client.post("/v1/chat/completions", json=_chat("canary"), headers=_bearer(k)).json()["model"], 0)
        for k in keys]}
    assert answers == {"stable": "stable", "candidate": "next"}
    rows = _db(tmp_path).execute(
        "SELECT variant, model, route_path FROM usage WHERE route = 'POST /v1/chat/completions'").fetchall()
    assert {tuple(r) for r in rows} == {("stable", "stable", "canary>stable"), ("candidate", "next", "canary>next")}
    assert len(rows) == 12 * 4


def test_a_conversation_stays_on_its_variant(traffic: Any) -> None:
    _, client = traffic
    by_header = {
        client.post("/v1/chat/completions", json=_chat("talk", f"turn {i}"),
                    headers={"X-Conversation-Id": "conv-42"}).headers["x-route-variant"]
        for i in range(6)
    }
    assert len(by_header) == 1
    # Without the header: the opening messages decide, so a later turn of the same chat keeps the variant.
    firsts = {}
    for i in range(16):
        opening = [{"role": "user", "content": f"question {i}"}]
        first = client.post("/v1/chat/completions", json={**_chat("talk"), "messages": opening})
        later = client.post("/v1/chat/completions", json={**_chat("talk"), "messages": [
            *opening, {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "and then?"}]})
        assert first.headers["x-route-variant"] == later.headers["x-route-variant"]
        firsts[i] = first.headers["x-route-variant"]
    assert set(firsts.values()) == {"stable", "next"}  # one caller, many conversations: both variants


def _shadow_rows(tmp_path: Path, n: int) -> list[Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = _db(tmp_path).execute("SELECT * FROM shadow ORDER BY id").fetchall()
        if len(rows) >= n:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"expected {n} shadow records")


def test_a_shadow_answers_in_the_background_and_is_recorded_beside_the_served_answer(
    traffic: Any, tmp_path: Path
) -> None:
    world, client = traffic
    r = client.post("/v1/chat/completions", json=_chat("shadowed", "tell me"))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "the stable answer"
    assert r.headers["x-route"] == "shadowed>stable" and "x-route-variant" not in r.headers
    [row] = _shadow_rows(tmp_path, 1)
    assert row["request_id"] == r.headers["x-request-id"]
    assert (row["outcome"], row["route"], row["served_model"], row["model"]) == ("ok", "shadowed", "stable", "next")
    assert row["output"] == "the candidat"  # keep_chars = 12; the hash covers the whole answer
    assert row["served_output"] == "the stable a" and row["output_sha256"] != row["served_output_sha256"]
    assert row["completion_tokens"] == 5 and row["latency_ms"] > 0 and row["ttft_ms"] is not None
    # The shadow model ran the same prompt, behind interactive work, and billed nobody.
    assert world.next.requests[-1].prompt == world.stable.requests[-1].prompt
    assert world.next.requests[-1].priority > world.stable.requests[-1].priority
    usage = _db(tmp_path).execute("SELECT model, completion_tokens FROM usage WHERE request_id = ?",
                                  (row["request_id"],)).fetchall()
    assert [tuple(u) for u in usage] == [("stable", 3)]
    # Streamed answers are shadowed too, once the stream has ended.
    with client.stream("POST", "/v1/chat/completions", json=_chat("shadowed", stream=True)) as s:
        assert "stable" in s.read().decode()
    assert _shadow_rows(tmp_path, 2)[1]["outcome"] == "ok"
    # A shadow model with requests waiting is left alone: the copy is skipped, and says so.
    world.next.queue_depth = 1
    served = len(world.next.requests)
    assert client.post("/v1/chat/completions", json=_chat("shadowed")).status_code == 200
    assert _shadow_rows(tmp_path, 3)[2]["outcome"] == "skipped_busy"
    assert len(world.next.requests) == served
    metrics = client.get("/metrics").text
    assert 'appliance_shadow_requests_total{model="next",outcome="ok",route="shadowed"} 2.0' in metrics
    assert 'appliance_shadow_requests_total{model="next",outcome="skipped_busy",route="shadowed"} 1.0' in metrics


def test_feedback_round_trips_and_is_refused_clearly(traffic: Any, tmp_path: Path) -> None:
    _, client = traffic
    admin, [key] = _keys(client, 1)
    answered = client.post("/v1/chat/completions", json=_chat("canary"), headers=_bearer(key))
    rid = answered.headers["x-request-id"]
    r = client.post("/v1/feedback", json={"request_id": rid, "score": -1, "comment": "  off topic "},
                    headers=_bearer(key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "feedback" and body["id"].startswith("fb_")
    assert (body["request_id"], body["score"], body["comment"]) == (rid, -1, "off topic")
    assert (body["model"], body["variant"]) == (answered.json()["model"], answered.headers["x-route-variant"])
    assert client.post("/v1/feedback", json={"request_id": rid, "score": 1}, headers=_bearer(key)).status_code == 200

    def refused(payload: Any, key: str = key) -> dict[str, Any]:
        r = client.post("/v1/feedback", json=payload, headers=_bearer(key))
        assert 400 <= r.status_code < 500, r.text
        return {"status": r.status_code, **r.json()["error"]}

    # Another tenant's request is as unknown as one that never was.
    other = refused({"request_id": rid, "score": 1}, key=admin)
    assert (other["status"], other["code"], other["param"]) == (404, "request_not_found", "request_id")
    assert refused({"request_id": "no-such-request", "score": 1})["code"] == "request_not_found"
    too_high = refused({"request_id": rid, "score": 5})
    assert (too_high["status"], too_high["param"], too_high["type"]) == (400, "score", "invalid_request_error")
    assert refused({"request_id": rid, "score": -1.5})["param"] == "score"
    assert refused({"request_id": rid, "score": 1, "comment": "x" * 2001})["param"] == "comment"
    assert refused({"request_id": rid})["status"] == 400
    assert refused({"request_id": "", "score": 1})["param"] == "request_id"
    assert refused({"request_id": rid, "score": 1, "rating": 3})["status"] == 400
    assert client.post("/v1/feedback", content=b"{", headers=_bearer(key)).status_code == 400
    # Still serving, and the verdicts are stored beside the usage record (all kept).
    assert client.post("/v1/chat/completions", json=_chat("canary"), headers=_bearer(key)).status_code == 200
    rows = _db(tmp_path).execute("SELECT score, comment FROM feedback WHERE request_id = ? ORDER BY id", (rid,)).fetchall()
    assert [tuple(r) for r in rows] == [(-1.0, "off topic"), (1.0, None)]


def test_a_shadow_naming_an_unknown_model_stops_the_start(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[routing.r]\ncandidates = ["stable"]\nshadow = {model = "gpt-5"}\n')
    world = TrafficWorld()
    settings = load_settings(env={"APPLIANCE_CONFIG": str(config), "APPLIANCE_DATA_DIR": str(tmp_path)})
    with pytest.raises(SettingsError, match="routing.r.shadow: 'gpt-5' is not a chat model"):
        create_app(settings, ModelRegistry(world.manifests, world.factory, load_timeout_s=5))
