"""Command line for the gateway: `appliance tenants|keys|usage ...`. Works on the gateway database
directly (SQLite in WAL mode), so it is safe while the server runs; revocations apply at once."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click
import msgspec

from appliance.cli_common import data_settings
from appliance.errors import ApplianceError
from appliance.policy.db import open_gateway_db
from appliance.policy.metering import UsageMeter, parse_time
from appliance.policy.tenancy import TenantStore, TenantUpdate

@contextmanager
def _db(ctx: click.Context) -> Iterator[tuple[TenantStore, UsageMeter]]:
    settings = data_settings(ctx)
    conn = open_gateway_db(settings.data_dir)
    try:
        yield TenantStore(conn), UsageMeter(conn, settings.gateway.prices)
    except ApplianceError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    finally:
        conn.close()


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _expiry(value: str | None) -> float | None:
    """`30d`, `12h`, an ISO date/time or Unix seconds."""
    if not value:
        return None
    units = {"d": 86400, "h": 3600, "m": 60}
    if value[-1] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() + float(value[:-1]) * units[value[-1]]
    try:
        return parse_time(value, "expires")
    except ApplianceError as exc:
        raise click.BadParameter(f"{exc.message} (or a duration such as 30d, 12h)") from None


@click.group()
def tenants() -> None:
    """Tenants: the teams that share this appliance, each with its own keys, limits and data."""


def _check_adapter(ctx: click.Context, name: str | None) -> None:
    from appliance.modelstore.store import ModelStore

    if name is None:
        return
    found = ModelStore(data_settings(ctx).models_dir).find(name)
    if found is None or found.kind != "adapter":
        raise click.BadParameter(f"no LoRA adapter named {name!r} (appliance models list)", param_hint="--default-adapter")


@tenants.command("create")
@click.argument("name")
@click.option("--models", "allowed", help="Comma-separated model ids this tenant may use (default: all).")
@click.option("--rpm", type=click.IntRange(min=0), help="Requests per minute for the whole tenant.")
@click.option("--tpm", type=click.IntRange(min=0), help="Tokens per minute for the whole tenant.")
@click.option("--daily-tokens", type=click.IntRange(min=0), help="Token budget per UTC day.")
@click.option("--monthly-tokens", type=click.IntRange(min=0), help="Token budget per UTC month.")
@click.option("--guardrails", help='Guardrail policy as JSON, e.g. \'{"pii_input": "mask"}\'.')
@click.option("--default-adapter", help="LoRA adapter id its requests to that adapter's base model use by default.")
@click.pass_context
def tenants_create(ctx: click.Context, name: str, allowed: str | None, guardrails: str | None, **limits: Any) -> None:
    """Create a tenant."""
    fields = {k: v for k, v in limits.items() if v is not None}
    if allowed:
        fields["allowed_models"] = [m.strip() for m in allowed.split(",") if m.strip()]
    if guardrails:
        try:
            fields["guardrails"] = json.loads(guardrails)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--guardrails") from None
    _check_adapter(ctx, fields.get("default_adapter"))
    with _db(ctx) as (store, _):
        tenant = store.create_tenant(name, **fields)
    click.echo(f"created tenant {tenant.name}")


@tenants.command("update")
@click.argument("name")
@click.option("--models", "allowed", help="Comma-separated model ids; 'all' clears the allow-list.")
@click.option("--rpm", type=click.IntRange(min=0))
@click.option("--tpm", type=click.IntRange(min=0))
@click.option("--daily-tokens", type=click.IntRange(min=0))
@click.option("--monthly-tokens", type=click.IntRange(min=0))
@click.option("--guardrails", help="Guardrail policy as JSON.")
@click.option("--default-adapter", help="LoRA adapter id used by default; 'none' clears it.")
@click.pass_context
def tenants_update(ctx: click.Context, name: str, allowed: str | None, guardrails: str | None, **limits: Any) -> None:
    """Change a tenant's models, limits, budgets, guardrail policy or default adapter."""
    fields: dict[str, Any] = {k: v for k, v in limits.items() if v is not None}
    if fields.get("default_adapter") == "none":
        fields["default_adapter"] = None
    _check_adapter(ctx, fields.get("default_adapter"))
    if allowed:
        fields["allowed_models"] = None if allowed == "all" else [m.strip() for m in allowed.split(",") if m.strip()]
    if guardrails:
        fields["guardrails"] = json.loads(guardrails)
    with _db(ctx) as (store, _):
        store.update_tenant(name, msgspec.convert(fields, TenantUpdate))
    click.echo(f"updated tenant {name}")


@tenants.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def tenants_list(ctx: click.Context, as_json: bool) -> None:
    """List tenants with their limits."""
    with _db(ctx) as (store, _):
        rows = store.tenants()
    if as_json:
        click.echo(msgspec.json.encode(rows).decode())
        return
    click.echo(f"{'TENANT':<24} {'MODELS':<24} {'RPM':>6} {'TPM':>8} {'DAILY':>10} {'MONTHLY':>12}")
    for t in rows:
        models = ",".join(t.allowed_models) if t.allowed_models is not None else "all"
        click.echo(
            f"{t.name:<24} {models:<24} {t.rpm if t.rpm is not None else '-':>6} {t.tpm if t.tpm is not None else '-':>8}"
            f" {t.daily_tokens if t.daily_tokens is not None else '-':>10}"
            f" {t.monthly_tokens if t.monthly_tokens is not None else '-':>12}"
        )


