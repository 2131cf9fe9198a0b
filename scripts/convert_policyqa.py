"""Turn PolicyQA (privacy policies) into the long-document eval format, one file per split.

PolicyQA (Ahmad, Chi, Tian, Chang, Findings of EMNLP 2020; code MIT, wasiahmad/PolicyQA data/dev.json
and data/test.json) asks reading-comprehension questions about 115 website privacy policies of the
OPP-115 corpus (Wilson et al. 2016, CC BY-NC: use it to measure, do not redistribute it). Its dev and
test splits hold different policies (20 each). Each policy becomes ONE document (its segments in
order), and each question is asked *of that policy* (`"scope": "document"`: the search is filtered to
it), because PolicyQA's questions are generic ("For what purpose do you use my data?") and only make
sense about one policy. The same question asked several times of one policy is one question whose
answers are all the spans marked for it.

    python scripts/convert_policyqa.py DIR_WITH_dev.json_AND_test.json --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMAT = "appliance-longqa/1"
SOURCE = "PolicyQA (wasiahmad/PolicyQA, data/{split}.json), code MIT; policies from OPP-115, CC BY-NC"


def convert(squad: dict, split: str) -> dict:
    documents, questions = [], []
    for article in squad["data"]:
        doc_id = article["title"]
        paragraphs = [p["context"].strip() for p in article["paragraphs"]]
        documents.append({"id": doc_id, "title": doc_id, "sections": [{"heading": None, "text": "\n\n".join(paragraphs)}]})
        asked: dict[str, list[str]] = {}
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                asked.setdefault(qa["question"].strip(), []).extend(a["text"].strip() for a in qa["answers"])
        for n, (question, answers) in enumerate(asked.items()):
            answers = list(dict.fromkeys(a for a in answers if a))
            if answers:
                questions.append({"id": f"{doc_id}-{n}", "question": question, "document_id": doc_id,
                                  "answers": answers, "scope": "document"})
    return {"format": FORMAT, "name": f"policyqa-{split}", "source": SOURCE.format(split=split),
            "documents": documents, "questions": questions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with PolicyQA's dev.json and test.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("dev", "test"):
        data = convert(json.loads((args.source / f"{split}.json").read_text(encoding="utf-8")), split)
        path = args.out / f"policyqa.{split}.json"
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        words = [len(d["sections"][0]["text"].split()) for d in data["documents"]]
        print(f"{path}: {len(data['documents'])} documents ({min(words)}-{max(words)} words), {len(data['questions'])} questions")


if __name__ == "__main__":
    main()
