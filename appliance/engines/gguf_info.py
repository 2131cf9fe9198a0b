"""GGUF metadata and structure checks with the `gguf` package (the only module that imports it)."""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType

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
    """The metadata through the `gguf` package's own reader, which decodes every tensor and array.

    Slow (~10 s for Gemma 3's vocabulary): the tests hold `read_gguf_header` and `check_gguf` to it.
    """
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
            fields, lengths, tensor_count = _parse_header(_Reader(buf))
    except _Cut as cut:
        raise ModelStoreError(f"{path} is not a readable GGUF file: its {cut} runs past the end of the file") from None
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"{path} is not a readable GGUF file: {exc}") from None
    return _info(fields.get, lengths.get, tensor_count)


def check_gguf(path: Path) -> GgufInfo:
    """`read_gguf_header`'s metadata once the file is whole: header, tensor table and every tensor's data.

    Walks the header and tensor table without decoding them (~0.1 s, against GGUFReader's ~10 s) and
    checks the file reaches the end of the furthest tensor, so a cut-off download or copy is refused
    before anything is copied, naming `path` and the sizes, rather than failing inside a numpy reshape.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            reader = _Reader(buf)
            fields, lengths, tensor_count = _parse_header(reader)
            need = _tensor_data_end(reader, tensor_count, _alignment(fields))
    except _Cut as cut:
        raise ModelStoreError(
            f"{path} is truncated: {size} bytes, and its GGUF {cut} runs past the end of the file", param="path"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"{path} is not a readable GGUF file: {exc}", param="path") from None
    if size < need:
        raise ModelStoreError(
            f"{path} is truncated: {size} bytes, expected at least {need} from its GGUF tensor table", param="path"
        )
    if tensor_count == 0:
        raise ModelStoreError(f"{path} has no tensors", param="path")
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


class AdapterInfo(msgspec.Struct, frozen=True, kw_only=True):
    architecture: str
    rank: int
    """The LoRA rank (the inner width of every lora_a/lora_b pair; the largest when they differ)."""
    alpha: float | None
    """`adapter.lora.alpha`: llama.cpp scales the adapter by alpha / rank (1 when absent)."""
    pairs: int
    """Weights the adapter changes."""


def check_adapter(adapter: Path, base: Path, base_name: str) -> AdapterInfo:
    """Refuse a LoRA adapter GGUF that llama.cpp would not apply to the model in `base`: not an adapter,
    another architecture, a lora_a without its lora_b, a weight the base model lacks, or sizes that do
    not fit it (llama.cpp's own checks, made here at import, before anything is copied)."""
    fields, shapes = _tensor_table(adapter)
    base_fields, base_shapes = _tensor_table(base)
    name = adapter.name
    kind = fields.get("general.type")
    if kind != "adapter":
        raise ModelStoreError(
            f"{name} is not a LoRA adapter (its general.type is {kind!r}, not 'adapter'): import a model without --kind adapter",
            param="path",
        )
    if fields.get("adapter.type") != "lora":
        raise ModelStoreError(f"{name} is a {fields.get('adapter.type')!r} adapter; only 'lora' adapters are supported",
                              param="path")
    arch, base_arch = fields.get("general.architecture"), base_fields.get("general.architecture")
    if arch != base_arch:
        raise ModelStoreError(
            f"{name} is an adapter for architecture {arch!r}, but {base_name} is {base_arch!r}", param="base"
        )
    rank, pairs = 0, 0
    for tensor, a in shapes.items():
        if tensor.endswith(".lora_b"):
            if tensor[: -len("_b")] + "_a" not in shapes:
                raise ModelStoreError(f"{name}: {tensor} has no matching lora_a tensor", param="path")
            continue
        if not tensor.endswith(".lora_a"):
            continue
        weight = tensor[: -len(".lora_a")]
        b = shapes.get(weight + ".lora_b")
        if b is None:
            raise ModelStoreError(f"{name}: {tensor} has no matching lora_b tensor", param="path")
        target = base_shapes.get(weight)
        if target is None:
            raise ModelStoreError(f"{name} changes {weight}, which {base_name} does not have", param="base")
        # ggml order: the base weight is [n_in, n_out], lora_a [n_in, r], lora_b [r, n_out].
        if len(a) != 2 or len(b) != 2 or len(target) != 2 or a[1] != b[0] or a[0] != target[0] or b[1] != target[1]:
            raise ModelStoreError(
                f"{name}: the sizes of {weight} do not fit {base_name} (lora_a {list(a)}, lora_b {list(b)}, "
                f"weight {list(target)})",
                param="base",
            )
        rank, pairs = max(rank, a[1]), pairs + 1
    if not pairs:
        raise ModelStoreError(f"{name} holds no lora_a/lora_b tensor pairs", param="path")
    alpha = fields.get("adapter.lora.alpha")
    return AdapterInfo(
        architecture=str(arch), rank=rank, pairs=pairs, alpha=float(alpha) if isinstance(alpha, (int, float)) else None
    )


def _tensor_table(path: Path) -> tuple[dict[str, object], dict[str, tuple[int, ...]]]:
    """The metadata fields and each tensor's dimensions (ggml order) of a whole GGUF file."""
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        size = path.stat().st_size
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            reader = _Reader(buf)
            fields, _, tensor_count = _parse_header(reader)
            need = _tensor_data_end(reader, tensor_count, _alignment(fields), shapes)
    except _Cut as cut:
        raise ModelStoreError(f"{path.name} is truncated: its GGUF {cut} runs past the end of the file",
                              param="path") from None
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"{path.name} is not a readable GGUF file: {exc}", param="path") from None
    if size < need:
        raise ModelStoreError(f"{path.name} is truncated: {size} bytes, expected at least {need}", param="path")
    return fields, shapes


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
_MAX_DIMS = 4
"""GGML_MAX_DIMS: llama.cpp refuses a tensor with more dimensions."""
_DEFAULT_ALIGNMENT = 32
"""Tensor data alignment when `general.alignment` is absent (GGUF_DEFAULT_ALIGNMENT)."""


