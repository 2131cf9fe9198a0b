"""Ollama wire types, with the field names of Ollama's API (docs/api.md in github.com/ollama/ollama).

Each request converts itself once into the OpenAI request Struct the services take
(`ChatCompletionRequest`, `CompletionRequest`, `EmbeddingRequest`), so an Ollama request goes through
the same validation, grammar path (`format`), guardrails, cache and metering as its /v1 twin. The
three sampling knobs OpenAI's API lacks (top_k, min_p, repeat_penalty) ride on small subclasses of
those Structs that override `sampling`. Unknown fields and Ollama options that have no meaning
here (num_gpu, num_thread, mirostat...) are ignored; fields that would change the answer and cannot
be honoured (images, template, context, think, logprobs) are refused with a 400 naming them.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from appliance.errors import InvalidRequest
from appliance.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Penalty,
    Seed,
    Stop,
    Temperature,
    TopP,
)
from appliance.types import Sampling, SamplingParams

OLLAMA_API_VERSION = "0.6.0"
"""The Ollama release whose API these routes follow (structured outputs, /api/embed, tools, done_reason
load/unload); clients that gate features on /api/version read it."""
LATEST = ":latest"
_OPENAI_PATH = re.compile(r"at `\$\.?([^`]*)`")

# -- requests ------------------------------------------------------------------------------------


class Options(msgspec.Struct, kw_only=True):
    """The Modelfile parameters a request may set; the ones not listed are accepted and ignored."""

    num_predict: Annotated[int, msgspec.Meta(ge=-2)] | None = None
    """Most tokens to generate; -1 (no limit) and -2 (fill the context) both mean no limit."""
    temperature: Temperature | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    top_p: TopP | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    seed: Seed | None = None
    """A negative seed means a random one, as in Ollama."""
    stop: Stop = None
    num_ctx: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Accepted up to the context one request to the model can use (the server's context is fixed)."""
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None

    def fields(self, context_window: int | None) -> dict[str, Any]:
        """The OpenAI request's fields these options set (with top_k, min_p, repeat_penalty beside them)."""
        if self.num_ctx is not None and context_window is not None and self.num_ctx > context_window:
            raise InvalidRequest(
                f"options.num_ctx is {self.num_ctx}, but a request to this model can use at most {context_window} "
                "tokens (its trained context capped by the server's models.n_ctx).",
                param="options.num_ctx",
            )
        if self.num_predict == 0:
            raise InvalidRequest("options.num_predict must be at least 1, or -1 for no limit.", param="options.num_predict")
        out: dict[str, Any] = {"max_tokens": self.num_predict if self.num_predict and self.num_predict > 0 else None}
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p", "repeat_penalty"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.seed is not None and self.seed >= 0:
            out["seed"] = self.seed
        if self.stop:
            out["stop"] = self.stop
        return out


Format = str | dict[str, Any] | None
KeepAlive = str | float | None


class ToolCallFunction(msgspec.Struct, kw_only=True):
    name: str
    arguments: dict[str, Any] = {}
    """An object, not OpenAI's JSON text."""


class ToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    function: ToolCallFunction
    id: str | None = None
    """Not in Ollama's documented shape; accepted in the history to tie a tool turn to its call."""


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    """A tool turn: the function whose result `content` is."""
    thinking: str | None = None


