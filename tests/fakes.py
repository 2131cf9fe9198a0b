"""Fakes that record what reached them: the API tests run the real ASGI app without native models."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import msgspec

from appliance.errors import ContextLengthExceeded, EngineError
from appliance.modelstore.manifest import Manifest, ModelFile
from appliance.types import (
    Chunk,
    Embeddings,
    EngineStats,
    GenerationRequest,
    TokenAlternative,
    TokenLogprob,
    Usage,
)

GEMMA_TEMPLATE = (
    "{%- for m in messages -%}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<assistant>{%- endif -%}"
)


def manifest(model_id: str, kind: str = "chat", **kw: object) -> Manifest:
    fmt = "onnx" if kind in ("embedding", "classifier") else "gguf"
    return Manifest(
        id=model_id,
        kind=kind,  # type: ignore[arg-type]
        format=fmt,  # type: ignore[arg-type]
        file=ModelFile(name="model.bin", sha256="0" * 64, size=1),
        chat_template=GEMMA_TEMPLATE if kind == "chat" else None,
        embedding_dim=4 if kind == "embedding" else None,
        **kw,  # type: ignore[arg-type]
    )


class FakeChatEngine:
    """Echoes the words of a fixed reply one chunk per word; records every request."""

    def __init__(self, model_id: str, reply: str = "Hello from the fake engine.", n_ctx: int = 64) -> None:
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.reply = reply
        self.requests: list[GenerationRequest] = []
        self.cancelled = threading.Event()
        self.delay_s = 0.0
        self.fail_after: int | None = None
        self.closed = threading.Event()
        """Set by close(): the registry unloaded this engine."""

    failure: str | None = None

    def tokenize(self, text: str) -> list[int]:
        """One token per word, as the rest of this fake counts."""
        return list(range(len(text.split())))

    def engine_stats(self) -> EngineStats:
        return EngineStats(requests=len(self.requests))

    def submit(self, request: GenerationRequest, emit: Callable[[object], None], cancel: threading.Event) -> None:
        self.requests.append(request)
        prompt_tokens = len(request.prompt_ids) if request.prompt_ids is not None else len(request.prompt.split())
        if prompt_tokens >= self.n_ctx:
            raise ContextLengthExceeded(f"prompt has {prompt_tokens} tokens", param="messages")

        def run() -> None:
            try:
                for chunk in self._generate(request, cancel, prompt_tokens):
                    emit(chunk)
            except Exception:
                emit(EngineError("generation failed on the fake model"))

        threading.Thread(target=run, daemon=True).start()

    def close(self) -> None:
        self.closed.set()

    def _generate(self, request: GenerationRequest, cancel: threading.Event, prompt_tokens: int) -> Iterator[Chunk]:
        """n > 1: the sequences one after another, the usage of all on the last one's final chunk."""
        total = 0
        for index in range(request.n):
            for chunk in self._sequence(request, cancel, prompt_tokens):
                if chunk.usage is not None:
                    total += chunk.usage.completion_tokens
                    last = index == request.n - 1
                    chunk = msgspec.structs.replace(
                        chunk, usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=total) if last else None
                    )
                yield msgspec.structs.replace(chunk, index=index)

    def _sequence(self, request: GenerationRequest, cancel: threading.Event, prompt_tokens: int) -> Iterator[Chunk]:
        words = self.reply.split(" ")
        budget = request.max_tokens or len(words)
        sent = 0
        for i, word in enumerate(words[:budget]):
            if cancel.is_set():
                self.cancelled.set()
                return
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("native engine exploded with secret details")
            if self.closed.is_set():  # a real engine's memory is gone: this must never happen mid-request
                raise RuntimeError("the engine was closed while generating")
            time.sleep(self.delay_s)
            sent += 1
            text = word if i == 0 else " " + word
            logprobs = () if request.logprobs is None else (
                TokenLogprob(text.encode(), -0.5, tuple(TokenAlternative(f"alt{k}".encode(), -1.0 - k)
                                                        for k in range(request.logprobs))),)
            yield Chunk(text=text, logprobs=logprobs)
        finish = "length" if budget < len(words) else "stop"
        yield Chunk(text="", finish_reason=finish, usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=sent))


class FakeEmbeddingEngine:
    max_length = 256
    failure: str | None = None

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.calls: list[list[str]] = []
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()

    def embed(self, texts: list[str]) -> Embeddings:
        if self.closed.is_set():
            raise RuntimeError("the engine was closed before embedding")
        self.calls.append(texts)
        return Embeddings(vectors=[[1.0, 0.0, 0.0, 0.0] for _ in texts], prompt_tokens=sum(self.count_tokens(texts)))

    def count_tokens(self, texts: list[str], *, special: bool = True) -> list[int]:
        """One token per word, special tokens or not (this fake has none)."""
        return [len(t.split()) for t in texts]

    def engine_stats(self) -> None:
        return None
