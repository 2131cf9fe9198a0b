"""Measure the guardrails: injection detection on BIPIA, PII detection on seeded synthetic text, and
both on a labelled JSONL file a customer brings (`evaluate_file`, format in its docstring).

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

import msgspec

from appliance.policy.guardrails.injection import InjectionClassifier, InjectionDetector, RuleInjectionDetector
from appliance.policy.guardrails.pii import PiiDetector
from appliance.policy.guardrails.synthetic import PiiSample, pii_samples
from appliance.policy.guardrails.types import PiiFinding

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


def _count_spans(found: Any, gold: Any, counts: dict[str, Counter[str]]) -> None:
    """Add one text's findings to per-kind tp/fp/fn: a finding is a true positive when it overlaps a
    gold span of the same kind not matched yet."""
    matched_gold: set[int] = set()
    for f in found:
        hit = next((i for i, g in enumerate(gold)
                    if g.kind == f.kind and i not in matched_gold and _overlaps((f.start, f.end), (g.start, g.end))), None)
        if hit is None:
            counts[f.kind]["fp"] += 1
        else:
            matched_gold.add(hit)
            counts[f.kind]["tp"] += 1
    for i, g in enumerate(gold):
        if i not in matched_gold:
            counts[g.kind]["fn"] += 1


def _per_kind(counts: dict[str, Counter[str]]) -> tuple[dict[str, Any], dict[str, Any]]:
    per_kind = {
        kind: {**_prf(c["tp"], c["fp"], c["fn"]), "tp": c["tp"], "fp": c["fp"], "fn": c["fn"]}
        for kind, c in sorted(counts.items())
    }
    total = Counter[str]()
    for c in counts.values():
        total.update(c)
    return per_kind, {**_prf(total["tp"], total["fp"], total["fn"]), "tp": total["tp"], "fp": total["fp"], "fn": total["fn"]}


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
        _count_spans(detector.find(sample.text), sample.spans, counts)
    elapsed = time.perf_counter() - started
    per_kind, overall = _per_kind(counts)
    return {
        "texts": len(samples),
        "overall": overall,
        "per_kind": per_kind,
        "hard_negatives": sum(s.hard_negatives for s in samples),
        "ms_per_kb": round(elapsed * 1000 / max(1, chars / 1024), 3),
    }


# -- a customer's labelled file ------------------------------------------------------------------------

class EvalFileError(ValueError):
    """A line of an evaluation file that does not follow the format; the message names file and line."""


class InjectionLine(msgspec.Struct, frozen=True):
    text: str
    label: int
    scope: str


class PiiLine(msgspec.Struct, frozen=True):
    text: str
    spans: tuple[PiiFinding, ...]
    """The gold spans, in the detector's own type."""


def read_eval_file(path: Path) -> tuple[list[InjectionLine], list[PiiLine]]:
    """The lines of a labelled JSONL file. Each line is one JSON object with a "text" (string) and
    - for injection: "label": 1 / 0, true / false, or "injection" / "benign" ("attack" / "safe"), and
      optionally "scope": "direct" (a user turn, the default) or "indirect" (a retrieved document or
      tool result);
    - for PII: "spans": a list of {"start", "end", "kind"} (character offsets into "text", end
      exclusive; an empty list: the text holds no PII).
    A line may carry both. Blank lines are skipped. Raises EvalFileError naming the line.
    """
    injection: list[InjectionLine] = []
    pii: list[PiiLine] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalFileError(f"{path}: cannot read: {exc}") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalFileError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise EvalFileError(f'{where}: expected an object with a "text" string')
        text = row["text"]
        if "label" not in row and "spans" not in row:
            raise EvalFileError(f'{where}: needs "label" (injection) or "spans" (PII)')
        if "label" in row:
            try:
                label = parse_label(row["label"])
            except ValueError as exc:
                raise EvalFileError(f"{where}: {exc}") from None
            scope = row.get("scope", "direct")
            if scope not in ("direct", "indirect"):
                raise EvalFileError(f'{where}: scope {scope!r} is not "direct" or "indirect"')
            injection.append(InjectionLine(text, label, scope))
        if "spans" in row:
            try:
                spans = msgspec.convert(row["spans"], tuple[PiiFinding, ...])
            except msgspec.ValidationError as exc:
                raise EvalFileError(f'{where}: "spans" must be a list of {{"start", "end", "kind"}}: {exc}') from None
            for span in spans:
                if not 0 <= span.start < span.end <= len(text):
                    raise EvalFileError(f"{where}: span {span.start}-{span.end} ({span.kind}) is outside the text "
                                        f"({len(text)} characters) or empty")
            pii.append(PiiLine(text, spans))
    if not injection and not pii:
        raise EvalFileError(f"{path}: no labelled lines")
    return injection, pii


def default_pii_detector() -> PiiDetector:
    """What the gateway screens with: the pattern kinds, and the named entities when spaCy's pipeline is
    installed (a customer's person and address spans would otherwise all count as misses)."""
    from appliance.policy.guardrails.ner import LazyEntityDetector, missing_packages

    return PiiDetector(entities=None if missing_packages() else LazyEntityDetector())


def evaluate_file(
    path: Path, *, threshold: float = 0.5, classifier: InjectionClassifier | None = None,
    retrieved_classifier: InjectionClassifier | None = None, pii: PiiDetector | None = None,
) -> dict[str, Any]:
    """Precision, recall and F1 on a customer's labelled JSONL (format: `read_eval_file`): injection per
    scope with the guardrails' combined decision (rules, and the classifier of that scope when given),
    PII per kind (a finding counts when it overlaps a gold span of its kind)."""
    injection_lines, pii_lines = read_eval_file(path)
    report: dict[str, Any] = {"file": str(path)}
    if injection_lines:
        report["injection"] = {}
        for scope, clf in (("direct", classifier), ("indirect", retrieved_classifier)):
            lines = [x for x in injection_lines if x.scope == scope]
            if not lines:
                continue
            detector = InjectionDetector(scope, clf)  # type: ignore[arg-type]
            started = time.perf_counter()
            scores = [v.score for i in range(0, len(lines), 64)
                      for v in detector.verdicts([x.text for x in lines[i:i + 64]])]
            elapsed = time.perf_counter() - started
            flagged = [s >= threshold for s in scores]
            tp = sum(f and x.label == 1 for f, x in zip(flagged, lines))
            fp = sum(f and x.label == 0 for f, x in zip(flagged, lines))
            fn = sum(not f and x.label == 1 for f, x in zip(flagged, lines))
            tn = len(lines) - tp - fp - fn
            report["injection"][scope] = {
                **_prf(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "threshold": threshold,
                "false_positive_rate": round(fp / max(1, fp + tn), 4),
                "ms_per_text": round(elapsed * 1000 / len(lines), 3),
            }
    if pii_lines:
        detector_pii = pii or default_pii_detector()
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for x in pii_lines:
            _count_spans(detector_pii.find(x.text), x.spans, counts)
        per_kind, overall = _per_kind(counts)
        report["pii"] = {"texts": len(pii_lines), "overall": overall, "per_kind": per_kind}
    return report