@click.group()
def keys() -> None:
    """API keys: shown once at creation, stored only as a hash."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant the key acts for.")
@click.option("--role", type=click.Choice(["user", "admin"]), default="user", show_default=True)
@click.option("--name", help="A label to recognise the key by.")
@click.option("--expires", help="When it stops working: 30d, 12h, an ISO date/time or Unix seconds.")
@click.option("--rpm", type=click.IntRange(min=0), help="Requests per minute for this key.")
@click.option("--tpm", type=click.IntRange(min=0), help="Tokens per minute for this key.")
@click.pass_context
def keys_create(ctx: click.Context, tenant: str, role: str, name: str | None, expires: str | None,
                rpm: int | None, tpm: int | None) -> None:
    """Create a key and print it (the only time it is shown)."""
    with _db(ctx) as (store, _):
        key, secret = store.create_key(tenant, role=role, name=name, expires_at=_expiry(expires), rpm=rpm, tpm=tpm)  # type: ignore[arg-type]
    click.echo(f"created {key.role} key {key.id} for tenant {key.tenant} (expires {_when(key.expires_at)})", err=True)
    click.echo("store it now: it is not shown again", err=True)
    click.echo(secret)


@keys.command("list")
@click.option("--tenant", help="Only this tenant's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_list(ctx: click.Context, tenant: str | None, as_json: bool) -> None:
    """List keys (ids, never secrets)."""
    with _db(ctx) as (store, _):
        rows = store.keys(tenant)
    if as_json:
        click.echo(json.dumps([{**msgspec.to_builtins(k), "active": k.active} for k in rows]))
        return
    click.echo(f"{'KEY':<12} {'TENANT':<20} {'ROLE':<6} {'STATE':<8} {'CREATED':<17} {'EXPIRES':<17} NAME")
    for k in rows:
        state = "revoked" if k.revoked_at else ("active" if k.active else "expired")
        click.echo(
            f"{k.id:<12} {k.tenant:<20} {k.role:<6} {state:<8} {_when(k.created_at):<17} {_when(k.expires_at):<17} {k.name or ''}"
        )


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke a key: it stops working on its next request."""
    with _db(ctx) as (store, _):
        store.revoke_key(key_id)
    click.echo(f"revoked {key_id}")


@click.group()
def usage() -> None:
    """Usage records: hash-chained, one per request."""


@usage.command("verify")
@click.option("--expect-head", help="A head hash printed earlier: it must still be in the chain (detects records removed from the end).")
@click.pass_context
def usage_verify(ctx: click.Context, expect_head: str | None) -> None:
    """Check the hash chain; exit 1 when a record was edited, deleted or reordered."""
    if expect_head is not None:
        expect_head = expect_head.strip().lower()
    with _db(ctx) as (_, meter):
        result = meter.verify(expect_head)
    if result.ok:
        since = f" ({result.since_expected} written after the expected head)" if result.since_expected else ""
        click.echo(f"ok: {result.records} records, head {result.head}{since}")
        return
    if result.first_bad_seq is not None:
        click.echo(f"TAMPERED at record {result.first_bad_seq}: {result.problem} "
                   f"({result.records} records verified before it)", err=True)
    else:
        click.echo(f"NOT VERIFIED: {result.problem} (all {result.records} records verify on their own)", err=True)
    sys.exit(1)


@usage.command("report")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--group-by", type=click.Choice(["model", "key", "day", "tenant", "route"]), default="model", show_default=True)
@click.option("--tenant", help="Only this tenant.")
@click.option("--from", "since", help="Start (ISO date/time or Unix seconds), inclusive.")
@click.option("--to", "until", help="End (ISO date/time or Unix seconds), exclusive.")
@click.pass_context
def usage_report(ctx: click.Context, fmt: str, group_by: str, tenant: str | None, since: str | None, until: str | None) -> None:
    """Totals with cost from the price table ([gateway.prices] in settings)."""
    with _db(ctx) as (_, meter):
        rows = meter.report(
            group_by=group_by, tenant=tenant, since=parse_time(since, "from"), until=parse_time(until, "to")  # type: ignore[arg-type]
        )
    columns = [group_by, "requests", "prompt_tokens", "completion_tokens", "embedding_tokens", "retrieved_chunks", "errors", "cost"]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        click.echo(_table(columns, rows))


def _table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """The group column left-aligned and as wide as its longest value ('-' for none, e.g. a request
    that named no model); the counts right-aligned."""
    cells = [[c.upper() for c in columns]]
    for r in rows:
        cells.append([
            "-" if r[c] is None else f"{r[c]:.6f}" if c == "cost" else str(r[c]) for c in columns
        ])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip()
        for row in cells
    )


def register(main: click.Group) -> None:
    for group in (tenants, keys, usage):
        main.add_command(group)
