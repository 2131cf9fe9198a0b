"""Sentence embeddings on onnxruntime + HF tokenizers. The only module that imports onnxruntime."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

# Keep onnxruntime from writing telemetry under $HOME; must be set before the import.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from appliance.errors import ContextLengthExceeded, EngineError, ModelStoreError  # noqa: E402
from appliance.types import Embeddings  # noqa: E402

log = logging.getLogger(__name__)
ort.set_default_logger_severity(3)


def choose_providers(gpu: str) -> list[str]:
    available = ort.get_available_providers()
    if gpu != "off" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def probe_onnx(path: Path) -> int | None:
    """Open the file with onnxruntime (this validates it) and return the output's last dimension."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ModelStoreError(f"{path} is not a valid ONNX model: {exc}") from None
    dim = session.get_outputs()[0].shape[-1]
    return dim if isinstance(dim, int) else None


class OnnxEmbeddingEngine:
    """Mean-pooled, L2-normalised sentence embeddings, batched."""

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        *,
        model_id: str,
        max_length: int,
        batch_size: int,
        n_threads: int | None,
        gpu: str,
    ) -> None:
        self.model_id = model_id
        self.max_length = max_length
        self._batch_size = batch_size
        options = ort.SessionOptions()
        if n_threads:
            options.intra_op_num_threads = n_threads
        providers = choose_providers(gpu)
        try:
            self._session = ort.InferenceSession(str(model_path), options, providers=providers)
            self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise EngineError(f"model {model_id} failed to load: {exc}") from exc
        # No truncation (over-long input is an error, never silently cut) and no padding: batches are
        # padded here, so one unpadded encoding serves counting and running.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._pad_id = self._tokenizer.token_to_id("[PAD]") or 0
        self._input_names = {i.name for i in self._session.get_inputs()}
        # One session run at a time keeps memory bounded; onnxruntime parallelises inside a run.
        self._lock = threading.Lock()
        log.info("loaded %s with providers %s", model_id, self._session.get_providers())

    def count_tokens(self, texts: list[str], special: bool = True) -> list[int]:
        """Tokens per text as the model sees them (special tokens included unless asked otherwise)."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=special)]

    def truncate(self, text: str) -> str:
        """The longest prefix of text that fits the model's window."""
        offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        keep = self.max_length - 2
        return text if len(offsets) <= keep else text[: offsets[keep - 1][1]]

    def embed(self, texts: list[str]) -> Embeddings:
        # Tokenize once; batches are padded from these encodings.
        encoded = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        lengths = [len(e.ids) for e in encoded]
        for i, n in enumerate(lengths):
            if n > self.max_length:
                raise ContextLengthExceeded(
                    f"input[{i}] has {n} tokens; model {self.model_id} accepts at most "
                    f"{self.max_length} tokens per input.",
                    param="input",
                )
        vectors: list[list[float]] = []
        # Sorting by length keeps padding small inside each batch.
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(order), self._batch_size):
            idx = order[start : start + self._batch_size]
            for i, vec in zip(idx, self._run([encoded[i] for i in idx])):
                out[i] = vec
        vectors = [out[i].tolist() for i in range(len(texts))]
        return Embeddings(vectors=vectors, prompt_tokens=sum(lengths))

    def _run(self, encoded: list[Any]) -> np.ndarray:
        width = max(len(e.ids) for e in encoded)
        ids = np.full((len(encoded), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        types = np.zeros((len(encoded), width), dtype=np.int64)
        for row, e in enumerate(encoded):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = 1
            types[row, :n] = e.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = types
        try:
            with self._lock:
                hidden = self._session.run(None, feeds)[0]
        except Exception as exc:
            log.exception("onnx run failed on %s", self.model_id)
            raise EngineError(f"embedding failed on model {self.model_id}") from exc
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.clip(norms, 1e-12, None)