class _GenerationFields(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None
    logprobs: bool | None = None

    def keep_alive_s(self) -> float | None:
        return keep_alive_seconds(self.keep_alive)

    def _refuse_unsupported(self) -> None:
        if self.think not in (None, False):
            raise InvalidRequest(f'"{self.model}" does not support thinking.', param="think")
        if self.logprobs:
            raise InvalidRequest("logprobs are not supported on the Ollama routes.", param="logprobs")

    def _common(self, model_id: str, context_window: int | None) -> dict[str, Any]:
        self._refuse_unsupported()
        return {"model": model_id, "stream": self.stream, **(self.options or Options()).fields(context_window)}


class GenerateRequest(_GenerationFields, kw_only=True):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None

    def check(self) -> None:
        if self.images:
            raise InvalidRequest(_NO_IMAGES, param="images")
        if self.template:
            raise InvalidRequest(
                "template overrides are not supported: send raw=true with the prompt already formatted.",
                param="template",
            )
        if self.context:
            raise InvalidRequest(
                "context is not supported (no context is returned): send the conversation to /api/chat as messages.",
                param="context",
            )
        keep_alive_seconds(self.keep_alive)

    def uses_template(self, chat_model: bool) -> bool:
        """Through the model's chat template: a chat model, unless the request is raw."""
        return chat_model and not self.raw

    def chat_completion(self, model_id: str, context_window: int | None) -> ChatCompletionRequest:
        """`system` and `prompt` as a system and a user turn, through the model's chat template."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": self.prompt or ""})
        fields = {**self._common(model_id, context_window), "messages": messages}
        if (fmt := response_format(self.format)) is not None:
            fields["response_format"] = fmt
        return _convert(fields, OllamaChatCompletion)

    def completion(self, model_id: str, context_window: int | None) -> CompletionRequest:
        """The prompt as it is (raw, or a model without a chat template: `system` goes in front)."""
        if response_format(self.format) is not None:
            raise InvalidRequest(
                "format needs the chat template: send raw=false to a chat model.", param="format"
            )
        prompt = self.prompt or ""
        if self.system and not self.raw:
            prompt = f"{self.system}\n\n{prompt}"
        fields = {**self._common(model_id, context_window), "prompt": prompt}
        if self.suffix:
            fields["suffix"] = self.suffix  # CompletionRequest refuses it, naming `suffix`
        return _convert(fields, OllamaCompletion)


class ChatRequest(_GenerationFields, kw_only=True):
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    """Ollama's tool shape is OpenAI's: passed on as ChatCompletionRequest.tools."""

    def check(self) -> None:
        for i, m in enumerate(self.messages or []):
            if m.images:
                raise InvalidRequest(_NO_IMAGES, param=f"messages[{i}].images")
        keep_alive_seconds(self.keep_alive)

    def chat_completion(self, model_id: str, context_window: int | None) -> ChatCompletionRequest:
        fields = {**self._common(model_id, context_window), "messages": openai_messages(self.messages or [])}
        if (fmt := response_format(self.format)) is not None:
            fields["response_format"] = fmt
        if self.tools:
            fields["tools"] = self.tools
        return _convert(fields, OllamaChatCompletion)


def openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Ollama turns in OpenAI's shape: tool calls' arguments as JSON text, each tool turn tied to its call."""
    out: list[dict[str, Any]] = []
    open_calls: dict[str, list[str]] = {}  # function name -> ids of calls not answered yet
    for i, m in enumerate(messages):
        turn: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            turn["content"] = m.content or None
            calls = []
            for j, call in enumerate(m.tool_calls):
                call_id = call.id or f"call_{i}_{j}"
                open_calls.setdefault(call.function.name, []).append(call_id)
                arguments = msgspec.json.encode(call.function.arguments).decode()
                calls.append({"id": call_id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}})
            turn["tool_calls"] = calls
        if m.role == "tool" and m.tool_name:
            turn["name"] = m.tool_name
            pending = open_calls.get(m.tool_name)
            if pending:
                turn["tool_call_id"] = pending.pop(0)
        out.append(turn)
    return out


