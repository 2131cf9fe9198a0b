"""Local guardrails: PII and secret detection and masking (also while streaming), prompt-injection
detection for user input and retrieved content, and a per-tenant policy. Pure Python, no HTTP.

Names are loaded on first use, so importing the policy or the value types does not load the
phone-number and national-id metadata.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.policy.guardrails.errors import GuardrailBlocked, InputTooLarge
    from appliance.policy.guardrails.injection import InjectionClassifier, InjectionDetector, RuleInjectionDetector
    from appliance.policy.guardrails.masking import MaskSession, StreamMasker, mask, redact_text, unmask
    from appliance.policy.guardrails.normalization import normalize
    from appliance.policy.guardrails.pii import KINDS as PII_KINDS
    from appliance.policy.guardrails.pii import PiiDetector
    from appliance.policy.guardrails.policy import GuardrailPolicy
    from appliance.policy.guardrails.service import Guardrails
    from appliance.policy.guardrails.types import (
        GuardrailAction,
        InjectionVerdict,
        InputDecision,
        MaskResult,
        PiiFinding,
    )

_WHERE = {
    "GuardrailBlocked": "errors", "InputTooLarge": "errors",
    "InjectionClassifier": "injection", "InjectionDetector": "injection", "RuleInjectionDetector": "injection",
    "MaskSession": "masking", "StreamMasker": "masking", "mask": "masking", "unmask": "masking",
    "redact_text": "masking",
    "normalize": "normalization",
    "PiiDetector": "pii",
    "GuardrailPolicy": "policy",
    "Guardrails": "service",
    "GuardrailAction": "types", "InjectionVerdict": "types", "InputDecision": "types", "MaskResult": "types",
    "PiiFinding": "types",
}

__all__ = ["PII_KINDS", *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    if name == "PII_KINDS":
        return importlib.import_module(f"{__name__}.pii").KINDS
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
