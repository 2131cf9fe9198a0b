"""Changing models safely: users' feedback on answers, shadow answers, and the per-variant comparison.

Feedback and shadow records live beside the usage chain in the gateway database (tables `feedback` and
`shadow`, migration 4), outside the hash chain: a verdict given later must not rewrite a billed record.
`compare` joins the three: per route and variant, what the requests cost and how they were judged.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from typing import Any, Literal

import msgspec

from appliance.errors import RequestNotFound
from appliance.settings import Price

ShadowOutcome = Literal["ok", "error", "skipped_busy", "skipped_not_ready", "skipped_not_allowed"]
MAX_COMMENT_CHARS = 2000


class FeedbackRecord(msgspec.Struct, kw_only=True):
    id: int
    ts: float
    request_id: str
    score: float
    comment: str | None
    model: str | None
    """The model that answered the request (from its usage record)."""
    variant: str | None


class ShadowRecord(msgspec.Struct, kw_only=True):
    """A shadow model's answer to a copy of a routed request (or why there is none), beside the served one's."""

    request_id: str
    ts: float
    tenant: str | None
    route: str
    variant: str | None
    served_model: str | None
    model: str
    outcome: ShadowOutcome
    latency_ms: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_sha256: str | None = None
    output: str | None = None
    served_output_sha256: str | None = None
    served_output: str | None = None
    error: str | None = None


_SHADOW_FIELDS = tuple(f.name for f in msgspec.structs.fields(ShadowRecord))


class ExperimentStore:
    """Writes feedback and shadow records (its own connection: the usage meter's transactions stay its own)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def add_feedback(
        self, request_id: str, *, tenant: str, key_id: str | None, score: float, comment: str | None
    ) -> FeedbackRecord:
        """Store a verdict on one of `tenant`'s requests; a request of another tenant is as unknown as a made-up id."""
        usage = self._conn.execute(
            "SELECT model, variant FROM usage WHERE request_id = ? AND tenant = ? ORDER BY seq DESC LIMIT 1",
            (request_id, tenant),
        ).fetchone()
        if usage is None:
            raise RequestNotFound(
                f"No request '{request_id}' of this tenant has a usage record (send the X-Request-Id of an answer).",
                param="request_id",
            )
        ts = time.time()
        with self._lock:
            cursor = self._conn.execute(
                "INSERT INTO feedback(ts, request_id, tenant, key_id, score, comment) VALUES (?, ?, ?, ?, ?, ?)",
                (ts, request_id, tenant, key_id, score, comment),
            )
        return FeedbackRecord(id=int(cursor.lastrowid or 0), ts=ts, request_id=request_id, score=score,
                              comment=comment, model=usage["model"], variant=usage["variant"])

    def record_shadow(self, record: ShadowRecord) -> None:
        row = msgspec.to_builtins(record)
        with self._lock:
            self._conn.execute(
                f"INSERT INTO shadow({', '.join(_SHADOW_FIELDS)}) VALUES ({', '.join('?' * len(_SHADOW_FIELDS))})",
                [row[f] for f in _SHADOW_FIELDS],
            )

    def close(self) -> None:
        self._conn.close()


# -- the comparison ----------------------------------------------------------------------------


class VariantReport(msgspec.Struct, kw_only=True):
    route: str
    variant: str
    """The split variant; for a route without a split, the model that served; for a shadow, "shadow:<model>"."""
    shadow: bool = False
    requests: int = 0
    errors: int = 0
    cached: int = 0
    """Answered from the response cache (no model ran): left out of the latency percentiles."""
    skipped: int = 0
    """Shadows only: copies not run because the shadow model or the route's shadow slots were busy."""
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    feedback: int = 0
    """Requests with a verdict (the latest one counts)."""
    feedback_mean: float | None = None
    grounded_answers: int = 0
    """Requests that answered from retrieved documents (a `collection`)."""
    grounded_rate: float | None = None
    """Of those, the share whose citations checked out."""
    same_output: float | None = None
    """Shadows only: the share of answers identical to the served one."""
    models: dict[str, int] = msgspec.field(default_factory=dict)
    """Requests per model that answered (a variant's model may fall back to another)."""


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (pos - low), 1)


def _cost(prices: dict[str, Price], model: str | None, prompt: int, completion: int) -> float:
    price = prices.get(model or "", Price())
    return (prompt * price.prompt_per_1k + completion * price.completion_per_1k) / 1000


