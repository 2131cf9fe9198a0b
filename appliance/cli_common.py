"""What the command modules of the CLI share: settings from --data-dir and --config, the checked data
directory, the model registry, the tenant option, errors and exit codes.

The command modules (cli_models, cli_documents, cli_eval, cli_peer, cli_gateway, cli_release,
cli_doctor) import this module; appliance.cli, the entry point, imports them and assembles the
groups. Nothing imports appliance.cli.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from appliance.errors import ApplianceError
from appliance.settings import Settings, load_settings
from appliance.types import DEFAULT_TENANT

EXIT_CONFIG = 78
"""sysexits' EX_CONFIG: the unit's RestartPreventExitStatus, for refusals a restart cannot fix."""


def inherited(ctx: click.Context, name: str) -> Any:
    """The innermost value of an option that several command levels accept (--tenant)."""
    node: click.Context | None = ctx
    while node is not None:
        if node.params.get(name):
            return node.params[name]
        node = node.parent
    return None


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    # ctx.meta is shared by the whole command chain, and a subcommand's options are parsed after its
    # group's: the innermost --data-dir or --config given wins.
    if value is not None:
        ctx.meta[f"appliance.{param.name}"] = value
    return value


def _location_options() -> list[click.Option]:
    return [
        click.Option(["--data-dir"], type=click.Path(file_okay=False), expose_value=False, callback=_remember,
                     help="Data directory (or APPLIANCE_DATA_DIR)."),
        click.Option(["--config"], type=click.Path(dir_okay=False), expose_value=False, callback=_remember,
                     help="TOML settings file (or APPLIANCE_CONFIG)."),
    ]


_NO_SETTINGS = frozenset({"version", "peer", "restore"})
"""Commands that read neither settings nor the data directory (restore names its target with its own --data-dir)."""


def accept_location_everywhere(command: click.Command) -> None:
    """Give every command and group --data-dir and --config, so both work in any position:
    `appliance --data-dir D models list`, `appliance models --data-dir D list`, `appliance models list --data-dir D`."""
    have = {p.name for p in command.params}
    command.params.extend(o for o in _location_options() if o.name not in have)
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            if name not in _NO_SETTINGS:
                accept_location_everywhere(sub)


def cli_settings(ctx: click.Context, **overrides: Any) -> Settings:
    """The settings: defaults, then --config (or APPLIANCE_CONFIG), APPLIANCE_* and the flags given."""
    flags = {
        (None, "data_dir"): ctx.meta.get("appliance.data_dir"),
        ("server", "host"): overrides.get("host"),
        ("server", "port"): overrides.get("port"),
        ("server", "log_level"): overrides.get("log_level"),
        ("models", "load"): overrides.get("load"),
    }
    config = ctx.meta.get("appliance.config")
    try:
        return load_settings(config=Path(config) if config else None, overrides=flags)
    except ApplianceError as exc:
        raise click.UsageError(exc.message) from None


def data_settings(ctx: click.Context, **overrides: Any) -> Settings:
    """Settings for a command that reads or writes the data directory: checked and migrated first.

    Refuses a directory owned by another user (files made here would lock the service out) or written
    by a newer release (see appliance.lifecycle.datadir).
    """
    from appliance.lifecycle.datadir import open_data_dir

    settings = cli_settings(ctx, **overrides)
    try:
        open_data_dir(settings.data_dir)
    except ApplianceError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(EXIT_CONFIG)
    except OSError as exc:
        click.echo(f"error: cannot use data directory {settings.data_dir}: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    return settings


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def build_registry(
    settings: Settings, *, keep: Any = None, load_timeout_s: float | None = None
) -> tuple[Any, list[Any]]:
    """The model registry over DATA_DIR/models (only the manifests `keep` accepts), and its manifests:
    the one way `serve` and every command reach models."""
    from appliance.engines.factory import NativeEngineFactory
    from appliance.engines.registry import ModelRegistry
    from appliance.modelstore.store import ModelStore

    store = ModelStore(settings.models_dir)
    manifests = [m for m in store.manifests() if keep is None or keep(m)]
    registry = ModelRegistry(
        manifests,
        NativeEngineFactory(store, settings.models),
        load_timeout_s=settings.models.load_timeout_s if load_timeout_s is None else load_timeout_s,
        n_ctx=settings.models.n_ctx,
        models_dir=settings.models_dir,
    )
    return registry, manifests


def tenant_of(ctx: click.Context) -> str:
    """The --tenant given at any level (default: the default tenant), checked."""
    from appliance.policy.tenancy import check_tenant_name

    name = inherited(ctx, "tenant") or DEFAULT_TENANT
    try:
        return check_tenant_name(name)
    except ApplianceError as exc:
        raise click.BadParameter(exc.message, param_hint="--tenant") from None


def fail(exc: ApplianceError) -> NoReturn:
    click.echo(f"error: {exc.message}", err=True)
    sys.exit(1)


def progress_bar(total: int, label: str) -> Any:
    return click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True)
