"""llama.cpp through llama-cpp-python's low-level API. The only module that imports llama_cpp.

`LlamaBatchContext` owns one model and one context with `n_seq_max` sequences; the scheduler
(engines/scheduler.py) drives it from a single thread. Nothing here is thread-safe on purpose.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _ggml

from appliance.errors import EngineError, InvalidRequest
from appliance.types import (
    TOOL_CALL_CLOSE,
    AdapterRef,
    TOOL_CALL_OPEN,
    SamplingParams,
    TokenAlternative,
    TokenLogprob,
    ToolGrammar,
)

log = logging.getLogger(__name__)

# ggml_backend_dev_type: CPU = 0, GPU = 1, IGPU = 2, ACCEL = 3.
_GPU_DEVICE_TYPES = (1, 2)
_PENALTY_LAST_N = 64
# llama_flash_attn_type: AUTO -1 (used where every layer's device supports it: llama-server's default), OFF 0
# (llama-cpp-python's Llama default), ON 1.
FLASH_ATTN_TYPES = {"auto": -1, "off": 0, "on": 1}


class LlamaLogLines:
    """llama.cpp's and ggml's log callback: each line as one record on a Python logger.

    llama.cpp calls it with pieces of text: a line may arrive in several calls, and level CONT (5)
    continues the previous one. Pieces are buffered per thread up to the newline. llama.cpp's INFO and
    DEBUG lines (model metadata, tensor lists: over a thousand per load) are DEBUG records here; WARN and
    ERROR stay warnings and errors.
    """

    # ggml_log_level in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (llama_cpp/_logger.py
    # still lists an older order).
    _LEVELS = {3: logging.WARNING, 4: logging.ERROR}
    _CONT = 5

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._pending = threading.local()

    def __call__(self, level: int, text: bytes | None, user_data: object = None) -> None:
        state = self._pending
        held: bytes = getattr(state, "text", b"")
        if level != self._CONT:
            new_level = self._LEVELS.get(level, logging.DEBUG)
            if held and new_level != getattr(state, "level", new_level):  # an unfinished line of another level
                self._emit(state.level, held)
                held = b""
            state.level = new_level
        elif not hasattr(state, "level"):
            state.level = logging.DEBUG
        *lines, state.text = (held + (text or b"")).split(b"\n")
        for line in lines:
            self._emit(state.level, line)

    def _emit(self, level: int, line: bytes) -> None:
        if line.strip() and self._log.isEnabledFor(level):
            self._log.log(level, "%s", line.decode("utf-8", "replace").rstrip())


# llama-cpp-python's own callback prints every line to stderr; replacing it sends them to the server's
# log. llama_log_set also sets ggml's (one libggml-base in the process). The callback object must live
# as long as the library may call it.
_log_callback = llama_cpp.llama_log_callback(LlamaLogLines(logging.getLogger("llama_cpp")))
llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def ggml_library() -> ctypes.CDLL:
    """A new handle on libllama: its ggml_* symbols resolve to the libggml that libllama itself uses.

    llama_cpp._ggml.libggml is `llama_cpp/lib/libggml.so` while libllama loads `libggml.so.0`: in an
    installed wheel they are two files (copies, not links), so the process holds two libggml with two
    backend registries, and what is registered in _ggml's copy is invisible to llama.cpp.
    """
    return ctypes.CDLL(llama_cpp.llama_cpp._lib._name)


_ggml_lib = ggml_library()


def load_backends() -> None:
    """Load ggml's backend modules from llama_cpp/lib when this build has them as modules.

    The portable release build (packaging/build-portable-llama.sh: GGML_BACKEND_DL with
    GGML_CPU_ALL_VARIANTS) links no backend into libggml: the CPU backend is one module per instruction
    set (libggml-cpu-<variant>.so) and RPC is libggml-rpc.so. ggml_backend_load_all(), which llama.cpp
    calls by itself, looks for them only next to the executable (python, or the frozen binary) and in
    the current directory, never in llama_cpp/lib. Loading them from there picks the best variant this
    CPU can run. A native build registers its backends statically: then this does nothing.
    """
    lib = _ggml_lib
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_count.argtypes = []
    if lib.ggml_backend_reg_count() == 0:
        lib.ggml_backend_load_all_from_path.restype = None
        lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        lib.ggml_backend_load_all_from_path(os.fsencode(_ggml.libggml_base_path))
        if lib.ggml_backend_reg_count() == 0:
            raise EngineError(f"llama.cpp found no backend (libggml-cpu*.so) in {_ggml.libggml_base_path}")


load_backends()


def gpu_offload_supported() -> bool:
    """True when a GPU device is registered with ggml.

    `llama_supports_gpu_offload()` alone is not enough: it also answers true for an RPC-enabled
    CPU-only build, which would then "offload" to nothing.
    """
    if not llama_cpp.llama_supports_gpu_offload():
        return False
    lib = _ggml_lib
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    return any(lib.ggml_backend_dev_by_type(t) for t in _GPU_DEVICE_TYPES)


def system_info() -> str:
    """What this llama.cpp build was compiled for: `CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | ...` and one
    section per other backend (CUDA, ...). `appliance doctor` asks it in a child process, because a
    build for instructions this CPU lacks dies with SIGILL."""
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def resolve_gpu_layers(preference: str | int, gpu: str) -> int:
    """`auto` offloads every layer when llama.cpp has a GPU device, none otherwise."""
    if gpu == "off":
        return 0
    if preference == "auto":
        return -1 if gpu_offload_supported() else 0
    return int(preference)


def tokenize(vocab: object, text: str) -> list[int]:
    """Token ids of `text` with special tokens parsed and BOS added, as the model expects a prompt."""
    data = text.encode("utf-8")
    capacity = len(data) + 8
    buf = (llama_cpp.llama_token * capacity)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, capacity, True, True)
    if n < 0:
        capacity = -n
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, capacity, True, True)
    return list(buf[:n])


class Sampler:
    """One sequence's llama.cpp sampler chain (penalties, grammar, top-k/p, min-p, temperature, seed)."""

    def __init__(self, vocab: object, params: SamplingParams, seed: int, grammar: str | None) -> None:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        self._chain = llama_cpp.llama_sampler_chain_init(chain_params)
        add = lambda s: llama_cpp.llama_sampler_chain_add(self._chain, s)  # noqa: E731
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            # The binding declares an extra leading n_vocab argument that current llama.cpp no longer
            # has; passing last_n twice is right under either signature.
            add(
                llama_cpp.llama_sampler_init_penalties(
                    _PENALTY_LAST_N,
                    _PENALTY_LAST_N,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if grammar is not None:
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not sampler:
                self.close()
                raise InvalidRequest("The output grammar (response_format or tools) could not be compiled.")
            add(sampler)
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))

    def sample(self, ctx: object, batch_index: int) -> int:
        """Sample from the logits of one row of the last decode; llama.cpp accepts the token itself."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


class LlamaBatchContext:
    """A model plus a context shared by `n_seq_max` sequences, one KV stream per sequence."""

    def __init__(
        self,
        model_path: Path,
        *,
        model_id: str,
        n_ctx_per_seq: int,
        n_seq_max: int,
        n_batch: int,
        n_threads: int,
        gpu_layers: int,
        devices: Sequence[int] = (),
        tensor_split: Sequence[float] | None = None,
        flash_attn: str = "auto",
    ) -> None:
        """`devices`: ggml device handles to offload to (RPC workers' devices, engines/rpc.py), in
        order; empty lets llama.cpp pick every GPU. `tensor_split`: share of the offloaded layers per device.
        `flash_attn`: auto, on or off (off whenever `devices` are given: RPC splits run without it)."""
        self.model_id = model_id
        self.n_seq_max = n_seq_max
        self.n_batch = n_batch
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0x7FFFFFFF if gpu_layers < 0 else gpu_layers
        if devices:
            # NULL-terminated; llama.cpp copies the list and the split while loading.
            self._devices = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        if tensor_split:
            self._split = (ctypes.c_float * llama_cpp.llama_max_devices())(*tensor_split)
            mparams.tensor_split = self._split
        log.info(
            "loading %s from %s (n_ctx=%d x %d sequences, n_gpu_layers=%d, threads=%d)",
            model_id, model_path, n_ctx_per_seq, n_seq_max, gpu_layers, n_threads,
        )
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise EngineError(f"model {model_id} failed to load from {model_path}")
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self.n_ctx_per_seq = min(n_ctx_per_seq, self.n_ctx_train)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_per_seq * n_seq_max
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.kv_unified = False  # one stream per sequence: attention only over its own cells
        cparams.swa_full = True  # keep sliding-window layers whole so cached prefixes stay reusable
        cparams.no_perf = True
        cparams.flash_attn_type = FLASH_ATTN_TYPES["off" if devices else flash_attn]
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineError(f"model {model_id}: could not create a context (out of memory?)")
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self._adapters: dict[str, Any] = {}  # llama.cpp frees them with the model
        where = "RPC" if devices else "GPU" if gpu_layers != 0 and gpu_offload_supported() else "CPU"
        log.info("loaded %s: %d sequences x %d tokens, offload=%s", model_id, n_seq_max, self.n_ctx_per_seq, where)

    # -- text ----------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.vocab, text)

    def piece(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, True)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, big, len(big), 0, True)
            return big.raw[:n]
        return self._piece.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def sampler(self, params: SamplingParams, seed: int, grammar: str | None) -> Sampler:
        return Sampler(self.vocab, params, seed, grammar)

    def compile_schema(self, schema: str) -> str:
        """GBNF for a JSON schema (llama-cpp-python's converter); "{}" gives any JSON object."""
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        if schema.strip() in ("", "{}"):
            return JSON_GBNF
        try:
            return json_schema_to_gbnf(schema)
        except Exception as exc:  # the converter raises plain exceptions on unsupported schemas
            raise InvalidRequest(f"Unsupported JSON schema: {exc}", param="response_format") from None

    def compile_tools(self, tools: ToolGrammar) -> str:
        """GBNF for tool calls: TOOL_CALL_OPEN, a JSON call object, TOOL_CALL_CLOSE (repeated when parallel);
        with required=False, free text that does not start with '<' is the other choice."""
        return tools_gbnf(tools)

    def sample(self, sampler: Sampler, batch_index: int) -> int:
        return sampler.sample(self._ctx, batch_index)

    # -- compute -------------------------------------------------------------------------------

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over (token, position, sequence, wants_logits) entries."""
        b = self._batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise EngineError(f"llama_decode failed on {self.model_id} (code {rc})")

    def load_adapter(self, adapter: AdapterRef) -> None:
        """Load a LoRA adapter's file onto the model, once; it stays loaded with the model (llama.cpp
        frees it with the model). Raises InvalidRequest when llama.cpp refuses the file."""
        if adapter.id in self._adapters:
            return
        handle = llama_cpp.llama_adapter_lora_init(self._model, adapter.path.encode())
        if not handle:
            raise InvalidRequest(f"The adapter '{adapter.id}' could not be loaded onto model {self.model_id}.",
                                 param="adapter")
        self._adapters[adapter.id] = handle
        log.info("model %s: loaded LoRA adapter %s", self.model_id, adapter.id)

    def use_adapter(self, adapter: AdapterRef | None) -> None:
        """Decode the next batches with this (loaded) LoRA adapter; None: the base model. llama.cpp
        applies adapters to the whole context, so the scheduler decodes each adapter's sequences apart."""
        if adapter is None:
            rc = llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            self.load_adapter(adapter)
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[adapter.id])
            rc = llama_cpp.llama_set_adapters_lora(self._ctx, handles, 1, (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise EngineError(f"model {self.model_id}: llama.cpp refused to set adapter {adapter} (code {rc})")

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self._mem, seq, p0, p1))

    def seq_cp(self, src: int, dst: int) -> None:
        """Give sequence `dst` a copy of `src`'s KV cells (n > 1: the prompt is computed once)."""
        llama_cpp.llama_memory_seq_rm(self._mem, dst, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def logprob(self, batch_index: int, token: int, top: int) -> TokenLogprob:
        """`token`'s log-probability in one row of the last decode (log-softmax of the raw logits,
        before temperature, penalties or grammar), and the `top` most likely tokens there."""
        n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, batch_index), shape=(n_vocab,))
        logits = logits.astype(np.float64)
        peak = logits.max()
        norm = peak + np.log(np.exp(logits - peak).sum())
        best: list[TokenAlternative] = []
        if top > 0:
            ids = np.argpartition(-logits, top - 1)[:top]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = [TokenAlternative(self.piece(int(i)), float(logits[i] - norm)) for i in ids]
        return TokenLogprob(self.piece(token), float(logits[token] - norm), tuple(best))

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None


