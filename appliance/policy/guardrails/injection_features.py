"""The features of the bundled injection classifier (models/injection-guard*): hashed token n-grams.

The classifier is a logistic regression over the WordPiece tokens of the bundled MiniLM tokenizer
(lower-cased, accents stripped): each token, each pair and each triple of adjacent tokens is hashed
into one weight table, and a window's logit is the bias plus the mean of the weights of its n-grams.
The ONNX graph (`onnx_model`) computes exactly what `ngram_rows` computes in numpy, from the same
`input_ids` and `attention_mask` the classifier engine feeds it, so training (scripts/train_injection.py)
and serving share one definition; tests/unit/test_injection_guard.py checks that they agree.

Pure numpy; `onnx_model` imports onnx (a dev dependency) only when the model is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BUCKETS = 1 << 18
"""Size of the hashed weight table (unigrams, bigrams and trigrams share it)."""
_P1 = 1_000_003
_P2 = 998_244_353
_MULT = 2_654_435_761
_OFFSETS = (0, 1, 2)
"""n - 1 for each n-gram order: unigram, bigram, trigram."""
LABELS = ["SAFE", "INJECTION"]


def _hash(order: int, ids: np.ndarray) -> np.ndarray:
    """Bucket of the n-grams of `ids` [B, T] (int64) of the given order ending at each position t >= order."""
    t = ids.shape[1]
    if order == 0:
        h = ids[:, :]
    elif order == 1:
        h = ids[:, : t - 1] * _P1 + ids[:, 1:] + 7
    else:
        h = (ids[:, : t - 2] * _P1 + ids[:, 1 : t - 1]) % _P2 * _P1 + ids[:, 2:] + 13
    return h % _P2 * _MULT % _P2 % BUCKETS


def ngram_rows(input_ids: np.ndarray, attention_mask: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """For each row of a padded batch: the buckets of its n-grams (padding excluded) and 1 / their count.

    A window's logit is bias + (1 / count) * sum(weights[buckets]) (see `onnx_model`).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64)
    per_order = []
    for order in _OFFSETS:
        if ids.shape[1] <= order:
            per_order.append((np.zeros((ids.shape[0], 0), np.int64), np.zeros((ids.shape[0], 0), np.int64)))
            continue
        valid = mask[:, order:]
        for k in range(order):
            valid = valid * mask[:, k : mask.shape[1] - order + k]
        per_order.append((_hash(order, ids), valid))
    rows = []
    for r in range(ids.shape[0]):
        buckets = np.concatenate([h[r][v[r] == 1] for h, v in per_order])
        rows.append((buckets, 1.0 / max(1, len(buckets))))
    return rows


def logits(weights: np.ndarray, bias: float, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The injection logit of each row, as the ONNX graph computes it (float64 here)."""
    return np.array([bias + scale * weights[b].sum() for b, scale in ngram_rows(input_ids, attention_mask)])


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
    ]

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def cut(x: str, start: str, stop: str, name: str) -> str:
        return node("Slice", [x, start, stop, "axis1"], name)

    ids, mask = "input_ids", "attention_mask"
    # Slices along the sequence axis, as in `_hash`: a[:, :t-k] is Slice(0, -k), a[:, k:] is Slice(k, end).
    head1, tail1 = cut(ids, "zero1", "minus1", "ids_head1"), cut(ids, "one1", "end", "ids_tail1")
    head2, mid2, tail2 = (cut(ids, "zero1", "minus2", "ids_head2"), cut(ids, "one1", "minus1", "ids_mid2"),
                          cut(ids, "two1", "end", "ids_tail2"))
    raw = [
        ids,
        node("Add", [node("Add", [node("Mul", [head1, "p1"], "bi_a"), tail1], "bi_b"), "c7"], "bi_raw"),
        node("Add", [node("Add", [node("Mul", [node("Mod", [node("Add", [node("Mul", [head2, "p1"], "tri_a"), mid2],
                                                                         "tri_b"), "p2"], "tri_c", fmod=0),
                                                "p1"], "tri_d"), tail2], "tri_e"), "c13"], "tri_raw"),
    ]
    mhead1, mtail1 = cut(mask, "zero1", "minus1", "m_head1"), cut(mask, "one1", "end", "m_tail1")
    mhead2, mmid2, mtail2 = (cut(mask, "zero1", "minus2", "m_head2"), cut(mask, "one1", "minus1", "m_mid2"),
                             cut(mask, "two1", "end", "m_tail2"))
    valid = [
        mask,
        node("Mul", [mhead1, mtail1], "m_bi"),
        node("Mul", [node("Mul", [mhead2, mmid2], "m_tri_a"), mtail2], "m_tri"),
    ]
    sums, counts = [], []
    for order, (h, v) in enumerate(zip(raw, valid)):
        reduced = node("Mod", [h, "p2"], f"h{order}_r", fmod=0)
        mixed = node("Mod", [node("Mul", [reduced, "mult"], f"h{order}_a"), "p2"], f"h{order}_b", fmod=0)
        bucket = node("Mod", [mixed, "buckets"], f"h{order}", fmod=0)
        w = node("Gather", ["weights", bucket], f"w{order}", axis=0)
        vf = node("Cast", [v], f"v{order}", to=TensorProto.FLOAT)
        sums.append(node("ReduceSum", [node("Mul", [w, vf], f"wv{order}"), "axis1"], f"s{order}", keepdims=1))
        counts.append(node("ReduceSum", [vf, "axis1"], f"c{order}", keepdims=1))
    total = node("Add", [node("Add", [sums[0], sums[1]], "s01"), sums[2]], "s_all")
    count = node("Max", [node("Add", [node("Add", [counts[0], counts[1]], "c01"), counts[2]], "c_all"), "onef"],
                 "c_safe")
    logit = node("Add", [node("Div", [total, count], "mean"), "bias"], "logit")
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
