"""OpenAI response bodies and streaming chunks, built from engine values."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal

import msgspec
import numpy as np

from appliance.protocol.openai import EmbeddingUsage, UsageOut
from appliance.types import Embeddings, TokenLogprob, Usage

FINGERPRINT = "appliance-0.1"


def usage_out(usage: Usage) -> UsageOut:
    return UsageOut(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


class FunctionCallOut(msgspec.Struct):
    name: str
    arguments: str
    """JSON text of the arguments object."""


class ToolCallOut(msgspec.Struct):
    id: str
    function: FunctionCallOut
    type: str = "function"


class AssistantMessage(msgspec.Struct):
    content: str | None
    role: str = "assistant"
    tool_calls: list[ToolCallOut] | msgspec.UnsetType = msgspec.UNSET


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprobOut]


class TextLogprobs(msgspec.Struct):
    """The legacy completions shape."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def chat_logprobs(entries: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> ChoiceLogprobs:
    return ChoiceLogprobs([
        TokenLogprobOut(_text(e.token), e.logprob, list(e.token),
                        [TopLogprob(_text(a.token), a.logprob, list(a.token)) for a in e.top])
        for e in entries
    ])


def text_logprobs(entries: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int = 0) -> TextLogprobs:
    tokens = [_text(e.token) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return TextLogprobs(
        tokens, [e.logprob for e in entries], [{_text(a.token): a.logprob for a in e.top} for e in entries], offsets
    )


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut
    object: str = "chat.completion"
    system_fingerprint: str = FINGERPRINT
    citations: list[Any] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension, with `collection` in the request: the checked citations (else absent)."""
    grounded: bool | msgspec.UnsetType = msgspec.UNSET
    quarantined: list[Any] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension: retrieved chunks (grounded answers) or tool results ({"message_index",
    "tool_call_id"}) the injection guardrail kept out of the prompt."""
    guardrails: list[Any] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension: what the guardrails did to this request (kinds and counts, never the text)."""
    pii_map: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension: {placeholder: original} of masked input, when the tenant asks for a reversible mask."""


class FunctionDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str = FINGERPRINT
    usage: UsageOut | None = None
    guardrails: list[Any] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension, on the chunk with finish_reason: what the guardrails did (kinds and counts)."""
    pii_map: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension, on the chunk with finish_reason: the reversible mask map, when asked for."""
    quarantined: list[Any] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension, on the chunk with finish_reason: tool results the injection guardrail withheld."""


class TextChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: TextLogprobs | None = None


class TextCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[TextChoice]
    usage: UsageOut | None = None
    object: str = "text_completion"
    system_fingerprint: str = FINGERPRINT
    guardrails: list[Any] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension: what the guardrails did (kinds and counts, never the text)."""
    pii_map: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension: {placeholder: original} of masked input, when the tenant asks for a reversible mask."""


class EmbeddingItem(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingList(msgspec.Struct):
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage
    object: str = "list"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    kind: str
    format: str
    aliases: list[str]
    context_length: int | None
    """Prompt plus completion tokens a request can use (the server's `models.n_ctx` caps the trained length)."""
    trained_context_length: int | None
    status: str
    object: str = "model"
    adapter: str | None = None
    """`BASE:ADAPTER` ids only: the LoRA adapter applied to the base model (`parent`)."""
    parent: str | None = None


class RouteCard(ModelCard, kw_only=True):
    """A routed model id (settings [routing.<name>]): kind "route", and the models it may use, in order."""

    candidates: list[str]


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


def new_id(kind: Literal["chatcmpl", "cmpl"]) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def embedding_list(model_id: str, result: Embeddings, encoding: str) -> EmbeddingList:
    items = []
    for i, vector in enumerate(result.vectors):
        value: list[float] | str = vector
        if encoding == "base64":
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        items.append(EmbeddingItem(index=i, embedding=value))
    return EmbeddingList(
        data=items, model=model_id, usage=EmbeddingUsage(result.prompt_tokens, result.prompt_tokens)
    )
