"""Command line for the release lifecycle: `appliance backup | restore | data status | data migrate`."""

from __future__ import annotations

import json
import pwd
import sys
import time
from pathlib import Path

import click
import msgspec

from appliance import __version__
from appliance.cli_common import cli_settings, data_settings
from appliance.errors import ApplianceError



def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@click.command("backup")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-models", is_flag=True, help="Leave model files out (manifests are kept): a much smaller archive.")
@click.pass_context
def backup_command(ctx: click.Context, file: Path, no_models: bool) -> None:
    """Write a consistent snapshot of the data directory to FILE (.tar, or .tar.gz), safe while serving."""
    from appliance.lifecycle.backup import backup

    settings = cli_settings(ctx)
    started = time.monotonic()
    try:
        manifest = backup(settings.data_dir, file, include_models=not no_models)
    except ApplianceError as exc:
        _fail(exc.message)
    size = sum(f.size for f in manifest.files)
    click.echo(
        f"backed up {settings.data_dir} to {file}: {len(manifest.files)} files, {_mb(size)}, "
        f"{len(manifest.collections)} collections, {manifest.usage_records} usage records "
        f"(head {manifest.usage_head or '-'}), in {time.monotonic() - started:.1f} s"
    )


@click.command("restore")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False), required=True,
              help="Where to restore: a new or empty directory.")
@click.option("--owner", help="User to own the restored files (when run as root for the service: appliance).")
@click.option("--json", "as_json", is_flag=True, help="Print the verification report as JSON.")
def restore_command(file: Path, data_dir: str, owner: str | None, as_json: bool) -> None:
    """Restore a backup into an empty data directory and verify it (checksums, SQLite, usage chain, indexes)."""
    from appliance.lifecycle.backup import restore

    ids = None
    if owner:
        try:
            entry = pwd.getpwnam(owner)
        except KeyError:
            _fail(f"no user named {owner!r}")
        ids = (entry.pw_uid, entry.pw_gid)
    try:
        report = restore(file, Path(data_dir).expanduser(), owner=ids)
    except ApplianceError as exc:
        _fail(exc.message)
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(report), indent=2))
        return
    click.echo(f"restored {file} into {report.data_dir}: {report.files} files, {_mb(report.bytes)}, verified")
    click.echo(f"  usage chain: {report.usage_records} records, head {report.usage_head or '-'}")
    for c in report.collections:
        click.echo(f"  collection {c.tenant}/{c.name}: {c.documents} documents, {c.chunks} chunks")
    click.echo(f"  models: {', '.join(report.models) or 'none'}")


@click.group("data")
def data_group() -> None:
    """The data directory's format: inspect it, migrate it to this release."""


@data_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def data_status(ctx: click.Context, as_json: bool) -> None:
    """Show the data format, the release that wrote it, and whether this release can open it.

    Exit status: 0 readable by this release (perhaps after a migration), 3 written by a newer release.
    """
    from appliance.lifecycle.datadir import DATA_FORMAT, read_format, schema_versions

    settings = cli_settings(ctx)
    record = read_format(settings.data_dir) if settings.data_dir.is_dir() else None
    info = {
        "data_dir": str(settings.data_dir),
        "release": __version__,
        "release_data_format": DATA_FORMAT,
        "data_format": record.format if record else None,
        "written_by": record.written_by if record else None,
        "history": record.history if record else [],
        "schemas": schema_versions(settings.data_dir) if record else {},
    }
    newer = record is not None and record.format > DATA_FORMAT
    info["readable"] = not newer
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        if record is None:
            click.echo(f"{settings.data_dir}: no appliance data yet (this release writes data format {DATA_FORMAT})")
        else:
            verdict = (
                f"NOT readable: needs appliance {record.written_by} or newer" if newer
                else "current" if record.format == DATA_FORMAT else f"will be migrated to format {DATA_FORMAT} at start"
            )
            click.echo(f"{settings.data_dir}: data format {record.format}, written by {record.written_by}: {verdict}")
            for line in record.history:
                click.echo(f"  {line}")
    sys.exit(3 if newer else 0)


@data_group.command("migrate")
@click.pass_context
def data_migrate(ctx: click.Context) -> None:
    """Migrate the data directory to this release's format now (the server also does it at start)."""
    from appliance.lifecycle.datadir import read_format

    settings = cli_settings(ctx)
    before = read_format(settings.data_dir) if settings.data_dir.is_dir() else None
    settings = data_settings(ctx)
    after = read_format(settings.data_dir)
    if after is None:
        _fail(f"{settings.data_dir} has no data format record")
    was = before.format if before else "new"
    click.echo(f"{settings.data_dir}: data format {was} -> {after.format if after else '?'}")


def register(main: click.Group) -> None:
    main.add_command(backup_command)
    main.add_command(restore_command)
    main.add_command(data_group)
