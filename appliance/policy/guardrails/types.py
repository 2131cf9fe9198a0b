"""Values the guardrails hand out. None of them carries raw input text except InputDecision.text,
which is the (possibly masked) text the caller asked to be checked."""

from __future__ import annotations

from typing import Literal

import msgspec

Stage = Literal["input", "retrieved", "tool", "output"]
"""Where a guardrail acted: user input, retrieved chunks, tool results (role "tool" messages), output."""
PiiKind = Literal[
    "secret", "iban", "credit_card", "us_ssn", "uk_nino", "es_dni", "fr_nir", "it_fiscal_code", "de_idnr",
    "email", "ip_address", "phone", "person", "address", "location", "organisation", "date_of_birth",
]
"""Every PII kind a policy may name (pii.ALL_KINDS, kept equal by a test)."""
Action = Literal["allow", "mask", "block", "flag", "drop"]


class PiiFinding(msgspec.Struct, frozen=True):
    """Where a piece of PII or a secret sits in a text: its kind and character offsets, no value."""

    kind: str
    start: int
    end: int


class InjectionVerdict(msgspec.Struct, frozen=True):
    score: float
    """0 (benign) to 1 (certainly an injection)."""
    rules: tuple[str, ...] = ()
    """Names of the rules that matched (or "classifier"); never the matched text."""

    def is_injection(self, threshold: float) -> bool:
        return self.score >= threshold


class GuardrailAction(msgspec.Struct, frozen=True, kw_only=True):
    """One audit line: what a guardrail did. Kinds, counts and rule names only, never raw text."""

    stage: Stage
    kind: str
    """A PII kind ("email", "credit_card"...) or "injection"."""
    action: Action
    count: int = 1
    rules: tuple[str, ...] = ()


class MaskResult(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    findings: tuple[PiiFinding, ...]
    """Offsets refer to the original text."""
    mapping: dict[str, str] | None = None
    """{placeholder: original}; only when a reversible mask was asked for."""


class InputDecision(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    """The text to pass on: the input itself, or its masked form."""
    actions: tuple[GuardrailAction, ...] = ()
    mapping: dict[str, str] | None = None
    """{placeholder: original} when the policy asks for reversible masking and something was masked."""
    injection: InjectionVerdict | None = None
    """The injection verdict, when the policy checked for injection."""
