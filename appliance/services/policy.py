"""What a use case asks of the gateway while it runs, without knowing about HTTP or keys.

The API edge hands each service call a `RequestPolicy` (the gateway's per-request context); the
CLI and tests use `OPEN_POLICY`, which allows everything.
"""

from __future__ import annotations

from typing import Protocol

from appliance.modelstore.manifest import Manifest
from appliance.policy.experiments import ShadowRecord
from appliance.types import Chunk


class OutputFilter(Protocol):
    """Rewrites generated text as it streams (PII masking); `flush` releases what it held back."""

    def feed(self, text: str) -> str: ...

    def flush(self) -> str: ...


class RequestPolicy(Protocol):
    def allow_model(self, manifest: Manifest) -> None:
        """Raise if the caller may not use this model."""

    @property
    def default_adapter(self) -> str | None:
        """The LoRA adapter the caller's requests use when they name none (applied to its base model only)."""

    def reserve(self, manifest: Manifest, prompt_tokens: int, max_tokens: int) -> None:
        """Charge rate limits and reserve budget for prompt + max_tokens (0 for embeddings), or raise 429."""

    def screen_retrieved(self, texts: list[str]) -> list[int]:
        """Indices of retrieved chunks that may reach the prompt (injection guardrail)."""

    def screen_tool_results(self, texts: list[str], call_ids: list[str], indices: list[int]) -> list[int]:
        """Indices of tool results (role "tool" messages at `indices` of the request, answering `call_ids`)
        that may reach the prompt as they are: the injection guardrail screens them as retrieved content."""

    def on_chunk(self, chunk: Chunk) -> None:
        """Sees every generated chunk (token counts, time to first token; the last one carries usage)."""

    def screen_input(self, texts: list[str], *, instructions: bool = True) -> list[str]:
        """The texts to use (PII masked by policy), or raise when the policy blocks them.

        `instructions=False` marks data (embeddings input, system prompts): no injection check there.
        """

    def cap_max_tokens(self, requested: int | None) -> int | None:
        """The max_tokens to run with: the request's, lowered to the tenant's cap."""

    def output_filter(self, *, audit: bool = True) -> OutputFilter | None:
        """A filter for this request's generated text, or None. `audit=False`: text the client never gets
        (a shadow copy's answer, masked before it is stored), left out of the request's guardrail record."""

    def served_from_cache(self) -> None:
        """The answer came from the response cache: no model ran, no tokens are billed."""

    def count_retrieved(self, chunks: int) -> None:
        """Chunks retrieved for this request (search results, sources of a grounded answer)."""

    def hold_record(self) -> None:
        """A grounded answer: keep the usage record open until the response's last message."""

    def note_grounding(self, grounded: bool) -> None:
        """Whether the answer's citations checked out (an ungrounded answer is flagged in the audit trail)."""

    def note_route(self, route: str, hops: list[tuple[str, str]], path: str, variant: str | None = None) -> None:
        """A routed model id was resolved: each (model, outcome) tried, the path as one line, and the split
        variant the request was given (None: no split)."""

    def affinity(self) -> tuple[str, str | None]:
        """What keeps a caller on one split variant: (the API key id, else the tenant; the client's
        X-Conversation-Id, or None)."""

    def note_shadow(self, record: ShadowRecord) -> None:
        """A shadow model's answer to a copy of this request (after the response ended; a blocking write)."""


class OpenPolicy:
    """Allows everything and records nothing: the CLI's and the tests' policy, and a base for policies that
    change a few answers (a shadow copy's)."""

    default_adapter = None

    def allow_model(self, manifest: Manifest) -> None:
        return None

    def reserve(self, manifest: Manifest, prompt_tokens: int, max_tokens: int) -> None:
        return None

    def screen_retrieved(self, texts: list[str]) -> list[int]:
        return list(range(len(texts)))

    def screen_tool_results(self, texts: list[str], call_ids: list[str], indices: list[int]) -> list[int]:
        return list(range(len(texts)))

    def on_chunk(self, chunk: Chunk) -> None:
        return None

    def screen_input(self, texts: list[str], *, instructions: bool = True) -> list[str]:
        return texts

    def cap_max_tokens(self, requested: int | None) -> int | None:
        return requested

    def output_filter(self, *, audit: bool = True) -> OutputFilter | None:
        return None

    def served_from_cache(self) -> None:
        return None

    def count_retrieved(self, chunks: int) -> None:
        return None

    def hold_record(self) -> None:
        return None

    def note_grounding(self, grounded: bool) -> None:
        return None

    def note_route(self, route: str, hops: list[tuple[str, str]], path: str, variant: str | None = None) -> None:
        return None

    def affinity(self) -> tuple[str, str | None]:
        return "", None

    def note_shadow(self, record: ShadowRecord) -> None:
        return None


OPEN_POLICY: RequestPolicy = OpenPolicy()
