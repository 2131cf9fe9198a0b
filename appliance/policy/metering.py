"""Chargeback-grade usage metering: one hash-chained record per request, durable before the response ends.

Each record's hash covers its sequence number, its fields and the previous record's hash, so an
edited, deleted or reordered record breaks the chain at that point (`verify`). Removing records
from the very end leaves a shorter valid chain: `verify` prints the head hash so an operator can
anchor it elsewhere and pass it back with `expect_head`.

Generations that started are journalled in `usage_inflight` and checkpointed while they stream;
a crash leaves the row behind, and `replay_interrupted` turns it into an 'interrupted' record at
the next start, so usage that was served is never lost.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from appliance.errors import InvalidRequest
from appliance.policy.guardrails.types import GuardrailAction
from appliance.settings import Price

GENESIS = "0" * 64
_HEX64 = re.compile(r"[0-9a-f]{64}")
Outcome = Literal["ok", "error", "cancelled", "interrupted", "forwarded", "cached"]
GroupBy = Literal["model", "key", "day", "tenant", "route"]
_RECORD_FIELDS = (
    "request_id", "ts", "tenant", "key_id", "model", "route", "status", "outcome", "prompt_tokens",
    "completion_tokens", "embedding_tokens", "retrieved_chunks", "latency_ms", "ttft_ms", "guardrails", "peer",
    "route_path", "variant",
)
# Fields added after records were written: a record's hash covers them only when they are set, so the
# chain written before they existed still verifies.
_OPTIONAL_FIELDS = ("route_path", "variant")


class UsageRecord(msgspec.Struct, kw_only=True):
    request_id: str
    ts: float
    tenant: str | None
    key_id: str | None
    model: str | None
    route: str
    status: int
    outcome: Outcome
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_tokens: int = 0
    retrieved_chunks: int = 0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    guardrails: list[GuardrailAction] = msgspec.field(default_factory=list)
    peer: str | None = None
    route_path: str | None = None
    """A routed model id's path, e.g. "auto>smollm2-135m(queue_full)>gemma3-270m"; None for a plain model id."""
    variant: str | None = None
    """The split variant (canary / A/B) the request was given; None when its route has no split."""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens + self.embedding_tokens


class VerifyResult(msgspec.Struct, kw_only=True):
    ok: bool
    records: int
    head: str
    first_bad_seq: int | None = None
    problem: str | None = None
    since_expected: int | None = None
    """With an expected head found in the chain: the records written after it (normal growth)."""


def _canonical(seq: int, prev_hash: str, row: dict[str, Any]) -> bytes:
    fields = {name: row[name] for name in _RECORD_FIELDS if name not in _OPTIONAL_FIELDS or row[name] is not None}
    if isinstance(fields["guardrails"], str):
        fields["guardrails"] = json.loads(fields["guardrails"])
    return json.dumps([seq, prev_hash, fields], sort_keys=True, separators=(",", ":")).encode()


def _digest(seq: int, prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(seq, prev_hash, row)).hexdigest()


def _row(record: UsageRecord) -> dict[str, Any]:
    row = msgspec.to_builtins(record)
    row["ts"] = float(row["ts"])
    for name in ("latency_ms", "ttft_ms"):
        if row[name] is not None:
            row[name] = round(float(row[name]), 3)
    return row


