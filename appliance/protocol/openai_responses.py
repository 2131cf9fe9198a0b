"""OpenAI Responses API wire types (text in, text out): the request converts itself once into a chat
request, so it shares every path of /v1/chat/completions (keys, limits, guardrails, cache, metering)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec

from appliance.errors import InvalidRequest
from appliance.protocol.openai import ChatCompletionRequest, ChatMessage, MaxTokens, Temperature, TopP


class InputText(msgspec.Struct, tag_field="type", tag="input_text"):
    text: str


class OutputTextIn(msgspec.Struct, tag_field="type", tag="output_text"):
    """An earlier answer sent back as context."""

    text: str


class InputMessage(msgspec.Struct, kw_only=True):
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText | OutputTextIn]
    type: Literal["message"] = "message"

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | Annotated[list[InputMessage], msgspec.Meta(min_length=1)]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    store: bool | None = None
    """Accepted; nothing is stored (responses cannot be fetched or continued later)."""
    previous_response_id: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    user: str | None = None
    metadata: dict[str, str] | None = None

    def to_chat(self) -> ChatCompletionRequest:
        if self.previous_response_id is not None:
            raise InvalidRequest(
                "previous_response_id is not supported: this server stores no responses; send the earlier turns in `input`.",
                param="previous_response_id",
            )
        if self.tools:
            raise InvalidRequest(
                "tools are not supported on /v1/responses; use /v1/chat/completions for tool calling.", param="tools"
            )
        messages = [] if self.instructions is None else [ChatMessage(role="system", content=self.instructions)]
        if isinstance(self.input, str):
            if not self.input:
                raise InvalidRequest("input is empty.", param="input")
            messages.append(ChatMessage(role="user", content=self.input))
        else:
            messages += [ChatMessage(role=m.role, content=m.text()) for m in self.input]
        return ChatCompletionRequest(
            model=self.model, messages=messages, max_tokens=self.max_output_tokens, temperature=self.temperature,
            top_p=self.top_p, stream=self.stream, user=self.user,
        )


class OutputText(msgspec.Struct):
    text: str
    annotations: list[Any] = []
    type: str = "output_text"


class OutputMessage(msgspec.Struct):
    id: str
    content: list[OutputText]
    status: str
    role: str = "assistant"
    type: str = "message"


class ResponsesUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = msgspec.field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = msgspec.field(default_factory=lambda: {"reasoning_tokens": 0})


class IncompleteDetails(msgspec.Struct):
    reason: str


class ResponseObject(msgspec.Struct):
    id: str
    created_at: int
    model: str
    status: str
    output: list[OutputMessage]
    usage: ResponsesUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    error: Any = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list[Any] = []
    metadata: dict[str, str] = {}
    object: str = "response"


class ResponseStreamEvent(msgspec.Struct):
    """One event of a streamed response (its `event:` line names the type); the other fields depend on the type."""

    type: str
    sequence_number: int


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"
