"""Turn SQuADShifts' New Wikipedia set into the long-document eval format (and its dev/test split).

SQuADShifts (Miller, Krauth, Recht, Schmidt, ICML 2020; CC BY 4.0) wrote new SQuAD-style questions on
48 Wikipedia articles. Each article here becomes ONE document (its paragraphs in order, 1,800-10,700
words), so the chunker cuts it like any long document, and a question's gold answer is the text span
the crowd worker marked. A retrieved chunk is a hit when it belongs to the question's article and
contains one of the answer texts (see appliance.retrieval.evaluate).

The articles are split in two halves by their position (even: dev, odd: test) so nothing is chosen on
the split that is reported. `--squad` also writes the dev articles in SQuAD form (one document per
paragraph) for checks on short passages that must not use XQuAD.

    python scripts/convert_squadshifts.py new_wiki_v1.0.json --out DIR [--squad]

writes DIR/new_wiki.dev.json, DIR/new_wiki.test.json (and DIR/new_wiki.dev.squad.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMAT = "appliance-longqa/1"
SOURCE = "SQuADShifts New Wikipedia v1.0 (modestyachts/squadshifts-website, datasets/new_wiki_v1.0.json), CC BY 4.0"


def convert(squad: dict, split: str) -> dict:
    """The articles of `split` ("dev": even positions, "test": odd) as one document each."""
    parity = {"dev": 0, "test": 1}[split]
    documents, questions = [], []
    for position, article in enumerate(squad["data"]):
        if position % 2 != parity:
            continue
        doc_id = article["title"]
        title = doc_id.replace("_", " ")
        paragraphs = [p["context"].strip() for p in article["paragraphs"]]
        documents.append({"id": doc_id, "title": title, "sections": [{"heading": None, "text": "\n\n".join(paragraphs)}]})
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = list(dict.fromkeys(a["text"].strip() for a in qa["answers"] if a["text"].strip()))
                if answers:
                    questions.append({"id": qa["id"], "question": qa["question"].strip(), "document_id": doc_id, "answers": answers})
    return {"format": FORMAT, "name": f"squadshifts-new_wiki-{split}", "source": SOURCE, "documents": documents,
            "questions": questions}


def squad_subset(squad: dict, split: str) -> dict:
    parity = {"dev": 0, "test": 1}[split]
    return {"version": squad.get("version", "1.0"), "data": [a for i, a in enumerate(squad["data"]) if i % 2 == parity]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="new_wiki_v1.0.json from SQuADShifts")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--squad", action="store_true", help="also the dev articles in SQuAD form, one document per paragraph")
    args = parser.parse_args()
    squad = json.loads(args.source.read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("dev", "test"):
        data = convert(squad, split)
        path = args.out / f"new_wiki.{split}.json"
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        words = [len(d["sections"][0]["text"].split()) for d in data["documents"]]
        print(f"{path}: {len(data['documents'])} documents ({min(words)}-{max(words)} words), {len(data['questions'])} questions")
    if args.squad:
        path = args.out / "new_wiki.dev.squad.json"
        path.write_text(json.dumps(squad_subset(squad, "dev"), ensure_ascii=False), encoding="utf-8")
        print(f"{path}: dev articles, one document per paragraph")


if __name__ == "__main__":
    main()
