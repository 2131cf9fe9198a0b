"""Measure the guardrails: injection detection on BIPIA, PII detection on seeded synthetic text.

BIPIA (microsoft/BIPIA, train split): the benign class is every email and table context untouched;
the attack class is the same contexts with one attack instruction inserted at the start, in the
middle (at a line or sentence boundary) or at the end, attacks taken in turn so each is used.
Nothing here is tuned to these strings; they are only measured.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from appliance.policy.guardrails.injection import InjectionClassifier, InjectionDetector, RuleInjectionDetector
from appliance.policy.guardrails.pii import PiiDetector
from appliance.policy.guardrails.synthetic import PiiSample, pii_samples

POSITIONS = ("start", "middle", "end")
_BOUNDARY = re.compile(r"\n|(?<=[.!?])\s+")


def load_bipia(bipia_dir: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """([(source, context)], [(attack file, category, attack)]) from a BIPIA directory."""
    contexts: list[tuple[str, str]] = []
    for source in ("email", "table"):
        with open(bipia_dir / f"{source}_train.jsonl", encoding="utf-8") as fh:
            contexts += [(source, json.loads(line)["context"]) for line in fh if line.strip()]
    attacks: list[tuple[str, str, str]] = []
    for kind in ("text", "code"):
        with open(bipia_dir / f"{kind}_attack_train.json", encoding="utf-8") as fh:
            by_category: dict[str, list[str]] = json.load(fh)
        attacks += [(kind, category, a) for category, items in by_category.items() for a in items]
    return contexts, attacks


def insert_attack(context: str, attack: str, position: str, rng: random.Random) -> str:
    if position == "start":
        return f"{attack}\n{context}"
    if position == "end":
        return f"{context}\n{attack}"
    n = len(context)
    cuts = [m.end() for m in _BOUNDARY.finditer(context) if n // 4 <= m.end() <= 3 * n // 4]
    if not cuts:  # no boundary in the middle half: the nearest whitespace to the middle
        spaces = [m.end() for m in re.finditer(r"\s+", context)] or [n // 2]
        cuts = [min(spaces, key=lambda i: abs(i - n // 2))]
    at = rng.choice(cuts)
    joiner = "\n" if context[at - 1:at] == "\n" else " "
    return f"{context[:at]}{attack}{joiner}{context[at:]}"


def parse_label(value: object) -> int:
    """An injection label as customers write it: 1 / 0, true / false, or "injection" / "benign"
    (also "attack" / "safe"; case-insensitive). Raises ValueError for anything else."""
    if isinstance(value, bool) or value in (0, 1):
        return int(value)  # type: ignore[arg-type]
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _LABEL_WORDS:
            return _LABEL_WORDS[word]
    raise ValueError(f"label {value!r} is not one of 1, 0, \"injection\", \"benign\"")


_LABEL_WORDS = {"injection": 1, "attack": 1, "1": 1, "true": 1, "benign": 0, "safe": 0, "0": 0, "false": 0}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def evaluate_injection(
    bipia_dir: Path, *, seed: int = 0, threshold: float = 0.5, limit: int | None = None,
    classifier: InjectionClassifier | None = None,
) -> dict[str, Any]:
    """Precision, recall and F1 of the indirect-injection detector on BIPIA emails and tables.

    With `classifier` its score decides (as in the gateway: the rules only where it returns None).
    """
    contexts, attacks = load_bipia(Path(bipia_dir))
    if limit is not None:
        rng_pick = random.Random(seed)
        contexts = rng_pick.sample(contexts, min(limit, len(contexts)))
    detector: InjectionDetector | RuleInjectionDetector = (
        InjectionDetector("indirect", classifier) if classifier is not None else RuleInjectionDetector("indirect")
    )
    rng = random.Random(seed)
    order = list(range(len(attacks)))
    rng.shuffle(order)
    started = time.perf_counter()
    tp = fp = fn = tn = 0
    by_category: dict[str, Counter[str]] = defaultdict(Counter)
    by_position: dict[str, Counter[str]] = defaultdict(Counter)
    by_source: dict[str, Counter[str]] = defaultdict(Counter)
    benign_rules: Counter[str] = Counter()
    for i, (source, context) in enumerate(contexts):
        verdict = detector.verdict(context)
        benign = verdict.score >= threshold
        fp += benign
        tn += not benign
        by_source[source]["fp"] += benign
        if benign:
            benign_rules.update(verdict.rules)
        kind, category, attack = attacks[order[i % len(attacks)]]
        position = POSITIONS[rng.randrange(3)]
        caught = detector.score(insert_attack(context, attack, position, rng)) >= threshold
        tp += caught
        fn += not caught
        for bucket in (by_category[f"{kind}/{category}"], by_position[position], by_source[source]):
            bucket["tp"] += caught
            bucket["n"] += 1
    elapsed = time.perf_counter() - started
    n_texts = 2 * len(contexts)
    return {
        **_prf(tp, fp, fn),
        "threshold": threshold,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "false_positive_rate": round(fp / max(1, fp + tn), 4),
        "benign": len(contexts), "attacked": len(contexts), "attacks": len(attacks),
        "recall_by_category": {k: round(c["tp"] / c["n"], 4) for k, c in sorted(by_category.items())},
        "recall_by_position": {k: round(by_position[k]["tp"] / max(1, by_position[k]["n"]), 4) for k in POSITIONS},
        "by_source": {
            k: {"recall": round(c["tp"] / max(1, c["n"]), 4), "false_positive_rate": round(c["fp"] / max(1, c["n"]), 4)}
            for k, c in sorted(by_source.items())
        },
        "benign_rule_hits": dict(benign_rules.most_common()),
        "ms_per_text": round(elapsed * 1000 / max(1, n_texts), 3),
    }


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def evaluate_pii(seed: int = 0, n: int = 500, *, detector: PiiDetector | None = None) -> dict[str, Any]:
    """Per-kind precision and recall on n seeded synthetic texts with PII and hard negatives.

    A finding counts as a true positive when it overlaps a gold span of the same kind.
    """
    detector = detector or PiiDetector()
    samples: list[PiiSample] = pii_samples(seed, n)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    started = time.perf_counter()
    chars = 0
    for sample in samples:
        chars += len(sample.text)
        found = detector.find(sample.text)
        matched_gold: set[int] = set()
        for f in found:
            hit = next((i for i, g in enumerate(sample.spans)
                        if g.kind == f.kind and i not in matched_gold and _overlaps((f.start, f.end), (g.start, g.end))), None)
            if hit is None:
                counts[f.kind]["fp"] += 1
            else:
                matched_gold.add(hit)
                counts[f.kind]["tp"] += 1
        for i, g in enumerate(sample.spans):
            if i not in matched_gold:
                counts[g.kind]["fn"] += 1
    elapsed = time.perf_counter() - started
    per_kind = {
        kind: {**_prf(c["tp"], c["fp"], c["fn"]), "tp": c["tp"], "fp": c["fp"], "fn": c["fn"]}
        for kind, c in sorted(counts.items())
    }
    total = Counter[str]()
    for c in counts.values():
        total.update(c)
    return {
        "texts": len(samples),
        "overall": {**_prf(total["tp"], total["fp"], total["fn"]), "tp": total["tp"], "fp": total["fp"], "fn": total["fn"]},
        "per_kind": per_kind,
        "hard_negatives": sum(s.hard_negatives for s in samples),
        "ms_per_kb": round(elapsed * 1000 / max(1, chars / 1024), 3),
    }
