"""Engine-neutral values. Wire types convert into these once; engines never see request bodies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

FinishReason = Literal["stop", "length"]
DEFAULT_TENANT = "default"
"""The tenant of open local mode (no keys yet) and of the CLI's document commands by default."""
PRIORITY_INTERACTIVE = 0
PRIORITY_BATCH = 1


class Sampling(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """A model's sampling defaults (its manifest's [sampling]), used when a request leaves a parameter out."""

    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.8
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.95
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 40
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


class ToolGrammar(msgspec.Struct, frozen=True, kw_only=True):
    """What tool calls the output may hold: each is TOOL_CALL_OPEN, a JSON object matching
    `call_schema` ({"name", "arguments"}), TOOL_CALL_CLOSE."""

    call_schema: str
    required: bool
    """True: the output is only calls; False ("auto"): calls, or text that does not start with one."""
    parallel: bool
    """More than one call allowed."""


class AdapterRef(msgspec.Struct, frozen=True):
    """A LoRA adapter a generation applies: its id and the path of its GGUF file."""

    id: str
    path: str


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    prompt: str
    prompt_ids: tuple[int, ...] | None = None
    """The prompt already tokenised by this model's tokenizer (the service does it once, off the loop)."""
    max_tokens: int | None
    """None: generate until a stop condition or the end of the context."""
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = SamplingParams()
    json_schema: str | None = None
    """JSON schema the output must follow (response_format); "{}" means any JSON object."""
    tools: ToolGrammar | None = None
    """Tool calls the output may (or must) make; exclusive with json_schema."""
    n: int = 1
    """Sequences to generate from the one prompt (its prefill is computed once and copied)."""
    logprobs: int | None = None
    """None: no log-probabilities; k: each token's, with the k most likely alternatives (0..20)."""
    priority: int = PRIORITY_INTERACTIVE
    """Lower runs first; equal priorities keep arrival order."""
    adapter: AdapterRef | None = None
    """The LoRA adapter to decode with; None: the base model."""
    speculate: bool = False
    """Guess tokens by prompt lookup while decoding, when the engine speculates at all (`spec_draft` > 0)."""


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TokenAlternative(msgspec.Struct, frozen=True, array_like=True):
    token: bytes
    """The token's text as UTF-8 bytes (a token can hold part of a character)."""
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """A generated token's log-probability under the model (log-softmax of its logits) and the most
    likely alternatives at that position."""

    token: bytes
    logprob: float
    top: tuple[TokenAlternative, ...] = ()


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of generated text. A generation's last chunk has usage; with n > 1 sequences each
    sequence's last chunk has its finish_reason, and only the very last one the usage of them all."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    generated: int = 0
    """Tokens generated so far, this chunk's included (0 when the engine does not count); with n > 1,
    by all the sequences together."""
    index: int = 0
    """Which of the n sequences this chunk belongs to."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """With GenerationRequest.logprobs: one entry per token generated since the previous chunk."""


class RpcStatus(msgspec.Struct, kw_only=True):
    """A split model's link to its RPC workers."""

    state: str
    """loading, ready, down or closed."""
    peers: list[str]
    devices: list[dict[str, Any]]
    loads: int
    error: str | None


class EngineStats(msgspec.Struct, kw_only=True):
    """A generative engine's counters, from its scheduler to /health and /metrics. Every field has a
    value, so a split model whose workers were never reached reports zeros, not missing keys."""

    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: dict[str, int] = msgspec.field(default_factory=dict)
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_cache_hit_rate: float = 0.0
    generated_tokens: int = 0
    mean_batch_tokens: float = 0.0
    ttft_p50_s: float | None = None
    queue_depth: int = 0
    busy_slots: int = 0
    drafted_tokens: int = 0
    """Tokens guessed by prompt lookup and decoded for verification (speculative decoding)."""
    accepted_tokens: int = 0
    """Of those, the ones the model agreed with: each saved a decode step."""
    rpc: RpcStatus | None = None
    """Split models only."""


class Embeddings(msgspec.Struct, frozen=True, kw_only=True):
    vectors: list[list[float]]
    prompt_tokens: int


Role = Literal["admin", "user"]


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling: resolved once from the API key (or the cluster signature) at the edge."""

    tenant: str
    key_id: str | None
    """The key's public id (its visible prefix); None in open local mode, where no keys exist yet."""
    role: Role
    forwarded_by: str | None = None
    """Name of the peer appliance that forwarded this request on the caller's behalf."""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class SearchFilter(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which chunks a search may return (all given conditions hold)."""

    document_id: str | list[str] | None = None
    source: str | None = None
    page_from: int | None = None
    page_to: int | None = None
    metadata: dict[str, str | int | float | bool] = {}
