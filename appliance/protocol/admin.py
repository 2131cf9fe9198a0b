"""Wire types of the admin API (/v1/admin/...) and of usage reports."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class CreateTenant(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    allowed_models: list[str] | None = None
    rpm: NonNegative | None = None
    tpm: NonNegative | None = None
    daily_tokens: NonNegative | None = None
    monthly_tokens: NonNegative | None = None
    guardrails: dict[str, Any] | None = None
    default_adapter: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] | None = None
    """A LoRA adapter its requests to the adapter's base model use when they name none."""


class CreateKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tenant: str
    role: Literal["admin", "user"] = "user"
    name: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    expires_at: float | None = None
    """Unix seconds after which the key stops working."""
    expires_in_days: Annotated[float, msgspec.Meta(gt=0, le=36500)] | None = None
    rpm: NonNegative | None = None
    tpm: NonNegative | None = None
