"""Sentence embeddings, text classification and cross-encoder reranking on onnxruntime + HF tokenizers.
The only module that imports onnxruntime."""

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
    """Open the file with onnxruntime (this validates it) and return the last dimension of its output
    (`logits` when it has one, else the first: a classifier's label count, an encoder's width)."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ModelStoreError(f"{path} is not a valid ONNX model: {exc}") from None
    shape = _logits_output(session).shape
    dim = shape[-1] if shape else None
    return dim if isinstance(dim, int) else None


def _logits_output(session: ort.InferenceSession) -> Any:
    """The output named `logits`, else the first."""
    outputs = session.get_outputs()
    return next((o for o in outputs if o.name == "logits"), outputs[0])


class _OnnxTextModel:
    """An encoder session and its HF tokenizer: the set-up and the padded runs the engines share."""

    def __init__(
        self, model_path: Path, tokenizer_path: Path, *, model_id: str, max_length: int, batch_size: int,
        n_threads: int | None, gpu: str,
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
        # No padding: batches are padded here, so one unpadded encoding serves counting and running.
        # No truncation unless an engine turns it on (the embedding engine never cuts silently).
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._pad_id = self._tokenizer.token_to_id("[PAD]") or self._tokenizer.token_to_id("<pad>") or 0
        self._input_names = {i.name for i in self._session.get_inputs()}
        # One session run at a time keeps memory bounded; onnxruntime parallelises inside a run.
        self._lock = threading.Lock()
        self._configure()
        log.info("loaded %s with providers %s", model_id, self._session.get_providers())

    def _configure(self) -> None:
        """An engine's own checks and tokenizer settings, once the session and the tokenizer are loaded."""

    @property
    def failure(self) -> str | None:
        return None

    def engine_stats(self) -> None:
        """Encoders keep no scheduler counters."""
        return None

    def close(self) -> None:
        """Drop the session; its memory goes when the last run holding it ends."""
        with self._lock:
            self._session = None  # type: ignore[assignment]

    def _run(self, encoded: list[Any], what: str, output: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One output of a padded batch (the named one, else the first), and its attention mask."""
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
                result = self._session.run([output] if output else None, feeds)[0]
        except Exception as exc:
            log.exception("onnx run failed on %s", self.model_id)
            raise EngineError(f"{what} failed on model {self.model_id}") from exc
        return result, mask


class OnnxEmbeddingEngine(_OnnxTextModel):
    """Mean-pooled, L2-normalised sentence embeddings, batched."""

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
            for i, vec in zip(idx, self._pool([encoded[i] for i in idx])):
                out[i] = vec
        vectors = [out[i].tolist() for i in range(len(texts))]
        return Embeddings(vectors=vectors, prompt_tokens=sum(lengths))

    def _pool(self, encoded: list[Any]) -> np.ndarray:
        hidden, mask = self._run(encoded, "embedding")
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.clip(norms, 1e-12, None)


class OnnxTextClassifier(_OnnxTextModel):
    """A sequence classifier (logits [batch, labels]) giving each text a probability per label.

    Never refuses a long text (a guardrail must not fail on a long document): a text longer than the
    window is cut into overlapping windows, at most `max_windows` of them spread evenly from its start
    to its end, and each label's probability is its highest over those windows.
    """

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        *,
        model_id: str,
        labels: list[str],
        max_length: int,
        batch_size: int,
        n_threads: int | None,
        gpu: str,
        max_windows: int = 8,
    ) -> None:
        self.labels = list(labels)
        self._max_windows = max(1, max_windows)
        super().__init__(model_path, tokenizer_path, model_id=model_id, max_length=max_length, batch_size=batch_size,
                         n_threads=n_threads, gpu=gpu)

    def _configure(self) -> None:
        self._output = _logits_output(self._session)
        columns = self._output.shape[-1] if self._output.shape else None
        if isinstance(columns, int) and columns != len(self.labels):
            raise EngineError(f"model {self.model_id} has {columns} output columns but {len(self.labels)} labels")
        special = self._tokenizer.post_processor.num_special_tokens_to_add(False) if self._tokenizer.post_processor else 0
        room = self.max_length - special
        if room < 2:
            raise EngineError(f"model {self.model_id}: a window of {self.max_length} tokens leaves no room for text")
        # Windows overlap by an eighth so an instruction cut at one window's edge is whole in the next.
        self._tokenizer.enable_truncation(self.max_length, stride=room // 8)

    def probabilities(self, texts: list[str]) -> list[dict[str, float]]:
        """Softmax over the labels for each text, {label: probability}."""
        windows: list[Any] = []
        owner: list[int] = []
        for i, encoding in enumerate(self._tokenizer.encode_batch(texts, add_special_tokens=True)):
            for window in self._spread([encoding, *encoding.overflowing]):
                windows.append(window)
                owner.append(i)
        best = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        order = sorted(range(len(windows)), key=lambda w: len(windows[w].ids))
        for start in range(0, len(order), self._batch_size):
            idx = order[start : start + self._batch_size]
            for w, row in zip(idx, self._softmax([windows[w] for w in idx])):
                best[owner[w]] = np.maximum(best[owner[w]], row)
        return [{label: float(p) for label, p in zip(self.labels, row)} for row in best]

    def _spread(self, windows: list[Any]) -> list[Any]:
        if len(windows) <= self._max_windows:
            return windows
        picks = np.linspace(0, len(windows) - 1, self._max_windows).round().astype(int)
        return [windows[i] for i in sorted(set(picks.tolist()))]

    def _softmax(self, encoded: list[Any]) -> np.ndarray:
        logits, _ = self._run(encoded, "classification", output=self._output.name)
        logits = logits.astype(np.float64)
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise EngineError(f"model {self.model_id} returned logits of shape {logits.shape}, "
                              f"expected [batch, {len(self.labels)}]")
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)


class OnnxCrossEncoder(_OnnxTextModel):
    """A cross-encoder reranker: reads each (query, document) pair as one input and gives it one logit.

    The pair is encoded the way the model was trained (`[CLS] query [SEP] document [SEP]` for BERT-style
    tokenizers, token_type_ids 0 then 1) and cut to `max_length` tokens, longest part first, as
    sentence-transformers' CrossEncoder does. The logit is the log-odds that the document is relevant:
    the single output column, or for a two-column model `logit[1] - logit[0]` (column 1 being the
    positive label), so that its sigmoid is the softmax probability of that label.
    """

    def _configure(self) -> None:
        self._output = _logits_output(self._session)
        columns = self._output.shape[-1] if len(self._output.shape or []) > 1 else 1
        if isinstance(columns, int) and columns not in (1, 2):
            raise EngineError(f"model {self.model_id} has {columns} output columns; a cross-encoder has 1 or 2")
        special = self._tokenizer.post_processor.num_special_tokens_to_add(True) if self._tokenizer.post_processor else 0
        if self.max_length - special < 2:
            raise EngineError(f"model {self.model_id}: a window of {self.max_length} tokens leaves no room for a pair")
        self._tokenizer.enable_truncation(self.max_length, strategy="longest_first")

    def _encode(self, query: str, documents: list[str]) -> list[Any]:
        return self._tokenizer.encode_batch([(query, d) for d in documents], add_special_tokens=True)

    def count_tokens(self, query: str, documents: list[str]) -> int:
        """Tokens of all the pairs as the model sees them (special tokens in, cut to the window)."""
        return sum(len(e.ids) for e in self._encode(query, documents))

    def score(self, query: str, documents: list[str]) -> list[float]:
        """One relevance logit per document, in the documents' order (see the class docstring)."""
        encoded = self._encode(query, documents)
        out = np.zeros(len(documents), dtype=np.float64)
        # Sorting by length keeps padding small inside each batch.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
        for start in range(0, len(order), self._batch_size):
            idx = order[start : start + self._batch_size]
            out[idx] = self._logits([encoded[i] for i in idx])
        return out.tolist()

    def _logits(self, encoded: list[Any]) -> np.ndarray:
        logits, _ = self._run(encoded, "rerank", output=self._output.name)
        logits = logits.astype(np.float64)
        if logits.ndim == 2 and logits.shape[1] == 2:
            return logits[:, 1] - logits[:, 0]
        if logits.ndim == 2 and logits.shape[1] == 1:
            return logits[:, 0]
        if logits.ndim == 1:
            return logits
        raise EngineError(f"model {self.model_id} returned logits of shape {logits.shape}, expected [batch, 1 or 2]")
