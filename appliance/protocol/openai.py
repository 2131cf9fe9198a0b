"""OpenAI wire types. Field names follow the OpenAI API; each request converts itself once.

Unknown fields are ignored (clients send many optional ones); fields we cannot honour with a
different value than the default are refused with a 400 naming the parameter.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from appliance.errors import InvalidRequest
from appliance.types import PRIORITY_BATCH, PRIORITY_INTERACTIVE, Sampling, SamplingParams, ToolGrammar

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=4)] | None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: Any = None


FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
MAX_TOOLS = 128


class FunctionDef(msgspec.Struct, kw_only=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """JSON schema of the arguments object; the call's arguments are generated under a grammar built from it."""
    strict: bool | None = None


class ToolDef(msgspec.Struct, kw_only=True):
    function: FunctionDef
    type: Literal["function"] = "function"


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    function: NamedFunction
    type: Literal["function"] = "function"


class FunctionCallIn(msgspec.Struct):
    name: str
    arguments: str = "{}"
    """The call's arguments as a JSON text (OpenAI's shape)."""


class ToolCallIn(msgspec.Struct, kw_only=True):
    id: str
    function: FunctionCallIn
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    """An assistant turn's calls, sent back in the history."""
    tool_call_id: str | None = None
    """A tool turn: the call it answers."""

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if isinstance(part, ImagePart):
                raise InvalidRequest(
                    "Image inputs are not supported by this model.", param=f"messages[{index}].content"
                )
            parts.append(part.text)
        return "".join(parts)


class JsonSchemaFormat(msgspec.Struct):
    name: str = "response"
    schema: dict[str, Any] = {}
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1
    """Choices from one prompt (computed once); at most MAX_N."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    user: str | None = None
    priority: Literal["interactive", "batch"] = "interactive"
    """Not in OpenAI's API: batch work waits behind interactive requests."""
    adapter: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    """Not in OpenAI's API: a LoRA adapter of the model to decode with (the same as model "MODEL:ADAPTER")."""
    speculation: bool | None = None
    """Not in OpenAI's API: draftless speculative decoding on or off for this request (None: the model's default)."""

    @property
    def priority_level(self) -> int:
        return PRIORITY_BATCH if self.priority == "batch" else PRIORITY_INTERACTIVE

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self, defaults: Sampling) -> SamplingParams:
        return SamplingParams(
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=defaults.top_k,
            min_p=defaults.min_p,
            repeat_penalty=defaults.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            # llama.cpp seeds are 32-bit; fold larger client seeds deterministically.
            seed=None if self.seed is None else self.seed % (2**32),
        )

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true.", param="stream_options")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDef], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    collection: str | None = None
    """Appliance extension: answer from this document collection, with citations."""
    collection_top_k: Annotated[int, msgspec.Meta(ge=1, le=20)] = 5
    answer_mode: Literal["generative", "extractive", "auto"] | None = None
    """Appliance extension, with `collection`: how the answer is made (default: retrieval.answer_mode)."""

    def question(self) -> str:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "user":
                return self.messages[i].text(i)
        raise InvalidRequest("A grounded chat needs a user message.", param="messages")

    def logprob_count(self) -> int | None:
        """None: no logprobs; k: each token's logprob with its k most likely alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
            raise InvalidRequest("response_format json_schema needs a json_schema object.", param="response_format")
        if self.tool_choice is not None and not self.tools:
            raise InvalidRequest("tool_choice is only allowed when tools are given.", param="tool_choice")
        if not self.tools:
            return
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise InvalidRequest("Each tool needs a different function name.", param="tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice names the function '{choice.function.name}', which is not among the tools.",
                param="tool_choice",
            )
        if rf is not None and rf.type != "text" and self.tool_choice != "none":
            raise InvalidRequest("tools cannot be combined with a JSON response_format.", param="response_format")
        if self.collection is not None:
            raise InvalidRequest("tools cannot be combined with a grounded chat (collection).", param="tools")
        for i, t in enumerate(self.tools):
            params = t.function.parameters
            if params is not None and params.get("type", "object") != "object":
                raise InvalidRequest(
                    "A function's parameters must be a JSON schema of type object.",
                    param=f"tools[{i}].function.parameters",
                )

    def active_tools(self) -> list[ToolDef]:
        """The tools the model may call for this request (none with tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function.name]
        return list(self.tools)

    def tool_grammar(self) -> ToolGrammar | None:
        """The engine-side constraint: each call's arguments follow its function's parameters schema."""
        tools = self.active_tools()
        if not tools:
            return None
        alternatives = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters or {"type": "object"},
                },
                "required": ["name", "arguments"],
            }
            for t in tools
        ]
        schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
        named = isinstance(self.tool_choice, NamedToolChoice)
        return ToolGrammar(
            call_schema=msgspec.json.encode(schema).decode(),
            required=named or self.tool_choice == "required",
            parallel=self.parallel_tool_calls and not named,
        )

    def json_schema(self) -> str | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object" or rf.json_schema is None:
            return "{}"
        return msgspec.json.encode(rf.json_schema.schema).decode()

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    max_tokens: MaxTokens | None = 16  # OpenAI's default for the legacy completions endpoint
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    """The legacy endpoint's shape: how many alternatives to report per token (0..5)."""

    def logprob_count(self) -> int | None:
        return self.logprobs

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise InvalidRequest("suffix (fill-in-the-middle) is not supported.", param="suffix")
        if self.best_of not in (None, 1):
            raise InvalidRequest("Only best_of=1 is supported.", param="best_of")

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | Annotated[list[str], msgspec.Meta(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        for i, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"input[{i}] is empty; every input must be a non-empty string.", param="input")
        return texts


# -- responses ---------------------------------------------------------------------------------


class UsageOut(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def decode_request(body: bytes, type_: type[Any]) -> Any:
    """Decode and validate a JSON body into a wire Struct; any problem is a 400 in OpenAI's shape."""
    if not body.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        # msgspec reports the failing location as "at `$.field`": surface it as `param`.
        match = _PATH_RE.search(str(exc))
        raise InvalidRequest(f"Invalid request: {exc}", param=match.group(1) if match else None) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
