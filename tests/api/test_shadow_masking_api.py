"""A shadow copy's answer is stored under the tenant's output PII policy, as the served answer is sent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from appliance.storage.sqlite import connect
from tests.api.test_gateway import _bearer, _guarded
from tests.api.test_routing_api import RoutedWorld, _client, _wait_ready

ROUTES = """
[routing.trial]
candidates = ["chat-a"]
shadow = {model = "chat-b", share = 1.0}
"""
SECRET_CARD = "4111 1111 1111 1111"
SECRET_MAIL = "jane.doe@example.com"


def _shadow_rows(tmp_path: Path, count: int) -> list[Any]:
    db = connect(tmp_path / "gateway.db")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = db.execute("SELECT tenant, outcome, output, served_output FROM shadow ORDER BY rowid").fetchall()
        if len(rows) >= count:
            return [tuple(r) for r in rows]
        time.sleep(0.05)
    raise AssertionError("the shadow copies were not recorded")


def test_the_shadow_answer_is_masked_before_it_is_stored(tmp_path: Path) -> None:
    world = RoutedWorld()
    world.a.reply = "Served: call me at jane.doe@example.com please."
    world.b.reply = f"Shadow: card {SECRET_CARD} and mail {SECRET_MAIL} done."
    with _client(world, tmp_path, ROUTES) as client:
        _wait_ready(client, "chat-a", "chat-b")
        key, admin = _guarded(client, {"pii_output": "mask"})
        r = client.post("/v1/chat/completions", headers=_bearer(key), json={
            "model": "trial", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "Served: call me at [EMAIL_1] please."
        # The served request's audit counts the served answer only, not the shadow's.
        assert [g["kind"] for g in r.json()["guardrails"] if g["stage"] == "output"] == ["email"]
        [row] = _shadow_rows(tmp_path, 1)
        assert row[:2] == ("guarded", "ok")
        assert row[2] == "Shadow: card [CREDIT_CARD_1] and mail [EMAIL_1] done."
        assert row[3] == "Served: call me at [EMAIL_1] please."

        # Streamed, and on the Ollama route: the same.
        r = client.post("/api/generate", headers=_bearer(key), json={"model": "trial", "prompt": "hi"})
        assert r.status_code == 200 and "[EMAIL_1]" in r.text and SECRET_MAIL not in r.text
        rows = _shadow_rows(tmp_path, 2)
        assert rows[1][2] == "Shadow: card [CREDIT_CARD_1] and mail [EMAIL_1] done."

        # A tenant without output masking has the shadow's answer stored as generated.
        r = client.post("/v1/chat/completions", headers=_bearer(admin), json={
            "model": "trial", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        rows = _shadow_rows(tmp_path, 3)
        assert SECRET_CARD in rows[2][2]
    db = connect(tmp_path / "gateway.db")
    stored = db.execute("SELECT output, served_output FROM shadow WHERE tenant = 'guarded'").fetchall()
    assert len(stored) == 2 and not any(SECRET_CARD in (o or "") or SECRET_MAIL in (o or "") for row in stored for o in row)
    audit = db.execute("SELECT kind FROM audit WHERE stage = 'output'").fetchall()
    assert "credit_card" not in {a[0] for a in audit}  # the shadow's card number is not in the served audit
