"""GGUF metadata and structure checks with the `gguf` package (the only module that imports it)."""

from __future__ import annotations

from pathlib import Path

import msgspec
from gguf import GGUFReader

from appliance.errors import ModelStoreError


class GgufInfo(msgspec.Struct, frozen=True, kw_only=True):
    architecture: str | None
    name: str | None
    context_length: int | None
    embedding_length: int | None
    chat_template: str | None
    tensor_count: int


def _field(reader: GGUFReader, key: str) -> object | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:
        return None


def probe_gguf(path: Path) -> GgufInfo:
    """Read the header and tensor table; a truncated or corrupt file raises ModelStoreError."""
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/struct errors on damaged files
        raise ModelStoreError(f"{path} is not a readable GGUF file: {exc}") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ModelStoreError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file")
    if not reader.tensors:
        raise ModelStoreError(f"{path} has no tensors")
    arch = _field(reader, "general.architecture")
    arch = arch if isinstance(arch, str) else None
    ctx = _field(reader, f"{arch}.context_length") if arch else None
    emb = _field(reader, f"{arch}.embedding_length") if arch else None
    name = _field(reader, "general.name")
    template = _field(reader, "tokenizer.chat_template")
    return GgufInfo(
        architecture=arch,
        name=name if isinstance(name, str) else None,
        context_length=int(ctx) if isinstance(ctx, int) else None,
        embedding_length=int(emb) if isinstance(emb, int) else None,
        chat_template=template if isinstance(template, str) else None,
        tensor_count=len(reader.tensors),
    )
