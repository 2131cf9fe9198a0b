"""Builds the real engine for a manifest. Native libraries are imported here only when needed."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from appliance.errors import ModelUnavailable, UnsupportedForModel
from appliance.modelstore.manifest import Manifest
from appliance.modelstore.store import ModelStore
from appliance.settings import ModelSettings

log = logging.getLogger(__name__)


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
        s = self._settings
        threads = s.threads or None
        path = self._store.path_of(manifest, manifest.file)
        if manifest.format == "gguf" and manifest.kind in ("chat", "completion") and manifest.id in s.rpc:
            return self._split(manifest, path, threads or os.cpu_count() or 1)
        if manifest.format == "gguf" and manifest.kind in ("chat", "completion"):
            from appliance.engines.llama import LlamaBatchContext, resolve_gpu_layers
            from appliance.engines.scheduler import BatchScheduler

            ctx = LlamaBatchContext(
                path,
                model_id=manifest.id,
                n_ctx_per_seq=manifest.context_window(s.n_ctx) or s.n_ctx,
                n_seq_max=s.parallel,
                n_batch=s.n_batch,
                n_threads=threads or os.cpu_count() or 1,
                gpu_layers=resolve_gpu_layers(manifest.gpu_layers, s.gpu),
            )
            return BatchScheduler(
                ctx,
                model_id=manifest.id,
                max_queue=s.max_queue,
                prefix_min_tokens=s.prefix_cache_min_tokens,
                queue_timeout_s=s.queue_timeout_s,
                request_timeout_s=s.request_timeout_s,
            )
        if manifest.format == "onnx" and manifest.kind == "embedding" and manifest.tokenizer is not None:
            from appliance.engines.onnx import OnnxEmbeddingEngine

            return OnnxEmbeddingEngine(
                path,
                self._store.path_of(manifest, manifest.tokenizer),
                model_id=manifest.id,
                max_length=manifest.context_window(None) or 256,
                batch_size=self._settings.embedding_batch_size,
                n_threads=threads,
                gpu=self._settings.gpu,
            )
        if manifest.format == "onnx" and manifest.kind == "classifier" and manifest.tokenizer is not None:
            from appliance.engines.onnx import OnnxTextClassifier

            return OnnxTextClassifier(
                path,
                self._store.path_of(manifest, manifest.tokenizer),
                model_id=manifest.id,
                labels=manifest.labels or [],
                max_length=manifest.context_window(None) or 256,
                batch_size=self._settings.embedding_batch_size,
                n_threads=threads,
                gpu=self._settings.gpu,
            )
        if manifest.format == "onnx" and manifest.kind == "rerank" and manifest.tokenizer is not None:
            from appliance.engines.onnx import OnnxCrossEncoder

            return OnnxCrossEncoder(
                path,
                self._store.path_of(manifest, manifest.tokenizer),
                model_id=manifest.id,
                max_length=manifest.context_window(None) or 256,
                batch_size=self._settings.embedding_batch_size,
                n_threads=threads,
                gpu=self._settings.gpu,
            )
        raise UnsupportedForModel(f"no engine serves {manifest.format} models of kind {manifest.kind}")

    def _split(self, manifest: Manifest, path: Path, threads: int) -> Any:
        """The model split over the RPC workers that settings list for it (engines/split.py)."""
        from appliance.engines.llama import LlamaTokenizer
        from appliance.engines.split import SplitChatEngine, SplitSpec

        s, split = self._settings, self._settings.rpc[manifest.id]
        spec = SplitSpec(
            model_id=manifest.id,
            model_path=path,
            peers=tuple(split.peers),
            tensor_split=tuple(split.tensor_split) if split.tensor_split is not None else None,
            offload_layers=split.offload_layers,
            use_local_gpus=s.gpu == "auto",
            n_ctx_per_seq=manifest.context_window(s.n_ctx) or s.n_ctx,
            n_seq_max=s.parallel,
            n_batch=s.n_batch,
            n_threads=threads,
            max_queue=s.max_queue,
            prefix_min_tokens=s.prefix_cache_min_tokens,
            queue_timeout_s=s.queue_timeout_s,
            request_timeout_s=s.request_timeout_s,
            connect_timeout_s=split.connect_timeout_s,
            stall_timeout_s=split.stall_timeout_s,
            load_timeout_s=s.load_timeout_s,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        return SplitChatEngine(spec, LlamaTokenizer(path))