class LlamaTokenizer:
    """A model's vocabulary alone (no weights): tokenizes in a process that does not run the model."""

    def __init__(self, model_path: Path) -> None:
        mparams = llama_cpp.llama_model_default_params()
        mparams.vocab_only = True
        mparams.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise EngineError(f"could not read the vocabulary of {model_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.vocab, text)

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


def tools_gbnf(tools: ToolGrammar) -> str:
    """The tool-call grammar (see LlamaBatchContext.compile_tools). Raises InvalidRequest (param
    `tools`) when a function's parameters cannot be turned into a grammar."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        call = json_schema_to_gbnf(tools.call_schema)
    except Exception as exc:  # the converter raises plain exceptions on unsupported schemas
        raise InvalidRequest(f"A tool's parameters cannot be turned into a grammar: {exc}", param="tools") from None
    lines = [
        ("tc-call ::= " + line[len("root ::= "):]) if line.startswith("root ::= ") else line
        for line in call.splitlines()
    ]
    one = f'"{_gbnf_literal(TOOL_CALL_OPEN)}" tc-ws tc-call tc-ws "{_gbnf_literal(TOOL_CALL_CLOSE)}"'
    calls = f"{one} (tc-ws {one})*" if tools.parallel else one
    root = "tc-calls" if tools.required else "tc-calls | tc-text"
    rules = [f"root ::= {root}", f"tc-calls ::= {calls} tc-ws", "tc-ws ::= [ \\n]?"]
    if not tools.required:
        # text may not open with '<', so a call is the only way to start with the opener
        rules.append("tc-text ::= [^<] [^\\x00]*")
    return "\n".join([*rules, *lines]) + "\n"


def _gbnf_literal(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