class EmbedRequest(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[str] | None = None
    truncate: bool = True
    """Accepted; an input longer than the model's window is refused (400) rather than cut."""
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None

    def texts(self) -> list[str]:
        """The inputs; none (an empty string or list) only loads the model, as in Ollama."""
        if isinstance(self.input, str):
            return [self.input] if self.input else []
        return self.input or []

    def embedding_request(self, model_id: str) -> EmbeddingRequest:
        return EmbeddingRequest(model=model_id, input=self.texts(), dimensions=self.dimensions)

    def keep_alive_s(self) -> float | None:
        return keep_alive_seconds(self.keep_alive)


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    """The older /api/embeddings: one `prompt`, one `embedding`."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None

    def embedding_request(self, model_id: str) -> EmbeddingRequest:
        return EmbeddingRequest(model=model_id, input=[self.prompt or ""])

    def keep_alive_s(self) -> float | None:
        return keep_alive_seconds(self.keep_alive)


class ModelRequest(msgspec.Struct, kw_only=True):
    """show, pull, push, delete: `model` (older clients send `name`)."""

    model: str = ""
    name: str = ""
    verbose: bool = False
    stream: bool = True
    insecure: bool = False

    @property
    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise InvalidRequest("model is required.", param="model")
        return name


class CopyRequest(msgspec.Struct, kw_only=True):
    source: str
    destination: str


class CreateRequest(msgspec.Struct, kw_only=True):
    model: str = ""
    name: str = ""


class OllamaChatCompletion(ChatCompletionRequest, kw_only=True):
    """A chat request from /api/chat or /api/generate: OpenAI's, with Ollama's extra sampling knobs."""

    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0)] | None = None

    def sampling(self, defaults: Sampling) -> SamplingParams:
        return _with_knobs(super().sampling(defaults), self.top_k, self.min_p, self.repeat_penalty)


class OllamaCompletion(CompletionRequest, kw_only=True):
    """A raw /api/generate request (or one to a model without a chat template)."""

    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0)] | None = None

    def sampling(self, defaults: Sampling) -> SamplingParams:
        return _with_knobs(super().sampling(defaults), self.top_k, self.min_p, self.repeat_penalty)


def _with_knobs(
    sampling: SamplingParams, top_k: int | None, min_p: float | None, repeat_penalty: float | None
) -> SamplingParams:
    changes = {k: v for k, v in (("top_k", top_k), ("min_p", min_p), ("repeat_penalty", repeat_penalty)) if v is not None}
    return msgspec.structs.replace(sampling, **changes) if changes else sampling


_NO_IMAGES = "Images are not supported: the models this appliance serves read text only."


def response_format(fmt: Format) -> dict[str, Any] | None:
    """Ollama's `format` as OpenAI's response_format: "json" any JSON object, an object a JSON schema."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    raise InvalidRequest('format must be "json" or a JSON schema object.', param="format")


def _convert(fields: dict[str, Any], type_: type[Any]) -> Any:
    try:
        return msgspec.convert(fields, type=type_)
    except msgspec.ValidationError as exc:
        match = _OPENAI_PATH.search(str(exc))
        raise InvalidRequest(f"Invalid request: {exc}", param=match.group(1) if match else None) from None


# -- keep_alive ------------------------------------------------------------------------------------

MAX_KEEP_ALIVE_S = 10 * 365 * 86400.0
"""Longer is forever (a deadline that far out could not be written as a date)."""
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: KeepAlive) -> float | None:
    """Seconds to keep the model loaded after the request; None: not given; inf: forever (negative).

    A number is seconds; a string is a Go duration ("5m", "1h30m", "300ms") or a number of seconds.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        seconds = _parse_duration(value.strip())
    if math.isnan(seconds):
        raise InvalidRequest("keep_alive is not a number.", param="keep_alive")
    return math.inf if seconds < 0 or seconds > MAX_KEEP_ALIVE_S else seconds


def _parse_duration(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    total, pos = 0.0, 0
    while pos < len(body):
        part = _DURATION_PART.match(body, pos)
        if part is None:
            break
        total += float(part.group(1)) * _UNIT_S[part.group(2)]
        pos = part.end()
    if not body or pos != len(body):
        raise InvalidRequest(
            f'keep_alive {text!r} is not a duration: use seconds (300), a duration ("5m", "1h30m"), 0 or -1.',
            param="keep_alive",
        )
    return sign * total


# -- model names -----------------------------------------------------------------------------------


def lookup_names(name: str) -> list[str]:
    """The registry names an Ollama model name may mean: itself, then without the implicit `:latest` tag."""
    if name.endswith(LATEST) and len(name) > len(LATEST):
        return [name, name[: -len(LATEST)]]
    return [name]


def not_found_message(name: str) -> str:
    return (
        f'model "{name}" not found, try importing it first: '
        f"appliance models import <file.gguf> --id {lookup_names(name)[-1]}"
    )


def listed_name(model_id: str) -> str:
    """How Ollama lists a name: with its tag, `:latest` when it has none."""
    return model_id if ":" in model_id else model_id + LATEST


# -- responses -------------------------------------------------------------------------------------


class ModelDetails(msgspec.Struct):
    format: str
    family: str
    families: list[str] | None
    parameter_size: str
    """From the file name when it carries the usual size tag ("270m" -> "270M"), else empty."""
    quantization_level: str
    """From the GGUF file name when it carries llama.cpp's quantization tag ("Q4_K_M"), else empty."""
    parent_model: str = ""


