"""The gateway's SQLite database (DATA_DIR/gateway.db): tenants, API keys, usage, its journal, the audit log."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance.storage.sqlite import connect, migrate


def _m1_tenants_and_keys(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE tenants (
            name TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            allowed_models TEXT,          -- JSON list of model ids; NULL: every model
            rpm INTEGER, tpm INTEGER,     -- NULL: the gateway settings' defaults
            daily_tokens INTEGER, monthly_tokens INTEGER,  -- NULL: no budget
            guardrails TEXT               -- JSON GuardrailPolicy; NULL: the default policy
        )"""
    )
    conn.execute(
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,          -- the visible part of the key, e.g. ak_1a2b3c4d
            tenant TEXT NOT NULL REFERENCES tenants(name),
            role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
            secret_sha256 BLOB NOT NULL,
            name TEXT,
            created_at REAL NOT NULL,
            expires_at REAL,
            revoked_at REAL,
            rpm INTEGER, tpm INTEGER
        )"""
    )
    conn.execute("CREATE INDEX api_keys_tenant ON api_keys(tenant)")


def _m2_usage(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE usage (
            seq INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL,
            ts REAL NOT NULL,
            tenant TEXT, key_id TEXT, model TEXT, route TEXT NOT NULL, status INTEGER NOT NULL,
            outcome TEXT NOT NULL,        -- ok | error | cancelled | interrupted | forwarded | cached
            prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
            embedding_tokens INTEGER NOT NULL, retrieved_chunks INTEGER NOT NULL,
            latency_ms REAL, ttft_ms REAL,
            guardrails TEXT NOT NULL,     -- JSON list of actions: kinds and counts, never the text
            peer TEXT,                    -- the peer that served a forwarded request, or that forwarded it here
            prev_hash TEXT NOT NULL, hash TEXT NOT NULL
        )"""
    )
    conn.execute("CREATE INDEX usage_tenant_ts ON usage(tenant, ts)")
    # The journal of requests that started generating: replayed as 'interrupted' usage after a crash.
    conn.execute(
        """CREATE TABLE usage_inflight (
            request_id TEXT PRIMARY KEY, started_at REAL NOT NULL,
            tenant TEXT, key_id TEXT, model TEXT, route TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
            embedding_tokens INTEGER NOT NULL, retrieved_chunks INTEGER NOT NULL,
            ttft_ms REAL, guardrails TEXT NOT NULL
        )"""
    )
    conn.execute(
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY, ts REAL NOT NULL, request_id TEXT, tenant TEXT, key_id TEXT,
            stage TEXT NOT NULL, kind TEXT NOT NULL, action TEXT NOT NULL, count INTEGER NOT NULL
        )"""
    )


def _m3_usage_route_path(conn: sqlite3.Connection) -> None:
    # The hops of a routed model id, e.g. "auto>smollm2-135m(queue_full)>gemma3-270m"; NULL otherwise.
    conn.execute("ALTER TABLE usage ADD COLUMN route_path TEXT")


def _m4_variants_feedback_shadow(conn: sqlite3.Connection) -> None:
    # The split variant a routed request was given (canary / A/B); NULL when its route has no split.
    conn.execute("ALTER TABLE usage ADD COLUMN variant TEXT")
    conn.execute("CREATE INDEX usage_request ON usage(request_id)")
    # Users' verdicts on answers: every one kept; the latest per request counts (eval compare).
    conn.execute(
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY, ts REAL NOT NULL, request_id TEXT NOT NULL,
            tenant TEXT, key_id TEXT,
            score REAL NOT NULL,          -- -1 (bad) .. 1 (good)
            comment TEXT
        )"""
    )
    conn.execute("CREATE INDEX feedback_request ON feedback(request_id)")
    # A shadow model's answer to a copy of a routed request (never sent), beside the served answer.
    conn.execute(
        """CREATE TABLE shadow (
            id INTEGER PRIMARY KEY, ts REAL NOT NULL, request_id TEXT NOT NULL,
            tenant TEXT, route TEXT NOT NULL, variant TEXT, served_model TEXT,
            model TEXT NOT NULL,
            outcome TEXT NOT NULL,        -- ok | error | skipped_busy | skipped_not_ready | skipped_not_allowed
            latency_ms REAL, ttft_ms REAL,
            prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
            output_sha256 TEXT, output TEXT,                -- output: the first shadow.keep_chars characters
            served_output_sha256 TEXT, served_output TEXT,
            error TEXT
        )"""
    )
    conn.execute("CREATE INDEX shadow_request ON shadow(request_id)")


def _m5_tenant_default_adapter(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE tenants ADD COLUMN default_adapter TEXT")  # a LoRA adapter id; NULL: none


MIGRATIONS = (
    _m1_tenants_and_keys, _m2_usage, _m3_usage_route_path, _m4_variants_feedback_shadow, _m5_tenant_default_adapter,
)


def open_gateway_db(data_dir: Path) -> sqlite3.Connection:
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(data_dir / "gateway.db")
    migrate(conn, MIGRATIONS)
    return conn