def compare(
    conn: sqlite3.Connection, prices: dict[str, Price], *, route: str | None = None,
    since: float | None = None, until: float | None = None,
) -> list[VariantReport]:
    """Per route and variant: requests, latency and TTFT percentiles, tokens, cost, feedback, grounded rate;
    and per shadow model the same from its shadow records."""
    clauses, args = ["u.route_path IS NOT NULL"], []
    if route is not None:
        clauses.append("(u.route_path = ? OR u.route_path LIKE ?)")
        args += [route, route + ">%"]
    if since is not None:
        clauses.append("u.ts >= ?")
        args.append(since)
    if until is not None:
        clauses.append("u.ts < ?")
        args.append(until)
    rows = conn.execute(
        "SELECT u.*, (SELECT f.score FROM feedback f WHERE f.request_id = u.request_id AND f.tenant IS u.tenant"
        " ORDER BY f.id DESC LIMIT 1) AS score"
        f" FROM usage u WHERE {' AND '.join(clauses)} ORDER BY u.seq",
        args,
    ).fetchall()
    groups: dict[tuple[str, str], list[sqlite3.Row]] = {}
    for r in rows:
        name = r["route_path"].split(">", 1)[0]
        groups.setdefault((name, r["variant"] or r["model"] or "-"), []).append(r)
    reports = [_served(name, variant, group, prices) for (name, variant), group in sorted(groups.items())]
    reports += _shadows(conn, prices, route, since, until)
    return reports


def _served(route: str, variant: str, rows: list[sqlite3.Row], prices: dict[str, Price]) -> VariantReport:
    report = VariantReport(route=route, variant=variant, requests=len(rows))
    ok = [r for r in rows if r["status"] < 400]
    report.errors = len(rows) - len(ok)
    ran = [r for r in ok if r["outcome"] != "cached"]
    report.cached = len(ok) - len(ran)
    latencies = [r["latency_ms"] for r in ran if r["latency_ms"] is not None]
    report.latency_p50_ms, report.latency_p95_ms = percentile(latencies, 50), percentile(latencies, 95)
    ttfts = [r["ttft_ms"] for r in ran if r["ttft_ms"] is not None]
    report.ttft_p50_ms, report.ttft_p95_ms = percentile(ttfts, 50), percentile(ttfts, 95)
    for r in rows:
        report.prompt_tokens += r["prompt_tokens"]
        report.completion_tokens += r["completion_tokens"]
        report.cost += _cost(prices, r["model"], r["prompt_tokens"], r["completion_tokens"])
        if r["status"] < 400 and r["model"]:
            report.models[r["model"]] = report.models.get(r["model"], 0) + 1
    report.cost = round(report.cost, 6)
    scores = [r["score"] for r in rows if r["score"] is not None]
    report.feedback = len(scores)
    report.feedback_mean = round(sum(scores) / len(scores), 3) if scores else None
    # A grounded answer retrieved chunks; one whose citations did not check out carries an "ungrounded" flag.
    grounded = [r for r in ok if r["retrieved_chunks"] > 0 and r["route"].endswith("/chat/completions")]
    report.grounded_answers = len(grounded)
    if grounded:
        good = sum(not any(a["kind"] == "ungrounded" for a in json.loads(r["guardrails"])) for r in grounded)
        report.grounded_rate = round(good / len(grounded), 3)
    return report


def _shadows(
    conn: sqlite3.Connection, prices: dict[str, Price], route: str | None, since: float | None, until: float | None
) -> list[VariantReport]:
    clauses, args = ["1 = 1"], []
    for clause, value in (("route = ?", route), ("ts >= ?", since), ("ts < ?", until)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    rows = conn.execute(f"SELECT * FROM shadow WHERE {' AND '.join(clauses)} ORDER BY id", args).fetchall()
    groups: dict[tuple[str, str], list[sqlite3.Row]] = {}
    for r in rows:
        groups.setdefault((r["route"], r["model"]), []).append(r)
    out = []
    for (name, model), group in sorted(groups.items()):
        ran = [r for r in group if not r["outcome"].startswith("skipped")]
        ok = [r for r in ran if r["outcome"] == "ok"]
        latencies = [r["latency_ms"] for r in ok if r["latency_ms"] is not None]
        ttfts = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
        report = VariantReport(
            route=name, variant=f"shadow:{model}", shadow=True, requests=len(ran), errors=len(ran) - len(ok),
            skipped=len(group) - len(ran), latency_p50_ms=percentile(latencies, 50),
            latency_p95_ms=percentile(latencies, 95), ttft_p50_ms=percentile(ttfts, 50),
            ttft_p95_ms=percentile(ttfts, 95), models={model: len(ok)} if ok else {},
        )
        for r in ok:
            report.prompt_tokens += r["prompt_tokens"]
            report.completion_tokens += r["completion_tokens"]
            report.cost += _cost(prices, model, r["prompt_tokens"], r["completion_tokens"])
        report.cost = round(report.cost, 6)
        if ok:
            same = sum(r["output_sha256"] == r["served_output_sha256"] for r in ok)
            report.same_output = round(same / len(ok), 3)
        out.append(report)
    return out


def compare_rows(reports: list[VariantReport]) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(r) for r in reports]