class ListedModel(msgspec.Struct):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    """sha256 of the model file."""
    details: ModelDetails


class TagsResponse(msgspec.Struct):
    models: list[ListedModel]


class RunningModel(msgspec.Struct, kw_only=True):
    name: str
    model: str
    size: int
    """The memory estimate under models.max_memory, else the size of the files."""
    digest: str
    details: ModelDetails
    context_length: int | None
    expires_at: str | msgspec.UnsetType = msgspec.UNSET
    """When a keep_alive will unload it; absent: it stays loaded."""


class PsResponse(msgspec.Struct):
    models: list[RunningModel]


class ShowResponse(msgspec.Struct, kw_only=True):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str
    license: str = ""
    aliases: list[str] = []
    """Appliance extension: the other names the model answers to."""


class VersionResponse(msgspec.Struct):
    version: str
    appliance: str
    """Appliance extension: the appliance's own version."""


class StatusResponse(msgspec.Struct):
    status: str


class OllamaError(msgspec.Struct):
    error: str


class OutMessage(msgspec.Struct):
    content: str
    role: str = "assistant"
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET


class Counters(msgspec.Struct, kw_only=True):
    """The final object's statistics; durations in nanoseconds."""

    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


_Int = int | msgspec.UnsetType


class _AnswerLine(msgspec.Struct, kw_only=True):
    """What every line of a generate or chat answer has; the final line (`done`) adds the statistics."""

    model: str
    created_at: str
    done: bool
    done_reason: str | msgspec.UnsetType = msgspec.UNSET
    total_duration: _Int = msgspec.UNSET
    load_duration: _Int = msgspec.UNSET
    prompt_eval_count: _Int = msgspec.UNSET
    prompt_eval_duration: _Int = msgspec.UNSET
    eval_count: _Int = msgspec.UNSET
    eval_duration: _Int = msgspec.UNSET
    guardrails: list[Any] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension, on the final object: what the guardrails did (kinds and counts)."""
    pii_map: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    """Appliance extension, on the final object: the reversible mask map, when the tenant asks for one."""


class GenerateResponse(_AnswerLine, kw_only=True):
    """One line of a streamed /api/generate answer, or the whole answer."""

    response: str


class ChatResponse(_AnswerLine, kw_only=True):
    """One line of a streamed /api/chat answer, or the whole answer."""

    message: OutMessage


class EmbedResponse(msgspec.Struct, kw_only=True):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(msgspec.Struct):
    embedding: list[float]


def created_at(ts: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes it."""
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def tool_calls_out(calls: list[tuple[str, str]]) -> list[ToolCall]:
    """(name, arguments as JSON text) calls in Ollama's shape, whose arguments are an object
    (a call whose arguments are not an object, which the grammar rules out, gets {})."""
    out = []
    for name, arguments in calls:
        try:
            parsed = msgspec.json.decode(arguments or "{}")
        except msgspec.DecodeError:
            parsed = None
        out.append(ToolCall(function=ToolCallFunction(name=name, arguments=parsed if isinstance(parsed, dict) else {})))
    return out
