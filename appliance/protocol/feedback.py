"""Wire types of POST /v1/feedback: a user's verdict on one answer, named by its X-Request-Id."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from appliance.policy.experiments import MAX_COMMENT_CHARS


class FeedbackRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    """The answer's X-Request-Id response header."""
    score: Annotated[float, msgspec.Meta(ge=-1, le=1)]
    """-1 (bad) to 1 (good): thumbs down -1, thumbs up 1; a 1..5 rating maps to (stars - 3) / 2."""
    comment: Annotated[str, msgspec.Meta(max_length=MAX_COMMENT_CHARS)] | None = None
    """Free text, at most 2,000 characters."""


class FeedbackOut(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["feedback"]
    created: int
    request_id: str
    score: float
    comment: str | None
    model: str | None
    """The model that answered the request."""
    variant: str | None
    """The split variant the request was given (None: its route has no split, or it was not routed)."""
