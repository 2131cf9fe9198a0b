"""Writes a tiny, structurally valid GGUF with the `gguf` package (not a runnable model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter


def write_tiny_gguf(path: Path, *, chat_template: str | None = None) -> Path:
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny test model")
    writer.add_context_length(512)
    writer.add_embedding_length(8)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.add_tensor("output.weight", np.ones((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
