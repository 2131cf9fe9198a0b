"""How the grounded answer's relevance gate (the best chunk's cosine, `MIN_SIMILARITY`) trades answers to
questions a collection can answer against answers to questions it cannot.

    .venv/bin/python scripts/answer_gate_study.py SQUAD.json [--limit 400] [--off-topic OTHER_SQUAD.json]

SQUAD.json's paragraphs become a collection (one document each) on the bundled MiniLM; its questions are
answered extractively with the gate off, and each one's best cosine is recorded with whether the answer
holds a gold text, so the shares can be read for any threshold. With --off-topic, that file's questions
are asked of the same collection: every answer they get is one the gate should have refused.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import appliance.services.ask as ask_module  # noqa: E402
from appliance.cli_common import build_registry  # noqa: E402
from appliance.retrieval.evaluate import answer_hits, load_squad, load_squad_answers  # noqa: E402
from appliance.services.ask import AskService  # noqa: E402
from appliance.services.documents import DocumentService  # noqa: E402
from appliance.services.generation import GenerationService  # noqa: E402
from appliance.settings import load_settings  # noqa: E402

THRESHOLDS = (0.4, 0.35, 0.3, 0.25, 0.2, 0.15)


async def study(settings, registry, corpus: Path, limit: int, off_topic: Path | None, tmp: str):
    documents = DocumentService(Path(tmp), registry, embedding_model=settings.retrieval.embedding_model)
    ask = AskService(documents, GenerationService(registry), registry, default_model=None)
    docs, _ = load_squad(corpus)
    await documents.create("study", "gate")
    await documents.ingest("study", "gate", docs)

    async def best_cosine(question: str) -> float:
        hits = await documents.search("study", "gate", question, top_k=1, mode="vector", flt=None)
        return hits[0].score if hits else 0.0

    on_topic = []
    for question, _, gold in load_squad_answers(corpus, limit):
        answer = await ask.ask("study", "gate", question, top_k=3, model=None, max_tokens=48, answer_mode="extractive")
        on_topic.append((await best_cosine(question), bool(answer_hits(answer.answer, gold))))
    off = [await best_cosine(q) for q, _, _ in load_squad_answers(off_topic, limit)] if off_topic else []
    documents.close()
    return on_topic, off


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--off-topic", type=Path)
    parser.add_argument("--data-dir", type=Path, help="where the models are (default: the appliance's)")
    args = parser.parse_args()
    ask_module.MIN_SIMILARITY = -2.0  # every question answered; the thresholds are applied below
    settings = load_settings(overrides={(None, "data_dir"): args.data_dir})
    registry, _ = build_registry(settings, load_timeout_s=600)
    try:
        with tempfile.TemporaryDirectory(prefix="appliance-gate-") as tmp:
            on_topic, off = asyncio.run(study(settings, registry, args.dataset, args.limit, args.off_topic, tmp))
    finally:
        registry.close()
    n = max(1, len(on_topic))
    print(f"{len(on_topic)} questions of {args.dataset.name}" + (f"; {len(off)} off-topic from {args.off_topic.name}" if off else ""))
    for t in THRESHOLDS:
        kept = [found for cos, found in on_topic if cos >= t]
        line = f"gate {t:.2f}: answered {len(kept) / n:.3f}, gold text contained {sum(kept) / n:.3f}"
        if off:
            line += f"; off-topic answered {sum(c >= t for c in off) / len(off):.3f}"
        print(line)


if __name__ == "__main__":
    main()
