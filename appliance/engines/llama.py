"""GGUF text generation on llama-cpp-python. The only module that imports llama_cpp (RPC aside)."""

from __future__ import annotations

import codecs
import ctypes
import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
from llama_cpp import _ggml

from appliance.engines.stops import StopMatcher
from appliance.errors import ContextLengthExceeded, EngineError
from appliance.types import Chunk, GenerationRequest, Usage

log = logging.getLogger(__name__)


# ggml_backend_dev_type: CPU = 0, GPU = 1, IGPU = 2, ACCEL = 3.
_GPU_DEVICE_TYPES = (1, 2)


def gpu_offload_supported() -> bool:
    """True when a GPU device is registered with ggml.

    `llama_supports_gpu_offload()` alone is not enough: it also answers true for an RPC-enabled
    CPU-only build, which would then "offload" to nothing.
    """
    if not llama_cpp.llama_supports_gpu_offload():
        return False
    lib = _ggml.libggml
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    return any(lib.ggml_backend_dev_by_type(t) for t in _GPU_DEVICE_TYPES)


def resolve_gpu_layers(preference: str | int, gpu: str) -> int:
    """`auto` offloads every layer when llama.cpp was built with a GPU backend, none otherwise."""
    if gpu == "off":
        return 0
    if preference == "auto":
        return -1 if gpu_offload_supported() else 0
    return int(preference)


class LlamaChatEngine:
    """One llama.cpp context. A context is not thread-safe: one generation runs at a time (the lock)."""

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int,
        n_threads: int | None,
        gpu_layers: int,
        model_id: str,
    ) -> None:
        self.model_id = model_id
        self._lock = threading.Lock()
        log.info("loading %s from %s (n_ctx=%d, n_gpu_layers=%d)", model_id, model_path, n_ctx, gpu_layers)
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=gpu_layers,
                verbose=False,
            )
        except Exception as exc:  # llama_cpp raises ValueError/RuntimeError with native details
            raise EngineError(f"model {model_id} failed to load: {exc}") from exc
        self.n_ctx = self._llm.n_ctx()
        where = "GPU" if gpu_layers != 0 and gpu_offload_supported() else "CPU"
        log.info("loaded %s: n_ctx=%d, offload=%s", model_id, self.n_ctx, where)

    def tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        """Yield text chunks; the last chunk carries finish_reason and exact token usage.

        Runs in a worker thread. Setting `cancel` stops the generation at the next token.
        """
        prompt = self.tokenize(request.prompt)
        if len(prompt) >= self.n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.n_ctx} tokens, but the prompt has "
                f"{len(prompt)} tokens.",
                param="messages",
            )
        room = self.n_ctx - len(prompt)
        budget = room if request.max_tokens is None else min(request.max_tokens, room)
        s = request.sampling
        with self._lock:
            # Always evaluate the prompt from a clean context: llama.cpp's logits depend slightly on
            # how the prompt was split into batches, so reusing a cached prefix would make seeded
            # and greedy output depend on the previous request. Prefix caching belongs to the
            # batching scheduler, which controls the split.
            self._llm.reset()
            self._llm.set_seed(s.seed if s.seed is not None else random.getrandbits(31))
            yield from self._run(prompt, budget, request, cancel)

    def _run(
        self, prompt: list[int], budget: int, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[Chunk]:
        s = request.sampling
        llm = self._llm
        vocab = llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(request.stop)
        generated = 0
        finish: str = "length"
        stopped_by_text = False
        try:
            tokens = llm.generate(
                prompt,
                top_k=s.top_k,
                top_p=s.top_p,
                min_p=s.min_p,
                temp=s.temperature,
                repeat_penalty=s.repeat_penalty,
                frequency_penalty=s.frequency_penalty,
                presence_penalty=s.presence_penalty,
            )
            for token in tokens:
                if cancel.is_set() or generated >= budget:
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                generated += 1
                text, hit = stops.feed(decoder.decode(llm.detokenize([token], special=True)))
                if text:
                    yield Chunk(text=text)
                if hit:
                    finish, stopped_by_text = "stop", True
                    break
        except ContextLengthExceeded:
            raise
        except Exception as exc:
            log.exception("generation failed on %s", self.model_id)
            raise EngineError(f"generation failed on model {self.model_id}") from exc
        tail = ""
        if not stopped_by_text:
            # Text held back as a possible stop-string prefix was not one: release it.
            tail, hit = stops.feed(decoder.decode(b"", final=True))
            if not hit:
                tail += stops.flush()
        yield Chunk(
            text=tail,
            finish_reason=finish,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=generated),
        )
