"""Command line for documents: `appliance collections create | list | delete`, `ingest` and `search`,
on the data directory (or, for ingest, through a running server's API)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from appliance.cli_common import build_registry, data_settings, fail, progress_bar, setup_logging, tenant_of
from appliance.errors import ApplianceError
from appliance.types import DEFAULT_TENANT


def _document_service(ctx: click.Context) -> tuple[Any, Any]:
    """A DocumentService over the data directory with the embedding model (and rerank model) registered."""
    from appliance.services.documents import DocumentService
    from appliance.services.rerank import RerankService

    settings = data_settings(ctx)
    setup_logging("warning")
    registry, _ = build_registry(settings, keep=lambda m: m.kind in ("embedding", "rerank"), load_timeout_s=600)
    return DocumentService(
        settings.data_dir / "collections", registry, embedding_model=settings.retrieval.embedding_model,
        reranker=RerankService(registry, default_model=settings.retrieval.rerank_model),
    ), registry


def run_documents(ctx: click.Context, work: Any, *, writes: bool = False) -> Any:
    """Run `work(service)` on a DocumentService over the data directory; `writes`: refused while a
    server runs on it (the server's in-memory indexes would never see the change)."""
    import asyncio
    import contextlib

    from appliance.lifecycle.serverlock import writing_collections

    try:
        with writing_collections(data_settings(ctx).data_dir) if writes else contextlib.nullcontext():
            service, registry = _document_service(ctx)
            try:
                return asyncio.run(work(service))
            finally:
                service.close()
                registry.close()
    except ApplianceError as exc:
        fail(exc)
    except OSError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except ValueError as exc:  # tantivy LockBusy and friends
        click.echo(f"error: {exc} (is a running server using this collection? use the HTTP API)", err=True)
        sys.exit(1)


@click.group()
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True, help="Tenant whose collections these are.")
def collections(tenant: str) -> None:
    """Create, list and delete document collections (on disk; use the API while the server runs)."""


@collections.command("create")
@click.argument("name")
@click.pass_context
def collections_create(ctx: click.Context, name: str) -> None:
    """Create an empty collection."""
    run_documents(ctx, lambda s: s.create(tenant_of(ctx), name), writes=True)
    click.echo(f"created {name}")


@collections.command("list")
@click.pass_context
def collections_list(ctx: click.Context) -> None:
    """List collections."""
    service, registry = _document_service(ctx)
    for c in service.list(tenant_of(ctx)):
        click.echo(c["name"])
    registry.close()


@collections.command("delete")
@click.argument("name")
@click.pass_context
def collections_delete(ctx: click.Context, name: str) -> None:
    """Delete a collection and its indexes."""
    run_documents(ctx, lambda s: s.delete(tenant_of(ctx), name), writes=True)
    click.echo(f"deleted {name}")


@click.command()
@click.argument("collection")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--create", is_flag=True, help="Create the collection if it does not exist.")
@click.option("--batch", default=16, show_default=True, help="Files per index commit.")
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True, help="Tenant whose collections these are.")
@click.option("--url", help="Send the files to the server running at URL (its HTTP API) instead of the data directory.")
@click.option("--api-key", envvar="APPLIANCE_API_KEY", help="With --url: the key to send (or APPLIANCE_API_KEY).")
@click.pass_context
def ingest(
    ctx: click.Context, collection: str, paths: tuple[Path, ...], create: bool, batch: int, tenant: str,
    url: str | None, api_key: str | None,
) -> None:
    """Ingest files (.txt .md .html .pdf .docx) or folders of them into COLLECTION.

    Writes the data directory directly, which is refused while a server runs on it: then give the
    server's --url (the key's tenant owns the collection)."""
    from appliance.retrieval.parsing import SUPPORTED

    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED)
        else:
            files.append(p)
    if url is not None:
        from appliance.cli_remote import ingest_remote

        if not files:
            raise click.UsageError("no supported files (.txt .md .html .pdf .docx) in the paths given")
        try:
            with progress_bar(len(files), f"sending to {collection} at {url}") as bar:
                results = ingest_remote(url, api_key, collection, files, create=create, batch=batch,
                                        progress=bar.update)
        except ApplianceError as exc:
            fail(exc)
        _print_ingested(results)
        return

    async def work(service: Any) -> list[Any]:
        from appliance.errors import CollectionNotFound

        try:
            await service.documents(tenant, collection)
        except CollectionNotFound:
            if not create:
                raise
            await service.create(tenant, collection)
        results = []
        with progress_bar(len(files), f"ingesting into {collection}") as bar:
            for i in range(0, len(files), batch):
                group = files[i : i + batch]
                results += await service.ingest_files(tenant, collection, [(f.name, f.read_bytes()) for f in group])
                bar.update(len(group))
        return results

    _print_ingested(run_documents(ctx, work, writes=True))


def _print_ingested(results: list[Any]) -> None:
    for r in results:
        line = f"{r.status:<9} {r.source}" + (f" ({r.chunks} chunks)" if r.chunks else "")
        click.echo(line + (f": {r.error}" if r.error else ""))
    if any(r.status == "failed" for r in results):
        sys.exit(2)


@click.command()
@click.argument("collection")
@click.argument("query")
@click.option("--mode", type=click.Choice(["hybrid", "bm25", "vector"]), default="hybrid", show_default=True)
@click.option("--top-k", default=5, show_default=True)
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True, help="Tenant whose collections these are.")
@click.pass_context
def search(
    ctx: click.Context, collection: str, query: str, mode: str, top_k: int, tenant: str
) -> None:
    """Search COLLECTION and print the best chunks."""
    hits = run_documents(ctx, lambda s: s.search(tenant, collection, query, top_k=top_k, mode=mode, flt=None))
    for i, h in enumerate(hits, 1):
        where = h.source + (f" p.{h.page}" if h.page else "")
        click.echo(f"[{i}] {h.score:.3f} {where}: {h.snippet or h.text[:200]}")


def register(main: click.Group) -> None:
    for command in (collections, ingest, search):
        main.add_command(command)
