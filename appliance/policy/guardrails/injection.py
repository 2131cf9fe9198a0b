"""Prompt-injection detection by rules over normalised text, with a seam for a learned classifier.

The rules (appliance.policy.guardrails.injection_rules) come in two sets: `direct` for the user's own
input, `indirect` for third-party content about to be placed in the prompt. Each rule has a weight;
the score is the noisy-OR of the weights of the rules that matched (1 - prod(1 - w)), so one strong
rule or several weak ones cross the threshold. Before a rule's regex runs, its gate (derived from the
pattern by appliance.policy.guardrails.gates) checks that the text holds the words every match needs.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from appliance.policy.guardrails.gates import Gate, derive_gate, tokens
from appliance.policy.guardrails.injection_rules import OBFUSCATION_CHARS, OBFUSCATION_WEIGHT, RULES, InjectionRule
from appliance.policy.guardrails.normalization import has_mixed_script, variants
from appliance.policy.guardrails.types import InjectionVerdict

Scope = Literal["direct", "indirect"]


class InjectionClassifier(Protocol):
    """A learned detector (e.g. an ONNX model run by appliance.engines.onnx): probability of injection.

    `score` and `scores` (one batch, one model run) return None when the classifier cannot answer now
    (its model is still loading, or failed to load or to run): the rules decide those texts instead.
    """

    def score(self, text: str) -> float | None: ...

    def scores(self, texts: list[str]) -> list[float] | None: ...


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    """An InjectionRule ready to run (see InjectionRule for the fields it shares)."""

    name: str
    weight: float
    pattern: re.Pattern[str]
    word_start: bool
    """The pattern's leading \\b was taken out and is checked on each match."""
    gate: Gate
    """What every match contains, derived from the pattern: tested before the pattern runs."""
    opener: re.Pattern[str] | None
    adjacent: bool
    indirect_only: bool
    needs: frozenset[str]
    unless: frozenset[str]

    def matches(self, form: str) -> Iterator[re.Match[str]]:
        for m in self.pattern.finditer(form):
            if not self.word_start or m.start() == 0 or not _is_word_char(form[m.start() - 1]):
                yield m


@functools.cache
def _compiled_rules() -> tuple[_CompiledRule, ...]:
    """The rules, compiled and gated: once, when the first detector is made (deriving the gates takes
    some tens of milliseconds)."""
    return tuple(_compile(rule) for rule in RULES)


def _compile(rule: InjectionRule) -> _CompiledRule:
    pattern, word_start = _word_rx(rule.pattern)
    return _CompiledRule(
        name=rule.name, weight=rule.weight, pattern=pattern, word_start=word_start, gate=_gate(rule),
        opener=None if rule.opener is None else _rx(rule.opener),
        adjacent=rule.adjacent, indirect_only=rule.indirect_only, needs=rule.needs, unless=rule.unless,
    )


def _gate(rule: InjectionRule) -> Gate:
    """What a text holds wherever the rule counts a match: what its pattern's matches hold, and for a
    sentence-initial rule what its opener's do (an opener starts a sentence: see `_opens`)."""
    return derive_gate(rule.pattern, re.MULTILINE, opener=rule.opener, adjacent=rule.adjacent)


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.MULTILINE)


def _top_level_branches(pattern: str) -> list[str]:
    """pattern split at its top-level "|" (outside groups and character classes)."""
    branches, depth, in_class, start, i = [], 0, False, 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "]":
                i += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            branches.append(pattern[start:i])
            start = i + 1
        i += 1
    branches.append(pattern[start:])
    return branches


def _word_rx(pattern: str) -> tuple[re.Pattern[str], bool]:
    """The pattern compiled without the leading \\b of its branches, and whether the caller must check
    that a match starts a word. Python's re scans far faster for a pattern that starts with literals."""
    branches = _top_level_branches(pattern)
    if not all(b.startswith("\\b") for b in branches):
        return _rx(pattern), False
    return _rx("|".join(b[2:] for b in branches)), True


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


