"""The features of the bundled injection classifier (models/injection-guard*): hashed token n-grams.

The classifier reads the WordPiece tokens of the bundled MiniLM tokenizer (lower-cased, accents
stripped). Each token, each pair and each triple of adjacent tokens is hashed into one weight table;
a position's score is the sum of the weights of the n-grams ending there. A span is `SPAN` tokens; the
window's logit is the bias plus the highest mean n-gram weight over its spans, so a short instruction
planted in a long document is not diluted by the text around it (a linear model over n-grams, max-pooled
over spans). The ONNX graph (`onnx_model`) computes exactly what `ngrams` and `logits` compute in numpy,
from the same `input_ids` and `attention_mask` the classifier engine feeds it, so training
(scripts/train_injection.py) and serving share one definition; tests/unit/test_injection_guard.py checks
that they agree.

Pure numpy; `onnx_model` imports onnx (a dev dependency) only when the model is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BUCKETS = 1 << 18
"""Size of the hashed weight table (unigrams, bigrams and trigrams share it)."""
SPAN = 16
"""Tokens per span: the logit is the best span's mean n-gram weight."""
_P1 = 1_000_003
_P2 = 998_244_353
_MULT = 2_654_435_761
LABELS = ["SAFE", "INJECTION"]


def _bucket(raw: np.ndarray) -> np.ndarray:
    return raw % _P2 * _MULT % _P2 % BUCKETS


