"""How much memory a model takes once loaded, and how much all loaded models may take (`models.max_memory`).

Estimates, not measurements: the registry must decide before loading whether a model fits, and the
figures below were calibrated against the resident memory (VmRSS) of the bundled models on a 2-core
x86-64 Linux machine (see README, "Several models in bounded memory").
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import msgspec

from appliance.engines.gguf_info import GgufInfo, read_gguf_header
from appliance.errors import ModelStoreError
from appliance.modelstore.manifest import Manifest
from appliance.settings import MemoryLimit, ModelSettings, parse_max_memory

log = logging.getLogger(__name__)

__all__ = [
    "MemoryEstimate",
    "MemoryLimit",
    "estimate_model_memory",
    "estimate_models",
    "format_bytes",
    "max_memory_bytes",
    "parse_max_memory",
    "release_freed_memory",
    "system_memory_bytes",
]

MIB = 1 << 20
KV_BYTES_PER_VALUE = 2
"""The KV cache is f16: llama.cpp's default cache type, which engines/llama.py keeps."""

# Calibrated against VmRSS of the bundled models (2-core x86-64, Debian 12, llama-cpp-python 0.3.36,
# onnxruntime 1.31). Gemma 3 270M Q4_K_M, 8 x 4096 tokens: 880 MiB after load, 922 MiB after eight
# 400-token prompts, 986 MiB with ~4,000-token contexts; estimated 993 MiB. 1 x 2048 tokens: 360 MiB
# measured, 407 estimated; 4 x 1024: 408 and 433. The estimate errs high by up to ~50 MiB.
GGUF_FIXED_OVERHEAD = 96 * MIB
"""Per context, beyond weights and KV cache: graph metadata, the tokenizer's caches, thread pools."""
GGUF_LOGITS_BYTES_PER_SLOT_AND_TOKEN = 8
"""f32 logits of one vocabulary row per sequence slot, and the sampler's candidate copy of it."""
GGUF_ATTENTION_BYTES = 8
"""KQ and its softmax (f32, two tensors) of one head over a full batch against a full context: the part
of the compute buffer that grows with n_ctx. llama.cpp reserves the whole worst-case compute buffer
(514 MiB for Gemma 3 270M) but the pages a CPU run touches follow this."""

# all-MiniLM-L6-v2 int8 (22 MB file): 160 MiB after the session is created, then onnxruntime's arena keeps
# its peak: 188 MiB after 1 x 252 tokens, 435 MiB after 8, 1352 MiB after 32 (the default batch), 523 MiB
# after 32 x 122 tokens. Per sequence of s tokens that is ~41.8 KB x s + ~453 B x s^2 (attention).
ONNX_FIXED_OVERHEAD = 138 * MIB
"""onnxruntime session, its initial arena and the tokenizer, beyond the weights (MiniLM: 160 MiB - 22 MB)."""
ONNX_REFERENCE_BYTES = 22_928_619
"""Size of the file the activation figures were measured on (all-MiniLM-L6-v2 int8)."""
ONNX_BYTES_PER_TOKEN = 41_800
ONNX_BYTES_PER_TOKEN_SQUARED = 453


class MemoryEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """Resident bytes a model needs when loaded with the current settings."""

    model_id: str
    weights: int
    kv_cache: int
    overhead: int
    total: int
    detail: str = ""
    """How the KV cache or the buffers were sized, for the operator."""

    def explain(self) -> str:
        kv = f" + {format_bytes(self.kv_cache)} KV cache ({self.detail})" if self.kv_cache else ""
        buffers = f" ({self.detail})" if self.detail and not self.kv_cache else ""
        return (
            f"{self.model_id}: {format_bytes(self.weights)} weights{kv} + {format_bytes(self.overhead)} buffers"
            f"{buffers} = {format_bytes(self.total)}"
        )


def format_bytes(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / MIB:.0f} MiB"


def estimate_model_memory(manifest: Manifest, model_dir: Path, models: ModelSettings) -> MemoryEstimate:
    """The memory `manifest`'s engine will hold (weights, KV cache, buffers) under `models` settings.

    Reads the GGUF header (not the weights) for the attention shape; a missing or unreadable file
    raises ModelStoreError.
    """
    path = model_dir / manifest.file.name
    try:
        weights = path.stat().st_size
    except OSError as exc:
        raise ModelStoreError(f"{manifest.id}: cannot read {path}: {exc.strerror}") from None
    if manifest.format == "gguf":
        return _estimate_gguf(manifest, read_gguf_header(path), weights, models)
    return _estimate_onnx(manifest, weights, models)


