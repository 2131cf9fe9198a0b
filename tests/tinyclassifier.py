"""A tiny real ONNX sequence classifier over the MiniLM tokenizer, built with the `onnx` package.

logits[b] = masked mean over the tokens of table[input_ids]: every token leans to SAFE (column 0)
except a few trigger words ("ignore", "instructions", "disregard"), which lean hard to INJECTION.
So a text "wins" INJECTION only where the triggers make up enough of what the model sees: a short
text with them, or the one window of a long text that holds them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from appliance.modelstore.catalog import catalog_manifests

REPO = Path(__file__).resolve().parents[1]
LABELS = ["SAFE", "INJECTION"]
TRIGGERS = ("ignore", "instructions", "disregard")
TRIGGER_TEXT = "The washing instructions say: never ignore a stain."
"""Trips the classifier, yet no injection rule (nothing tells the assistant what to do)."""


def minilm_tokenizer(directory: Path) -> Path:
    """The bundled MiniLM tokenizer.json: the installed copy, else read from its registry package."""
    installed = REPO / ".appliance-data" / "test" / "models" / "all-minilm-l6-v2" / "tokenizer.json"
    if installed.is_file():
        return installed
    import importlib.util

    template = next(m for m in catalog_manifests() if m.id == "all-minilm-l6-v2")
    assert template.tokenizer is not None and template.tokenizer.source is not None
    source = template.tokenizer.source
    spec = importlib.util.find_spec(source.module)
    assert spec is not None and spec.submodule_search_locations and source.resource and source.zip_member
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    target = directory / "tokenizer.json"
    with zipfile.ZipFile(package_dir / source.resource) as archive:
        target.write_bytes(archive.read(source.zip_member))
    return target


def write_tiny_classifier(path: Path, tokenizer: Path, *, labels: int = 2) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    table = np.zeros((tok.get_vocab_size(), labels), dtype=np.float32)
    table[:, 0] = 2.0
    for word in TRIGGERS:
        token = tok.token_to_id(word)
        assert token is not None, word
        table[token] = [0.0, 30.0] + [0.0] * (labels - 2)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["rows"], axis=0),  # [b, s, labels]
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),  # [b, s, 1]
        helper.make_node("Mul", ["rows", "mask3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "axis1"], ["total"], keepdims=0),  # [b, labels]
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),  # [b, 1]
        helper.make_node("Div", ["total", "count"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-injection-classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", labels])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
