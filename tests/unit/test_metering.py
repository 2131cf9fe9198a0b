"""Gateway database, usage chain, reports with prices, budgets (no server)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.errors import BudgetExceeded, InvalidRequest
from appliance.policy.db import MIGRATIONS, open_gateway_db
from appliance.policy.limits import BudgetLedger
from appliance.policy.metering import UsageMeter, UsageRecord
from appliance.policy.tenancy import TenantStore
from appliance.settings import Price


def test_blank_database_migrates_to_the_expected_schema(tmp_path: Path) -> None:
    conn = open_gateway_db(tmp_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"tenants", "api_keys", "usage", "usage_inflight", "audit"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert open_gateway_db(tmp_path).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def _record(i: int, **kw: object) -> UsageRecord:
    fields: dict[str, object] = dict(
        request_id=f"r{i}", ts=time.time(), tenant="t", key_id="ak_00000001", model="m", route="POST /v1/completions",
        status=200, outcome="ok", prompt_tokens=10, completion_tokens=5,
    )
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


def test_chain_verifies_and_reports_costs(tmp_path: Path) -> None:
    conn = open_gateway_db(tmp_path)
    meter = UsageMeter(conn, {"m": Price(prompt_per_1k=1.0, completion_per_1k=2.0)})
    for i in range(5):
        meter.record(_record(i))
    meter.record(_record(5, model="free", embedding_tokens=100, prompt_tokens=0, completion_tokens=0))
    result = meter.verify()
    assert result.ok and result.records == 6
    rows = {r["model"]: r for r in meter.report(group_by="model")}
    assert rows["m"]["requests"] == 5 and rows["m"]["cost"] == pytest.approx((50 * 1.0 + 25 * 2.0) / 1000)
    assert rows["free"]["cost"] == 0 and rows["free"]["embedding_tokens"] == 100
    assert meter.verify(expect_head=result.head).ok
    assert meter.verify(expect_head="0" * 64).ok  # the genesis is in every chain


def test_expect_head_accepts_growth_and_names_what_is_wrong(tmp_path: Path) -> None:
    meter = UsageMeter(open_gateway_db(tmp_path), {})
    meter.record(_record(0))
    first = meter.verify().head
    meter.record(_record(1))
    meter.record(_record(2))
    grown = meter.verify(expect_head=first)
    assert grown.ok and grown.since_expected == 2  # records written since the anchor are normal growth
    missing = meter.verify(expect_head="ab" * 32)
    assert not missing.ok and missing.first_bad_seq is None
    assert "no record has the expected head hash" in (missing.problem or "")
    with pytest.raises(InvalidRequest, match="not a head hash"):
        meter.verify(expect_head="0000")


def test_interrupted_generations_are_replayed_once(tmp_path: Path) -> None:
    conn = open_gateway_db(tmp_path)
    meter = UsageMeter(conn)
    meter.begin(_record(1, completion_tokens=0))
    meter.checkpoint("r1", 42, 12.5)
    assert UsageMeter(open_gateway_db(tmp_path)).replay_interrupted() == 1
    row = conn.execute("SELECT outcome, completion_tokens, ttft_ms FROM usage WHERE request_id = 'r1'").fetchone()
    assert tuple(row) == ("interrupted", 42, 12.5)
    assert meter.replay_interrupted() == 0
    assert meter.verify().ok


def test_budget_reservations_cannot_overspend(tmp_path: Path) -> None:
    conn = open_gateway_db(tmp_path)
    store = TenantStore(conn)
    tenant = store.create_tenant("t", daily_tokens=100)
    meter = UsageMeter(conn)
    ledger = BudgetLedger(meter)
    first = ledger.reserve(tenant, 60)
    with pytest.raises(BudgetExceeded) as exc:
        ledger.reserve(tenant, 41)
    assert exc.value.retry_after is not None and exc.value.retry_after >= 1
    second = ledger.reserve(tenant, 40)
    ledger.settle(first, 20)  # used less than reserved: the difference is free again
    assert ledger.remaining(tenant)["daily"] == 100 - 20 - 40
    ledger.settle(second, 40)
    ledger.settle(second, 40)  # settling twice changes nothing
    assert ledger.remaining(tenant)["daily"] == 40
