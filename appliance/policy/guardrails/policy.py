"""A tenant's guardrail policy: what to do with PII, prompt injection and oversized requests."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from appliance.policy.guardrails.types import PiiKind


class GuardrailPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pii_input: Literal["allow", "mask", "block", "flag"] = "flag"
    """PII and secrets in the input: pass, replace with placeholders, refuse (400), or pass and report."""
    pii_output: Literal["allow", "mask", "flag"] = "allow"
    """PII and secrets in generated text: pass, mask while streaming, or pass and report."""
    injection: Literal["allow", "block", "flag"] = "block"
    """Prompt injection in the user's input: skip the check, refuse (400), or pass and report."""
    retrieved_injection: Literal["allow", "drop", "flag"] = "drop"
    """Injected instructions in retrieved content: skip the check, leave the chunk out, or keep and report."""
    pii_kinds: frozenset[PiiKind] | None = None
    """The PII kinds looked for in input and output, e.g. ["email", "person", "organisation"]; None: the
    pattern kinds and person, address, date_of_birth (organisation and location only when named). The
    named-entity kinds need the spaCy pipeline package; naming one that is not installed fails the request (503)."""
    reversible_mask: bool = False
    """Return {placeholder: original} with masked input so the caller can restore it; off by default."""
    max_input_chars: Annotated[int, msgspec.Meta(ge=1)] = 200_000
    """Longest input accepted, in characters; longer inputs get 400 input_too_large."""
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Cap on a request's max_tokens (also applied when the request names none); None: no cap."""
    injection_threshold: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.5
    """Injection score at or above which the input or chunk counts as an injection."""

    def cap_max_tokens(self, requested: int | None) -> int | None:
        """The max_tokens to use: the request's value, lowered to the policy's cap when there is one."""
        if self.max_tokens is None:
            return requested
        return self.max_tokens if requested is None else min(requested, self.max_tokens)