def _estimate_gguf(manifest: Manifest, info: GgufInfo, weights: int, models: ModelSettings) -> MemoryEstimate:
    # The same context the factory asks for (engines/factory.py): n_ctx capped by the manifest's and
    # the file's trained context, times `parallel` sequences, each with its own KV stream.
    n_ctx = min(models.n_ctx, manifest.context_length or models.n_ctx, info.context_length or models.n_ctx)
    # llama.cpp pads the total context to a multiple of 256 cells.
    cells = -(-n_ctx * models.parallel // 256) * 256
    kv_per_cell = _kv_values_per_cell(info)
    kv_cache = cells * kv_per_cell * KV_BYTES_PER_VALUE
    attention = models.n_batch * n_ctx * max(info.head_count, default=0) * GGUF_ATTENTION_BYTES
    logits = (info.vocab_size or 0) * models.parallel * GGUF_LOGITS_BYTES_PER_SLOT_AND_TOKEN
    overhead = GGUF_FIXED_OVERHEAD + attention + logits
    detail = f"{n_ctx} tokens x {models.parallel} sequences x {info.block_count or 0} layers, f16"
    if not kv_per_cell:
        detail = "attention shape not in the GGUF metadata: not counted"
    return MemoryEstimate(
        model_id=manifest.id,
        weights=weights,
        kv_cache=kv_cache,
        overhead=overhead,
        total=weights + kv_cache + overhead,
        detail=detail,
    )


def _kv_values_per_cell(info: GgufInfo) -> int:
    """Sum over layers of n_embd_k_gqa + n_embd_v_gqa: the f16 values one token's KV takes."""
    if not info.head_count or not info.head_count_kv or not info.embedding_length:
        return 0
    total = 0
    for heads, kv_heads in zip(info.head_count, info.head_count_kv, strict=False):
        if heads <= 0:
            continue  # a layer without attention (hybrid models) keeps no KV
        head_dim = info.embedding_length // heads
        total += kv_heads * ((info.key_length or head_dim) + (info.value_length or head_dim))
    return total


def _estimate_onnx(manifest: Manifest, weights: int, models: ModelSettings) -> MemoryEstimate:
    # onnxruntime's arena grows to the largest batch it ran and keeps it: embedding_batch_size inputs of
    # up to the encoder's window (engines/factory.py passes context_length, default 256).
    length = manifest.context_length or 256
    per_sequence = ONNX_BYTES_PER_TOKEN * length + ONNX_BYTES_PER_TOKEN_SQUARED * length * length
    # Other encoders: activations grow with width and depth, parameters with width squared; the square
    # root of the size ratio sits between the two. A rough guide beyond MiniLM, not a measurement.
    scale = (weights / ONNX_REFERENCE_BYTES) ** 0.5
    activations = int(models.embedding_batch_size * per_sequence * scale)
    overhead = ONNX_FIXED_OVERHEAD + activations
    return MemoryEstimate(
        model_id=manifest.id,
        weights=weights,
        kv_cache=0,
        overhead=overhead,
        total=weights + overhead,
        detail=f"activations of {models.embedding_batch_size} x {length} tokens: {format_bytes(activations)}",
    )


def estimate_models(manifests: list[Manifest], models_dir: Path, models: ModelSettings) -> dict[str, MemoryEstimate]:
    """Estimates of the models a memory limit governs: all but split models, whose weights live on RPC workers.

    A model whose file cannot be read is left out (logged): its load fails with the store's own message.
    """
    estimates: dict[str, MemoryEstimate] = {}
    for manifest in manifests:
        if manifest.id in models.rpc:
            continue
        try:
            estimates[manifest.id] = estimate_model_memory(manifest, models_dir / manifest.id, models)
        except ModelStoreError as exc:
            log.warning("model %s: no memory estimate (%s)", manifest.id, exc.message)
    return estimates


def release_freed_memory() -> None:
    """Hand memory that closed engines freed back to the system (glibc keeps it in its heaps otherwise).

    Measured here: after closing Gemma 3 270M the process still held 74-94 MiB more than before it
    loaded, 15-35 MiB after malloc_trim; after MiniLM 120 MiB, then 17 MiB.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to trim
    libc.malloc_trim(0)


# -- the limit -----------------------------------------------------------------------------------


def system_memory_bytes() -> int:
    """RAM this process may use: MemTotal, or the cgroup's memory limit when that is lower."""
    total = _meminfo_total()
    for path, unlimited in (
        (Path("/sys/fs/cgroup/memory.max"), "max"),  # cgroup v2
        (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), ""),  # cgroup v1
    ):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text and text != unlimited and text.isdigit():
            # cgroup v1 reports "no limit" as a huge number; min() takes care of it.
            total = min(total, int(text)) if total else int(text)
    return total


def _meminfo_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def max_memory_bytes(models: ModelSettings, ram: int | None = None) -> int:
    """`models.max_memory` in bytes (a share of RAM resolved against `ram` or this machine); 0: unlimited."""
    limit: MemoryLimit = models.memory_limit
    if limit.ram_fraction:
        return int((system_memory_bytes() if ram is None else ram) * limit.ram_fraction)
    return limit.bytes
