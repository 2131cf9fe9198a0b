"""Command line for the quality measurements: `appliance eval guardrails | retrieval | answers | compare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from appliance.cli_common import build_registry, data_settings, fail, progress_bar, setup_logging
from appliance.cli_documents import run_documents
from appliance.errors import ApplianceError


@click.group("eval")
def eval_group() -> None:
    """Measure retrieval, answer and guardrail quality."""


def _injection_classifiers(ctx: click.Context, name: str | None, rules_only: bool) -> tuple[Any, Any, Any]:
    """(user-turn classifier, retrieved-content classifier, registry), loaded: `name` for both scopes,
    else the configured ones (gateway.injection_classifier, gateway.retrieved_injection_classifier;
    a bundled default not installed leaves the rules). All None with `rules_only`."""
    import asyncio

    import msgspec

    from appliance.services.injection_classifier import injection_classifier

    settings = data_settings(ctx)
    setup_logging("warning")
    if rules_only:
        return None, None, None
    gateway = settings.gateway
    if name is not None:
        gateway = msgspec.structs.replace(gateway, injection_classifier=name, retrieved_injection_classifier=name)
    names = {n for n in (gateway.injection_classifier, gateway.retrieved_injection_classifier) if n}
    registry, _ = build_registry(settings, keep=lambda m: any(n in m.names() for n in names), load_timeout_s=600)
    try:
        direct = injection_classifier(gateway, registry)
        indirect = injection_classifier(gateway, registry, retrieved=True)
        for classifier in {c.manifest.id: c for c in (direct, indirect) if c is not None}.values():
            asyncio.run(registry.engine(classifier.manifest))
    except ApplianceError as exc:
        registry.close()
        if name is not None:
            raise click.BadParameter(exc.message, param_hint="--classifier") from None
        fail(exc)
    return direct, indirect, registry


def _by(classifier: Any) -> str:
    return f"rules + classifier {classifier.manifest.id}" if classifier is not None else "rules"


@eval_group.command("guardrails")
@click.option("--bipia", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="BIPIA directory with email/table_train.jsonl and text/code_attack_train.json.")
@click.option("--data", "data_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Your labelled JSONL (repeatable): {"text", "label": 1|0|"injection"|"benign", "scope"?: '
                   '"direct"|"indirect"} and/or {"text", "spans": [{"start", "end", "kind"}]}.')
@click.option("--pii-texts", type=int, default=500, show_default=True,
              help="Synthetic PII texts to generate (with --bipia; 0: none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for attack placement and PII texts.")
@click.option("--classifier", "classifier_id",
              help="Score injection with this registered ONNX classifier in both scopes (label: "
                   "gateway.injection_label) instead of the configured ones.")
@click.option("--rules-only", is_flag=True, help="Measure the rules alone, without any classifier.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Injection score at or above which a text counts as an injection (the policy's injection_threshold).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def eval_guardrails(
    ctx: click.Context, bipia: Path | None, data_files: tuple[Path, ...], pii_texts: int, seed: int,
    classifier_id: str | None, rules_only: bool, threshold: float, as_json: bool,
) -> None:
    """Injection and PII detection: on BIPIA and synthetic PII text (--bipia), or on your own labelled
    JSONL (--data): precision, recall and F1 per scope and per PII kind, for the decision the gateway
    makes (the rules with the configured classifiers unless --classifier or --rules-only)."""
    from appliance.policy.guardrails.evaluate import EvalFileError, evaluate_file, evaluate_injection, evaluate_pii

    if bipia is None and not data_files:
        raise click.UsageError("give --bipia DIR and/or --data FILE.jsonl")
    direct, indirect, registry = _injection_classifiers(ctx, classifier_id, rules_only)
    report: dict[str, Any] = {}
    try:
        if bipia is not None:
            report["injection"] = evaluate_injection(bipia, seed=seed, classifier=indirect, threshold=threshold)
            report["injection"]["classifier"] = indirect.manifest.id if indirect is not None else None
            if pii_texts:
                report["pii"] = evaluate_pii(seed, pii_texts)
        if data_files:
            report["files"] = [evaluate_file(f, threshold=threshold, classifier=direct, retrieved_classifier=indirect)
                               for f in data_files]
    except EvalFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None
    finally:
        if registry is not None:
            registry.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if "injection" in report:
        injection = report["injection"]
        click.echo(f"injection (BIPIA, {_by(indirect)}, threshold {injection['threshold']}): {injection['benign']} "
                   f"benign, {injection['attacked']} attacked texts")
        click.echo(f"  precision {injection['precision']:.3f}  recall {injection['recall']:.3f}  "
                   f"f1 {injection['f1']:.3f}  false-positive rate {injection['false_positive_rate']:.3f}")
        for title, key in (("position", "recall_by_position"), ("category", "recall_by_category")):
            click.echo(f"  recall by {title}:")
            for name, value in injection[key].items():
                click.echo(f"    {name:<48} {value:.3f}")
    if "pii" in report:
        pii = report["pii"]
        click.echo(f"pii (synthetic, {pii['texts']} texts, {pii['hard_negatives']} hard negatives)")
        _pii_table(pii)
    for file_report in report.get("files", []):
        click.echo(f"{file_report['file']}:")
        for scope, m in file_report.get("injection", {}).items():
            by = _by(direct if scope == "direct" else indirect)
            click.echo(f"  injection, {scope} ({by}, threshold {m['threshold']}): precision {m['precision']:.3f}  "
                       f"recall {m['recall']:.3f}  f1 {m['f1']:.3f}  false-positive rate {m['false_positive_rate']:.3f}"
                       f"  (tp {m['tp']}, fp {m['fp']}, fn {m['fn']}, tn {m['tn']})")
        if "pii" in file_report:
            click.echo(f"  pii ({file_report['pii']['texts']} texts)")
            _pii_table(file_report["pii"])


def _pii_table(pii: dict[str, Any]) -> None:
    click.echo(f"  {'kind':<16} {'precision':>9} {'recall':>7} {'f1':>7} {'tp':>5} {'fp':>4} {'fn':>4}")
    for kind, m in {**pii["per_kind"], "overall": pii["overall"]}.items():
        click.echo(f"  {kind:<16} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>7.3f} {m['tp']:>5} {m['fp']:>4} "
                   f"{m['fn']:>4}")


@eval_group.command("retrieval")
@click.option("--dataset", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="SQuAD JSON (one document per paragraph) or appliance-longqa/1 JSON (long documents, span answers).")
@click.option("--limit", type=int, help="Evaluate only the first N questions.")
@click.option("--rerank", is_flag=True, help="Add a hybrid+rerank row: retrieval.rerank_model reorders hybrid's best 20.")
@click.option("--context-headers", is_flag=True, help="Embed each chunk behind its title and heading (retrieval.context_headers).")
@click.option("--fusion", type=click.Choice(["fixed", "adaptive"]), default="fixed", show_default=True,
              help="Hybrid weighting (retrieval.fusion).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def eval_retrieval(ctx: click.Context, dataset: Path, limit: int | None, rerank: bool, context_headers: bool,
                   fusion: str, as_json: bool) -> None:
    """Recall@1/5/10 and MRR@10 of bm25, vector and hybrid search. SQuAD: the rank of the gold paragraph;
    long documents: the rank of the first chunk of the gold document that contains the answer text."""
    from appliance.retrieval.evaluate import evaluate, load_dataset

    async def work(service: Any) -> dict[str, dict[str, float]]:
        manifest, engine = await service.embedder()
        scorer = await service.reranker_engine() if rerank else None
        n = len(load_dataset(dataset, limit).questions)
        with progress_bar(n, "questions") as bar:
            return await asyncio.to_thread(
                evaluate, dataset, service.embed_fn(engine), service.chunker_for(engine),
                embedding_model=manifest.id, ndim=manifest.embedding_dim or 384, limit=limit, progress=bar.update,
                rerank=scorer.score if scorer is not None else None, context_headers=context_headers, fusion=fusion,
            )

    import asyncio

    scores = run_documents(ctx, work)
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

    settings = data_settings(ctx)
    setup_logging("warning")
    registry, _ = build_registry(settings, load_timeout_s=600)
    docs, _ = load_squad(dataset)
    questions = load_squad_answers(dataset, limit)

    async def work(tmp: str) -> dict[str, float]:
        documents = DocumentService(Path(tmp), registry, embedding_model=settings.retrieval.embedding_model)
        ask = AskService(documents, GenerationService(registry), registry, default_model=model)
        await documents.create("eval", "squad")
        await documents.ingest("eval", "squad", docs)
        found = cited = grounded = 0
        with progress_bar(len(questions), "questions") as bar:
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
        fail(exc)
    finally:
        registry.close()
    for key, value in scores.items():
        click.echo(f"{key:<22} {value:.3f}")


@eval_group.command("compare")
@click.option("--route", help="Only this routed model id.")
@click.option("--since", help="Start (ISO date/time or Unix seconds), inclusive.")
@click.option("--until", help="End (ISO date/time or Unix seconds), exclusive.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def eval_compare(ctx: click.Context, route: str | None, since: str | None, until: str | None, as_json: bool) -> None:
    """Variants of routed model ids side by side, from the usage records, feedback and shadow answers:
    requests, latency and time-to-first-token percentiles, tokens, cost ([gateway.prices]), feedback
    (the latest verdict per request, -1..1), the grounded rate of grounded answers, and per shadow model
    how often its answer was the served one's."""
    from appliance.policy.db import open_gateway_db
    from appliance.policy.experiments import compare, compare_rows
    from appliance.policy.metering import parse_time

    settings = data_settings(ctx)
    try:
        window = parse_time(since, "since"), parse_time(until, "until")
    except ApplianceError as exc:
        raise click.BadParameter(exc.message) from None
    conn = open_gateway_db(settings.data_dir)
    try:
        rows = compare_rows(compare(conn, settings.gateway.prices, route=route, since=window[0], until=window[1]))
    finally:
        conn.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no routed requests" + (f" for route {route}" if route else "") + " in this window")
        return
    click.echo(_compare_table(rows))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _compare_table(rows: list[dict[str, Any]]) -> str:
    header = ["ROUTE", "VARIANT", "REQS", "ERR", "CACHED", "P50_MS", "P95_MS", "TTFT50", "TTFT95", "PROMPT", "COMPL", "COST",
              "FEEDBACK", "MEAN", "GROUNDED", "SAME_AS_SERVED"]
    cells = [header]
    for r in rows:
        reqs = f"{r['requests']}" + (f"+{r['skipped']} skipped" if r["skipped"] else "")
        grounded = "-" if r["grounded_rate"] is None else f"{r['grounded_rate']:.2f} of {r['grounded_answers']}"
        cells.append([
            r["route"], r["variant"], reqs, str(r["errors"]), str(r["cached"]), _ms(r["latency_p50_ms"]), _ms(r["latency_p95_ms"]),
            _ms(r["ttft_p50_ms"]), _ms(r["ttft_p95_ms"]), str(r["prompt_tokens"]), str(r["completion_tokens"]),
            f"{r['cost']:.6f}", str(r["feedback"]), "-" if r["feedback_mean"] is None else f"{r['feedback_mean']:+.2f}",
            grounded, "-" if r["same_output"] is None else f"{r['same_output']:.2f}",
        ])
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip()
        for row in cells
    )


def register(main: click.Group) -> None:
    main.add_command(eval_group)