def ngrams(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(buckets, valid), both [B, T, 3]: the buckets of the unigram, bigram and trigram ending at each
    position, and whether each is made of real tokens only (padding and the text's start excluded)."""
    ids = np.pad(np.asarray(input_ids, dtype=np.int64), ((0, 0), (2, 0)))
    mask = np.pad(np.asarray(attention_mask, dtype=np.int64), ((0, 0), (2, 0)))
    a, b, c = ids[:, :-2], ids[:, 1:-1], ids[:, 2:]
    ma, mb, mc = mask[:, :-2], mask[:, 1:-1], mask[:, 2:]
    raw = np.stack([c, b * _P1 + c + 7, (a * _P1 + b) % _P2 * _P1 + c + 13], axis=-1)
    valid = np.stack([mc, mb * mc, ma * mb * mc], axis=-1)
    return _bucket(raw), valid


def span_means(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean n-gram weight of the span ending at each position ([B, T]: the SPAN positions up to it)."""
    s = np.pad(np.cumsum(scores, axis=1), ((0, 0), (SPAN, 0)))
    n = np.pad(np.cumsum(counts, axis=1), ((0, 0), (SPAN, 0)))
    return (s[:, SPAN:] - s[:, :-SPAN]) / np.maximum(n[:, SPAN:] - n[:, :-SPAN], 1)


def logits(weights: np.ndarray, bias: float, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The injection logit of each row, as the ONNX graph computes it (float64 here)."""
    buckets, valid = ngrams(input_ids, attention_mask)
    scores = (weights[buckets] * valid).sum(axis=-1)
    local = span_means(scores, valid.sum(axis=-1))
    local = np.where(np.asarray(attention_mask) == 1, local, -np.inf)
    return bias + local.max(axis=1)


def onnx_model(weights: np.ndarray, bias: float, *, doc: str = "") -> Any:
    """The classifier as an ONNX ModelProto: inputs input_ids, attention_mask [batch, seq] (int64),
    output `logits` [batch, 2] = [0, injection logit] (so softmax gives P(INJECTION) = sigmoid)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits = [
        numpy_helper.from_array(np.asarray(weights, dtype=np.float32), "weights"),
        numpy_helper.from_array(np.array(bias, dtype=np.float32), "bias"),
        numpy_helper.from_array(np.array(_P1, dtype=np.int64), "p1"),
        numpy_helper.from_array(np.array(_P2, dtype=np.int64), "p2"),
        numpy_helper.from_array(np.array(_MULT, dtype=np.int64), "mult"),
        numpy_helper.from_array(np.array(BUCKETS, dtype=np.int64), "buckets"),
        numpy_helper.from_array(np.array(7, dtype=np.int64), "c7"),
        numpy_helper.from_array(np.array(13, dtype=np.int64), "c13"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero1"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "two1"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus1"),
        numpy_helper.from_array(np.array([-2], dtype=np.int64), "minus2"),
        numpy_helper.from_array(np.array([1 << 62], dtype=np.int64), "end"),
        numpy_helper.from_array(np.array([1.0], dtype=np.float32), "onef"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([0, 2, 0, 0], dtype=np.int64), "pads"),
        numpy_helper.from_array(np.ones((1, 1, SPAN), dtype=np.float32), "ones"),
        numpy_helper.from_array(np.array([1e9], dtype=np.float32), "big"),
    ]

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def cut(x: str, start: str, stop: str, name: str) -> str:
        return node("Slice", [x, start, stop, "axis1"], name)

    ids = node("Pad", ["input_ids", "pads"], "ids_p")
    mask = node("Pad", ["attention_mask", "pads"], "mask_p")
    # As in `ngrams`: a, b, c are the tokens two before, one before and at each position.
    a, b, c = cut(ids, "zero1", "minus2", "a"), cut(ids, "one1", "minus1", "b"), cut(ids, "two1", "end", "c")
    ma, mb, mc = (cut(mask, "zero1", "minus2", "ma"), cut(mask, "one1", "minus1", "mb"),
                  cut(mask, "two1", "end", "mc"))
    raw = [
        c,
        node("Add", [node("Add", [node("Mul", [b, "p1"], "bi_a"), c], "bi_b"), "c7"], "bi_raw"),
        node("Add", [node("Add", [node("Mul", [node("Mod", [node("Add", [node("Mul", [a, "p1"], "tri_a"), b],
                                                                         "tri_b"), "p2"], "tri_c", fmod=0),
                                                "p1"], "tri_d"), c], "tri_e"), "c13"], "tri_raw"),
    ]
    valid = [mc, node("Mul", [mb, mc], "v_bi"), node("Mul", [node("Mul", [ma, mb], "v_tri_a"), mc], "v_tri")]
    scores, counts = [], []
    for order, (h, v) in enumerate(zip(raw, valid)):
        reduced = node("Mod", [h, "p2"], f"h{order}_r", fmod=0)
        mixed = node("Mod", [node("Mul", [reduced, "mult"], f"h{order}_a"), "p2"], f"h{order}_b", fmod=0)
        bucket = node("Mod", [mixed, "buckets"], f"h{order}", fmod=0)
        w = node("Gather", ["weights", bucket], f"w{order}", axis=0)
        vf = node("Cast", [v], f"v{order}", to=TensorProto.FLOAT)
        scores.append(node("Mul", [w, vf], f"wv{order}"))
        counts.append(vf)
    score = node("Add", [node("Add", [scores[0], scores[1]], "s01"), scores[2]], "score")
    count = node("Add", [node("Add", [counts[0], counts[1]], "n01"), counts[2]], "count")

    def span_sum(x: str, name: str) -> str:  # the sum over the SPAN positions ending at each one
        x3 = node("Unsqueeze", [x, "axis1"], f"{name}_3d")
        summed = node("Conv", [x3, "ones"], f"{name}_conv", pads=[SPAN - 1, 0], kernel_shape=[SPAN])
        return node("Squeeze", [summed, "axis1"], name)

    local = node("Div", [span_sum(score, "span_s"), node("Max", [span_sum(count, "span_n"), "onef"], "span_n1")],
                 "local")
    real = node("Cast", [cut("attention_mask", "zero1", "end", "mask_all")], "real", to=TensorProto.FLOAT)
    masked = node("Add", [local, node("Mul", [node("Sub", [real, "onef"], "not_real"), "big"], "penalty")], "masked")
    best = node("ReduceMax", [masked], "best", axes=[1], keepdims=1)
    logit = node("Add", [best, "bias"], "logit")
    node("Concat", [node("Mul", [logit, node("Constant", [], "zerof", value_float=0.0)], "safe"), logit],
         "logits", axis=1)
    graph = helper.make_graph(
        nodes, "injection_guard",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="train_injection")
    model.ir_version = 8
    model.doc_string = doc
    onnx.checker.check_model(model)
    return model
