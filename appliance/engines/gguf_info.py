"""GGUF metadata and structure checks with the `gguf` package (the only module that imports it)."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from pathlib import Path

import msgspec
from gguf import GGUF_MAGIC, GGUFReader, GGUFValueType

from appliance.errors import ModelStoreError


class GgufInfo(msgspec.Struct, frozen=True, kw_only=True):
    architecture: str | None
    name: str | None
    context_length: int | None
    embedding_length: int | None
    chat_template: str | None
    tensor_count: int
    block_count: int | None = None
    """Transformer layers (`{arch}.block_count`)."""
    head_count: tuple[int, ...] = ()
    """Attention heads per layer (the metadata holds one number or one per layer); empty when absent."""
    head_count_kv: tuple[int, ...] = ()
    """Key/value heads per layer (grouped-query attention); empty when absent."""
    key_length: int | None = None
    """Width of one key head; None means embedding_length / head_count, as llama.cpp assumes."""
    value_length: int | None = None
    """Width of one value head; None means embedding_length / head_count."""
    vocab_size: int | None = None
    """Tokens in the vocabulary (the length of `tokenizer.ggml.tokens`)."""


def _field(reader: GGUFReader, key: str) -> object | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:
        return None


def _array_length(reader: GGUFReader, key: str) -> int | None:
    """Element count of an array field without decoding its elements (a vocabulary has ~10^5 strings)."""
    field = reader.fields.get(key)
    return len(field.data) if field is not None and field.data else None


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
    return _info(lambda key: _field(reader, key), lambda key: _array_length(reader, key), len(reader.tensors))


def read_gguf_header(path: Path) -> GgufInfo:
    """The same metadata as `probe_gguf` from the key/value header alone, without checking tensors.

    GGUFReader decodes every element of every array (Gemma 3's 262,144-token vocabulary takes it
    ~10 s on 2 cores); this walks the header and only counts the elements of long arrays (~0.1 s),
    so start-up can size each model. Raises ModelStoreError for a file that is not GGUF.
    """
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            fields, lengths, tensor_count = _parse_header(buf)
    except (OSError, ValueError, struct.error, IndexError) as exc:
        raise ModelStoreError(f"{path} is not a readable GGUF file: {exc}") from None
    return _info(fields.get, lengths.get, tensor_count)


def _info(get: Callable[[str], object], length: Callable[[str], int | None], tensor_count: int) -> GgufInfo:
    arch = get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    prefix = f"{arch}." if arch else "\0"  # no architecture: no architecture keys match
    name = get("general.name")
    template = get("tokenizer.chat_template")
    layers = _int(get(f"{prefix}block_count"))
    heads = _per_layer(get(f"{prefix}attention.head_count"), layers)
    kv_heads = _per_layer(get(f"{prefix}attention.head_count_kv"), layers)
    return GgufInfo(
        architecture=arch,
        name=name if isinstance(name, str) else None,
        context_length=_int(get(f"{prefix}context_length")),
        embedding_length=_int(get(f"{prefix}embedding_length")),
        chat_template=template if isinstance(template, str) else None,
        tensor_count=tensor_count,
        block_count=layers,
        head_count=heads,
        # Without head_count_kv llama.cpp assumes one KV head per query head (no GQA).
        head_count_kv=kv_heads or heads,
        key_length=_int(get(f"{prefix}attention.key_length")),
        value_length=_int(get(f"{prefix}attention.value_length")),
        vocab_size=length("tokenizer.ggml.tokens"),
    )


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _per_layer(value: object, layers: int | None) -> tuple[int, ...]:
    """A head count as one number per layer: GGUF stores a scalar, or an array when layers differ."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return tuple(int(v) for v in value)
    count = _int(value)
    if count is None or not layers:
        return ()
    return (count,) * layers


# -- the header walk -------------------------------------------------------------------------------

_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_KEEP_ARRAY = 4096
"""Numeric arrays up to this length are decoded (per-layer head counts); longer ones are only counted."""


def _parse_header(buf: mmap.mmap) -> tuple[dict[str, object], dict[str, int], int]:
    """(scalar and short-array fields, array lengths, tensor count) of a little-endian GGUF v2/v3 file."""
    magic, version, tensor_count, kv_count = struct.unpack_from("<IIQQ", buf, 0)
    if magic != GGUF_MAGIC:
        raise ValueError("no GGUF magic")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (only 2 and 3 are read here)")
    fields: dict[str, object] = {}
    lengths: dict[str, int] = {}
    pos = 24

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        end = at + 8 + n
        if end > len(buf):
            raise ValueError("a string runs past the end of the file")
        return buf[at + 8 : end].decode("utf-8", errors="replace"), end

    for _ in range(kv_count):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype == GGUFValueType.STRING:
            fields[key], pos = string(pos)
        elif vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            (fields[key],) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
        elif vtype == GGUFValueType.ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            lengths[key] = count
            if etype == GGUFValueType.STRING:
                for _ in range(count):  # each element is a length-prefixed string: only skip them
                    (n,) = struct.unpack_from("<Q", buf, pos)
                    pos += 8 + n
            elif etype in _SCALARS:
                width = struct.calcsize(_SCALARS[etype])
                if count <= _KEEP_ARRAY:
                    fields[key] = list(struct.unpack_from(f"<{count}{_SCALARS[etype][1]}", buf, pos))
                pos += width * count
            else:
                raise ValueError(f"array of type {etype} in {key}")
        else:
            raise ValueError(f"unknown value type {vtype} in {key}")
        if pos > len(buf):
            raise ValueError("the header runs past the end of the file")
    return fields, lengths, tensor_count
