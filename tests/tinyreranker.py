"""A tiny real ONNX cross-encoder over the MiniLM tokenizer, built with the `onnx` package.

It reads a (query, document) pair the way a real cross-encoder does (input_ids, attention_mask and
token_type_ids: 0 for the query, 1 for the document) and scores word overlap: the logit is
`SCALE * matched / query_words - OFFSET`, where query_words counts the query's word-piece tokens
(special tokens and a few stopwords weigh nothing) and matched those that also occur in the document.
So a document sharing the query's words ranks above one that does not, and a real assertion can say so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SCALE, OFFSET = 10.0, 5.0
STOPWORDS = ("the", "a", "an", "is", "of", "what", "which", "to", "in", "and", "?", ".")


def logit(matched: int, query_words: int) -> float:
    """The tiny model's logit for a pair, for tests that check the arithmetic."""
    return SCALE * matched / max(query_words, 1) - OFFSET


def write_tiny_reranker(path: Path, tokenizer: Path, *, columns: int = 1) -> Path:
    """`columns` 2 writes [0, logit] per pair: a two-label model whose positive column is the second."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    weight = np.ones(tok.get_vocab_size(), dtype=np.float32)
    weight[:999] = 0.0  # [PAD], [UNK], [CLS], [SEP], [MASK] and the [unused*] slots
    for word in STOPWORDS:
        token = tok.token_to_id(word)
        assert token is not None, word
        weight[token] = 0.0
    nodes = [
        helper.make_node("Gather", ["weight", "input_ids"], ["w"], axis=0),  # [b, s]
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["token_type_ids"], ["doc"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["w", "maskf"], ["live"]),
        helper.make_node("Sub", ["one", "doc"], ["query"]),
        helper.make_node("Mul", ["live", "query"], ["qw"]),  # query word weights [b, s]
        helper.make_node("Mul", ["live", "doc"], ["dw"]),  # document word weights [b, s]
        helper.make_node("Unsqueeze", ["input_ids", "axis2"], ["ids_i"]),  # [b, s, 1]
        helper.make_node("Unsqueeze", ["input_ids", "axis1"], ["ids_j"]),  # [b, 1, s]
        helper.make_node("Equal", ["ids_i", "ids_j"], ["same"]),  # [b, s, s]
        helper.make_node("Cast", ["same"], ["samef"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["dw", "axis1"], ["dw_j"]),  # [b, 1, s]
        helper.make_node("Mul", ["samef", "dw_j"], ["in_doc"]),
        helper.make_node("ReduceMax", ["in_doc"], ["found"], axes=[2], keepdims=0),  # [b, s]: token i is in the document
        helper.make_node("Mul", ["found", "qw"], ["hit"]),
        helper.make_node("ReduceSum", ["hit", "axis1"], ["matched"], keepdims=1),  # [b, 1]
        helper.make_node("ReduceSum", ["qw", "axis1"], ["words"], keepdims=1),  # [b, 1]
        helper.make_node("Max", ["words", "one"], ["words1"]),
        helper.make_node("Div", ["matched", "words1"], ["share"]),
        helper.make_node("Mul", ["share", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "offset"], ["score"]),  # [b, 1]
    ]
    if columns == 2:
        nodes += [
            helper.make_node("Mul", ["score", "zero"], ["negative"]),
            helper.make_node("Concat", ["negative", "score"], ["logits"], axis=1),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["score"], ["logits"]))
    scalar = lambda value, name: numpy_helper.from_array(np.array(value, dtype=np.float32), name)  # noqa: E731
    graph = helper.make_graph(
        nodes,
        "tiny-cross-encoder",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", columns])],
        initializer=[
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            scalar(1.0, "one"), scalar(0.0, "zero"), scalar(SCALE, "scale"), scalar(OFFSET, "offset"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