class _Cut(Exception):
    """The file ends inside the part of the header named by the message."""


class _Reader:
    """Little-endian reads from a mapped file; reading past its end raises _Cut naming the part being read."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0
        self.part = "header"

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise _Cut(self.part) from None
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise _Cut(self.part)
        text = self.buf[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def skip_strings(self, count: int) -> None:
        """Step over `count` length-prefixed strings without decoding them (a vocabulary has ~10^5)."""
        buf, pos, size = self.buf, self.pos, len(self.buf)
        try:
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + n
        except struct.error:
            raise _Cut(self.part) from None
        if pos > size:
            raise _Cut(self.part)
        self.pos = pos

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > len(self.buf):
            raise _Cut(self.part)


def _parse_header(r: _Reader) -> tuple[dict[str, object], dict[str, int], int]:
    """(scalar and short-array fields, array lengths, tensor count) of a little-endian GGUF v2/v3 file.

    Leaves the reader at the start of the tensor table.
    """
    (magic,) = r.unpack("<I")
    if magic != GGUF_MAGIC:
        raise ValueError("no GGUF magic")
    version, tensor_count, kv_count = r.unpack("<IQQ")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (only 2 and 3 are read here)")
    fields: dict[str, object] = {}
    lengths: dict[str, int] = {}
    r.part = "key/value metadata"
    for _ in range(kv_count):
        key = r.string()
        (vtype,) = r.unpack("<I")
        if vtype == GGUFValueType.STRING:
            fields[key] = r.string()
        elif vtype in _SCALARS:
            (fields[key],) = r.unpack(_SCALARS[vtype])
        elif vtype == GGUFValueType.ARRAY:
            etype, count = r.unpack("<IQ")
            lengths[key] = count
            if etype == GGUFValueType.STRING:
                r.skip_strings(count)
            elif etype in _SCALARS:
                code = _SCALARS[etype]
                if count <= _KEEP_ARRAY:
                    fields[key] = list(r.unpack(f"<{count}{code[1]}"))
                else:
                    r.skip(struct.calcsize(code) * count)
            else:
                raise ValueError(f"array of type {etype} in {key}")
        else:
            raise ValueError(f"unknown value type {vtype} in {key}")
    return fields, lengths, tensor_count


def _alignment(fields: dict[str, object]) -> int:
    value = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1):
        raise ValueError(f"general.alignment is {value!r}, not a power of two")
    return value


def _tensor_data_end(
    r: _Reader, tensor_count: int, alignment: int, shapes: dict[str, tuple[int, ...]] | None = None
) -> int:
    """The least file size that holds every tensor: the aligned data start plus the furthest tensor end.

    Reads the tensor table (name, dimensions, ggml type, offset) that follows the key/value metadata;
    each tensor's dimensions go into `shapes` when given.
    """
    r.part = "tensor table"
    names: set[str] = set()
    furthest = 0
    for _ in range(tensor_count):
        name = r.string()
        (n_dims,) = r.unpack("<I")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = r.unpack(f"<{n_dims}Q")
        ggml_type, offset = r.unpack("<IQ")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name} has unknown ggml type {ggml_type}") from None
        if dims and dims[0] % block:
            raise ValueError(f"tensor {name}: row of {dims[0]} is not a whole number of {block}-element blocks")
        if offset % alignment:
            raise ValueError(f"tensor {name}: offset {offset} is not a multiple of {alignment}")
        if name in names:
            raise ValueError(f"tensor {name} appears twice")
        names.add(name)
        if shapes is not None:
            shapes[name] = tuple(dims)
        furthest = max(furthest, offset + math.prod(dims) // block * type_size)
    data_start = -(-r.pos // alignment) * alignment
    return data_start + furthest
