"""Command line: `appliance serve | version` and the command groups, assembled from their modules
(cli_models, cli_documents, cli_eval, cli_peer, cli_gateway, cli_release, cli_doctor; what they share
is in cli_common). Loads settings once and calls down."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from appliance import __version__, cli_doctor, cli_documents, cli_eval, cli_gateway, cli_models, cli_peer, cli_release
from appliance.cli_common import accept_location_everywhere, build_registry, cli_settings, data_settings, fail
from appliance.errors import ApplianceError
from appliance.settings import Settings

log = logging.getLogger("appliance")


def _setup_server_logging(settings: Settings) -> None:
    from appliance.observability.logs import server_addresses, setup_logging

    setup_logging(
        settings.server.log_level, json_lines=settings.gateway.json_logs, redact=_log_redactor(),
        keep=server_addresses(settings),  # the log says where the server listens and whom it talks to
    )


def _log_redactor() -> Any:
    """Masks PII and secrets in every log line (messages and tracebacks) with the guardrails' detector."""
    from appliance.policy.guardrails.masking import redact_text

    return redact_text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appliance")
def main() -> None:
    """A self-contained local LLM server that speaks the OpenAI API.

    Settings come from the embedded defaults, then the TOML file given by --config or
    APPLIANCE_CONFIG, then APPLIANCE_* environment variables, then command-line flags.
    --data-dir and --config are accepted before or after any command.
    """


@main.command()
@click.option("--host", help="Address to bind (default 127.0.0.1; or APPLIANCE_HOST).")
@click.option("--port", type=int, help="Port to listen on (default 8080; or APPLIANCE_PORT).")
@click.option("--load", type=click.Choice(["startup", "lazy"]), help="Load models at start-up or on first use.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log verbosity.")
@click.pass_context
def serve(ctx: click.Context, **flags: Any) -> None:
    """Run the HTTP server on the registered models (see `appliance models list`)."""
    settings = cli_settings(ctx, **flags)
    _setup_server_logging(settings)
    settings = data_settings(ctx, **flags)

    import uvicorn

    from appliance.policy.db import open_gateway_db
    from appliance.policy.gateway import loopback_host
    from appliance.policy.tenancy import TenantStore

    if not loopback_host(settings.server.host):
        conn = open_gateway_db(settings.data_dir)
        try:
            has_keys = TenantStore(conn).any_keys()
        finally:
            conn.close()
        if not has_keys:
            raise click.UsageError(
                f"refusing to listen on {settings.server.host}: no API keys exist, so anyone who can reach this"
                " address could use the server. Create one first (`appliance tenants create TEAM` and"
                " `appliance keys create --tenant TEAM`) or bind to 127.0.0.1."
            )

    from appliance.api.app import create_app
    from appliance.lifecycle.serverlock import ServerLock

    host = settings.server.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{settings.server.port}"
    try:
        lock = ServerLock.acquire(settings.data_dir, url, __version__)
    except ApplianceError as exc:
        fail(exc)
    registry, manifests = build_registry(settings)
    if not manifests:
        log.warning(
            "no models registered in %s: run `appliance models install-defaults` or `appliance models import`",
            settings.models_dir,
        )
    try:
        app = create_app(settings, registry)
    except ApplianceError as exc:
        raise click.UsageError(exc.message) from None
    log.info(
        "appliance %s serving %s on http://%s:%d (data in %s)",
        __version__,
        ", ".join(m.id for m in manifests) or "no models",
        settings.server.host,
        settings.server.port,
        settings.data_dir,
    )
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        access_log=False,  # the gateway logs every request with its id and tenant
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    lock.release()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Also the data format this release reads and writes.")
def version(as_json: bool) -> None:
    """Print the appliance version."""
    if as_json:
        from appliance.lifecycle.datadir import DATA_FORMAT

        click.echo(json.dumps({"version": __version__, "data_format": DATA_FORMAT}))
        return
    click.echo(__version__)


def _assemble(group: click.Group) -> None:
    """Every command group under `group`, each command with --data-dir and --config."""
    for module in (cli_models, cli_documents, cli_eval, cli_peer, cli_gateway, cli_release, cli_doctor):
        module.register(group)
    accept_location_everywhere(group)


_assemble(main)