class UsageMeter:
    def __init__(self, conn: sqlite3.Connection, prices: dict[str, Price] | None = None) -> None:
        self._conn = conn
        self._prices = prices or {}
        self._lock = threading.Lock()

    # -- writing -------------------------------------------------------------------------------

    def record(self, record: UsageRecord) -> None:
        """Append one record to the chain and forget its journal row, in one durable transaction."""
        row = _row(record)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                last = self._conn.execute("SELECT seq, hash FROM usage ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (last["seq"] + 1, last["hash"]) if last else (1, GENESIS)
                digest = _digest(seq, prev, row)
                self._conn.execute(
                    f"INSERT INTO usage(seq, {', '.join(_RECORD_FIELDS)}, prev_hash, hash)"
                    f" VALUES (?, {', '.join('?' * len(_RECORD_FIELDS))}, ?, ?)",
                    (seq, *[json.dumps(row[f]) if f == "guardrails" else row[f] for f in _RECORD_FIELDS], prev, digest),
                )
                self._conn.execute("DELETE FROM usage_inflight WHERE request_id = ?", (record.request_id,))
                self._conn.executemany(
                    "INSERT INTO audit(ts, request_id, tenant, key_id, stage, kind, action, count)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (record.ts, record.request_id, record.tenant, record.key_id, a.stage, a.kind, a.action, a.count)
                        for a in record.guardrails
                    ],
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def begin(self, record: UsageRecord) -> None:
        """Journal a generation that is about to stream, so a crash cannot lose what it served."""
        row = _row(record)
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO usage_inflight(request_id, started_at, tenant, key_id, model, route,"
                " prompt_tokens, completion_tokens, embedding_tokens, retrieved_chunks, ttft_ms, guardrails)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row["request_id"], row["ts"], row["tenant"], row["key_id"], row["model"], row["route"],
                    row["prompt_tokens"], row["completion_tokens"], row["embedding_tokens"],
                    row["retrieved_chunks"], row["ttft_ms"], json.dumps(row["guardrails"]),
                ),
            )

    def checkpoint(self, request_id: str, completion_tokens: int, ttft_ms: float | None) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE usage_inflight SET completion_tokens = ?, ttft_ms = ? WHERE request_id = ?",
                (completion_tokens, ttft_ms, request_id),
            )

    def replay_interrupted(self) -> int:
        """Turn journal rows a crash left behind into 'interrupted' usage records (call at start-up)."""
        rows = self._conn.execute("SELECT * FROM usage_inflight ORDER BY started_at").fetchall()
        for r in rows:
            self.record(
                UsageRecord(
                    request_id=r["request_id"], ts=r["started_at"], tenant=r["tenant"], key_id=r["key_id"],
                    model=r["model"], route=r["route"], status=200, outcome="interrupted",
                    prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"],
                    embedding_tokens=r["embedding_tokens"], retrieved_chunks=r["retrieved_chunks"],
                    ttft_ms=r["ttft_ms"], guardrails=msgspec.convert(json.loads(r["guardrails"]), list[GuardrailAction]),
                )
            )
        return len(rows)

    # -- reading -------------------------------------------------------------------------------

    def tokens_since(self, tenant: str, since: float) -> int:
        row = self._conn.execute(
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens + embedding_tokens), 0) FROM usage"
            " WHERE tenant = ? AND ts >= ?",
            (tenant, since),
        ).fetchone()
        return int(row[0])

    def verify(self, expect_head: str | None = None) -> VerifyResult:
        """Check every record's hash and link. `expect_head`: a head printed earlier, which must still be
        in the chain (records written since are fine; a chain cut before it is not)."""
        if expect_head is not None and not _HEX64.fullmatch(expect_head):
            raise InvalidRequest(
                f"{expect_head!r} is not a head hash: give the 64 hex digits `usage verify` printed", param="expect_head"
            )
        prev, count = GENESIS, 0
        expected_seq = 1
        anchor = 0 if expect_head == GENESIS else None
        for r in self._conn.execute("SELECT * FROM usage ORDER BY seq"):
            row = dict(r)
            problem = None
            if row["seq"] != expected_seq:
                problem = f"record {expected_seq} is missing (next is {row['seq']})"
            elif row["prev_hash"] != prev:
                problem = "its prev_hash does not match the record before it (a record was removed or reordered)"
            elif _digest(row["seq"], prev, row) != row["hash"]:
                problem = "its content does not match its hash (the record was edited)"
            if problem is not None:
                return VerifyResult(ok=False, records=count, head=prev, first_bad_seq=row["seq"] if row["seq"] == expected_seq else expected_seq, problem=problem)
            prev, count, expected_seq = row["hash"], count + 1, expected_seq + 1
            if row["hash"] == expect_head:
                anchor = count
        if expect_head is None:
            return VerifyResult(ok=True, records=count, head=prev)
        if anchor is None:
            return VerifyResult(
                ok=False, records=count, head=prev,
                problem=(
                    f"no record has the expected head hash {expect_head}: records were removed from the end, "
                    "or the hash is not one this chain ever had (check it was copied whole)"
                ),
            )
        return VerifyResult(ok=True, records=count, head=prev, since_expected=count - anchor)

    def report(
        self, *, group_by: GroupBy, tenant: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """Totals per group, with cost from the price table (models without a price cost 0)."""
        column = {
            "model": "model", "key": "key_id", "tenant": "tenant", "route": "route",
            "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
        }.get(group_by)
        if column is None:
            raise InvalidRequest("group_by must be one of model, key, day, tenant, route.", param="group_by")
        where, args = _window(tenant, since, until)
        rows = self._conn.execute(
            f"SELECT {column} AS grp, model, COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens,"
            " SUM(completion_tokens) AS completion_tokens, SUM(embedding_tokens) AS embedding_tokens,"
            " SUM(retrieved_chunks) AS retrieved_chunks, SUM(status >= 400) AS errors"
            f" FROM usage {where} GROUP BY grp, model ORDER BY grp",
            args,
        ).fetchall()
        out: dict[Any, dict[str, Any]] = {}
        for r in rows:
            price = self._prices.get(r["model"] or "", Price())
            cost = (
                (r["prompt_tokens"] + r["embedding_tokens"]) * price.prompt_per_1k
                + r["completion_tokens"] * price.completion_per_1k
            ) / 1000
            group = out.setdefault(
                r["grp"],
                {group_by: r["grp"], "requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                 "embedding_tokens": 0, "retrieved_chunks": 0, "errors": 0, "cost": 0.0},
            )
            for name in ("requests", "prompt_tokens", "completion_tokens", "embedding_tokens", "retrieved_chunks", "errors"):
                group[name] += r[name] or 0
            group["cost"] = round(group["cost"] + cost, 6)
        return list(out.values())


def _window(tenant: str | None, since: float | None, until: float | None) -> tuple[str, list[Any]]:
    clauses, args = [], []
    if tenant is not None:
        clauses.append("tenant = ?")
        args.append(tenant)
    if since is not None:
        clauses.append("ts >= ?")
        args.append(since)
    if until is not None:
        clauses.append("ts < ?")
        args.append(until)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args


def parse_time(value: str | None, param: str) -> float | None:
    """An ISO date or date-time (UTC unless it says otherwise), or Unix seconds."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{param} must be an ISO 8601 date/time or Unix seconds.", param=param) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def period_starts(now: float | None = None) -> tuple[float, float]:
    """Start of the current UTC day and month, the budget periods."""
    t = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp(), day.replace(day=1).timestamp()
