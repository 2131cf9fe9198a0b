"""Builds the real engine for a manifest. Native libraries are imported here only when needed."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import ModelUnavailable, UnsupportedForModel
from appliance.modelstore.manifest import Manifest
from appliance.modelstore.store import ModelStore
from appliance.settings import ModelSettings

if TYPE_CHECKING:
    from appliance.engines.scheduler import BatchScheduler

log = logging.getLogger(__name__)
_ONNX_KINDS = ("embedding", "classifier", "rerank")


@dataclass(frozen=True)
class BatchSpec:
    """A GGUF model served with continuous batching: its llama.cpp context and its scheduler's limits.
    Picklable, so that a split model's child process builds its engine from it (engines/split_child.py)."""

    model_id: str
    model_path: Path
    n_ctx_per_seq: int
    n_seq_max: int
    n_batch: int
    n_threads: int
    gpu_layers: int
    max_queue: int
    prefix_min_tokens: int
    queue_timeout_s: float
    request_timeout_s: float
    spec_draft: int = 0
    spec_ngram: int = 3
    spec_max_active: int = 2
    flash_attn: str = "auto"


def build_batch_engine(
    spec: BatchSpec, devices: Sequence[int] = (), tensor_split: Sequence[float] | None = None
) -> BatchScheduler:
    """The scheduler over the model's context; `devices` and `tensor_split` as LlamaBatchContext takes them."""
    from appliance.engines.llama import LlamaBatchContext
    from appliance.engines.scheduler import BatchScheduler

    ctx = LlamaBatchContext(
        spec.model_path, **{name: getattr(spec, name) for name in _CONTEXT_FIELDS}, devices=devices, tensor_split=tensor_split
    )
    return BatchScheduler(ctx, model_id=spec.model_id, **{name: getattr(spec, name) for name in _SCHEDULER_FIELDS})


# The fields of a BatchSpec that are the llama.cpp context's, and those that are the scheduler's limits: each
# passed as the keyword argument of the same name.
_CONTEXT_FIELDS = ("model_id", "n_ctx_per_seq", "n_seq_max", "n_batch", "n_threads", "gpu_layers", "flash_attn")
_SCHEDULER_FIELDS = (
    "max_queue", "prefix_min_tokens", "queue_timeout_s", "request_timeout_s", "spec_draft", "spec_ngram", "spec_max_active",
)


class NativeEngineFactory:
    def __init__(self, store: ModelStore, settings: ModelSettings) -> None:
        self._store = store
        self._settings = settings
        if settings.rpc:
            splittable = {m.id for m in store.manifests() if m.format == "gguf" and m.kind in ("chat", "completion")}
            for model_id in sorted(set(settings.rpc) - splittable):
                log.warning("[models.rpc.%s] names no registered GGUF chat or completion model id: ignored", model_id)

    def __call__(self, manifest: Manifest) -> Any:
        if not self._store.sizes_match(manifest):
            raise ModelUnavailable(
                f"files of {manifest.id} are missing or changed; run `appliance models verify {manifest.id}`"
            )
        path = self._store.path_of(manifest, manifest.file)
        if manifest.format == "gguf" and manifest.kind in ("chat", "completion"):
            if manifest.id in self._settings.rpc:
                return self._split(manifest, path)
            from appliance.engines.llama import resolve_gpu_layers

            return build_batch_engine(
                self._batch_spec(manifest, path, resolve_gpu_layers(manifest.gpu_layers, self._settings.gpu))
            )
        if manifest.format == "onnx" and manifest.kind in _ONNX_KINDS and manifest.tokenizer is not None:
            return self._onnx(manifest, path, self._store.path_of(manifest, manifest.tokenizer))
        raise UnsupportedForModel(f"no engine serves {manifest.format} models of kind {manifest.kind}")

    def _batch_spec(self, manifest: Manifest, path: Path, gpu_layers: int) -> BatchSpec:
        s = self._settings
        return BatchSpec(
            model_id=manifest.id,
            model_path=path,
            n_ctx_per_seq=manifest.context_window(s.n_ctx) or s.n_ctx,
            n_seq_max=s.parallel,
            n_batch=s.n_batch,
            n_threads=s.threads or os.cpu_count() or 1,
            gpu_layers=gpu_layers,
            max_queue=s.max_queue,
            prefix_min_tokens=s.prefix_cache_min_tokens,
            queue_timeout_s=s.queue_timeout_s,
            request_timeout_s=s.request_timeout_s,
            spec_draft=s.speculative_draft,
            spec_ngram=s.speculative_ngram,
            spec_max_active=s.speculative_max_active,
            flash_attn=s.flash_attn,
        )

    def _onnx(self, manifest: Manifest, path: Path, tokenizer_path: Path) -> Any:
        from appliance.engines.onnx import OnnxCrossEncoder, OnnxEmbeddingEngine, OnnxTextClassifier

        engine_class = {
            "embedding": OnnxEmbeddingEngine, "classifier": OnnxTextClassifier, "rerank": OnnxCrossEncoder
        }[manifest.kind]
        extra = {"labels": manifest.labels or []} if manifest.kind == "classifier" else {}
        return engine_class(
            path,
            tokenizer_path,
            model_id=manifest.id,
            max_length=manifest.context_window(None) or 256,
            batch_size=self._settings.embedding_batch_size,
            n_threads=self._settings.threads or None,
            gpu=self._settings.gpu,
            **extra,
        )

    def _split(self, manifest: Manifest, path: Path) -> Any:
        """The model split over the RPC workers that settings list for it (engines/split.py)."""
        from appliance.engines.llama import LlamaTokenizer
        from appliance.engines.split import SplitChatEngine, SplitSpec

        s, split = self._settings, self._settings.rpc[manifest.id]
        spec = SplitSpec(
            batch=self._batch_spec(manifest, path, split.offload_layers),
            peers=tuple(split.peers),
            tensor_split=tuple(split.tensor_split) if split.tensor_split is not None else None,
            use_local_gpus=s.gpu == "auto",
            connect_timeout_s=split.connect_timeout_s,
            stall_timeout_s=split.stall_timeout_s,
            load_timeout_s=s.load_timeout_s,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        return SplitChatEngine(spec, LlamaTokenizer(path))