_BOUNDARY = re.compile(r"[!?](?![\"”'’)])|[\n|:;]|\.(?!\S)")
"""What ends a sentence, line or table cell (not a "!" or "?" that closes a quotation inside one)."""
_WEIGHTS = {rule.name: rule.weight for rule in RULES}
_MAX_OPENER_DISTANCE = 120
"""Most characters between a sentence's start and the part of it a sentence-initial rule anchors on."""


class RuleInjectionDetector:
    """Rule-based injection scores for user input (`direct`) or third-party content (`indirect`)."""

    def __init__(self, scope: Scope = "direct") -> None:
        self.scope = scope
        rules = [r for r in _compiled_rules() if scope == "indirect" or not r.indirect_only]
        self._rules = sorted(rules, key=lambda r: bool(r.needs))  # rules that need others run last

    def verdict(self, text: str) -> InjectionVerdict:
        hits: dict[str, float] = {}
        for form in variants(text):
            self._match(form, hits)
        if OBFUSCATION_CHARS.search(text) or has_mixed_script(text):
            hits["obfuscation"] = OBFUSCATION_WEIGHT
        benign = 1.0
        for weight in hits.values():
            benign *= 1.0 - weight
        return InjectionVerdict(score=round(1.0 - benign, 4), rules=tuple(sorted(hits)))

    def _match(self, form: str, hits: dict[str, float]) -> None:
        words = tokens(form)
        boundaries: list[int] | None = None
        matched: set[str] = set()
        for rule in self._rules:
            if rule.name in matched or rule.needs and not rule.needs & (matched | hits.keys()):
                continue
            if not rule.gate.admits(words, form):
                continue
            if rule.opener is None:
                found = next(rule.matches(form), None) is not None
            else:
                if boundaries is None:
                    boundaries = [m.end() for m in _BOUNDARY.finditer(form)]
                found = any(self._opens(rule, form, m.start(), boundaries) for m in rule.matches(form))
            if found:
                matched.add(rule.name)
        for name in matched:
            hits[name] = _WEIGHTS[name]
        for rule in self._rules:
            if rule.unless & hits.keys():
                hits.pop(rule.name, None)

    @staticmethod
    def _opens(rule: _CompiledRule, form: str, at: int, boundaries: list[int]) -> bool:
        """Whether the sentence holding position `at` starts with the rule's opener."""
        i = bisect.bisect_right(boundaries, at) - 1
        start = boundaries[i] if i >= 0 else 0
        if at - start > _MAX_OPENER_DISTANCE:
            return False
        assert rule.opener is not None
        if rule.adjacent:
            return rule.opener.fullmatch(form, start, at) is not None
        return rule.opener.match(form, start, at) is not None

    def score(self, text: str) -> float:
        return self.verdict(text).score


class InjectionDetector:
    """The detector the guardrails use: the rules, and a learned classifier when one is configured.

    The decision is combined: a text's score is the higher of the classifier's and the rules' (either
    one flags it), and the verdict names the rules that matched, for the audit trail, with "classifier"
    first when the classifier answered. When it returns None (not available yet) the rules decide alone.
    """

    def __init__(self, scope: Scope = "direct", classifier: InjectionClassifier | None = None) -> None:
        self.rules = RuleInjectionDetector(scope)
        self.classifier = classifier

    def verdict(self, text: str) -> InjectionVerdict:
        return self.verdicts([text])[0]

    def verdicts(self, texts: list[str]) -> list[InjectionVerdict]:
        """The verdict of each text; the classifier scores them all in one batch."""
        by_rules = [self.rules.verdict(t) for t in texts]
        if self.classifier is None or not texts:
            return by_rules
        learned = self.classifier.scores(texts)
        if learned is None:
            return by_rules
        return [
            InjectionVerdict(score=max(min(1.0, max(0.0, float(p))), r.score), rules=("classifier", *r.rules))
            for p, r in zip(learned, by_rules, strict=True)
        ]

    def score(self, text: str) -> float:
        return self.verdict(text).score
