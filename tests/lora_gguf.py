"""Writes small, real LoRA adapter GGUFs for a model file with the `gguf` package (tests and the adapter bench).

The adapter changes the attention query/value and feed-forward up projections of every layer with random
low-rank matrices, big enough to change a greedy answer; `arch`, `rank_b` and `drop_b` make the mismatched
files an import must refuse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

TARGETS = ("attn_q.weight", "attn_v.weight", "ffn_up.weight")


def write_lora(
    base: Path,
    out: Path,
    *,
    seed: int = 0,
    rank: int = 8,
    std: float = 0.05,
    arch: str | None = None,
    rank_b: int | None = None,
    width: int | None = None,
    drop_b: bool = False,
) -> Path:
    reader = GGUFReader(base)
    field = reader.fields["general.architecture"]
    base_arch = bytes(field.parts[field.data[0]]).decode()
    writer = GGUFWriter(str(out), arch=arch or base_arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(seed)
    for tensor in reader.tensors:
        if not tensor.name.endswith(TARGETS):
            continue
        n_in, n_out = (int(d) for d in tensor.shape)  # ggml order: [n_in, n_out]
        a = rng.standard_normal((rank, width or n_in)).astype(np.float32) * std
        b = rng.standard_normal((n_out, rank_b or rank)).astype(np.float32) * std
        writer.add_tensor(f"{tensor.name}.lora_a", a)
        if not drop_b:
            writer.add_tensor(f"{tensor.name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
