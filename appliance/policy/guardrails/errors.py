"""Guardrail refusals. Messages name kinds and rules only, never the text that triggered them."""

from __future__ import annotations

from appliance.errors import InvalidRequest


class GuardrailBlocked(InvalidRequest):
    """The tenant's policy blocks this input (PII or prompt injection)."""

    code = "guardrail_blocked"

    def __init__(self, message: str, *, kind: str = "policy", param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.kind = kind
        """What was blocked: "injection" or a PII kind ("email", "credit_card"...); for the audit line."""


class InputTooLarge(InvalidRequest):
    """The input is longer than the policy's max_input_chars."""

    code = "input_too_large"
