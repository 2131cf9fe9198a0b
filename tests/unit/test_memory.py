"""Model memory estimates and the `models.max_memory` setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from appliance.engines.gguf_info import probe_gguf, read_gguf_header
from appliance.engines.memory import (
    GGUF_FIXED_OVERHEAD,
    MemoryLimit,
    estimate_model_memory,
    estimate_models,
    max_memory_bytes,
    parse_max_memory,
    system_memory_bytes,
)
from appliance.errors import ModelStoreError, SettingsError
from appliance.settings import load_settings
from tests.fakes import manifest


def write_gqa_gguf(path: Path, *, kv_heads: int | list[int] = 2) -> Path:
    """A header shaped like a small GQA model: 4 layers, 8 heads of 16, `kv_heads` KV heads, 100 tokens."""
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(128)
    writer.add_block_count(4)
    writer.add_head_count(8)
    writer.add_head_count_kv(kv_heads)
    writer.add_token_list([f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((100, 128), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_header_reader_agrees_with_the_gguf_package(tmp_path: Path) -> None:
    path = write_gqa_gguf(tmp_path / "m.gguf")
    fast = read_gguf_header(path)
    assert fast == probe_gguf(path)
    assert (fast.block_count, fast.head_count, fast.head_count_kv, fast.vocab_size) == (4, (8,) * 4, (2,) * 4, 100)
    per_layer = read_gguf_header(write_gqa_gguf(tmp_path / "p.gguf", kv_heads=[1, 2, 4, 8]))
    assert per_layer.head_count_kv == (1, 2, 4, 8)


def test_header_reader_refuses_what_is_not_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ModelStoreError, match="not a readable GGUF"):
        read_gguf_header(junk)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(write_gqa_gguf(tmp_path / "whole.gguf").read_bytes()[:200])
    with pytest.raises(ModelStoreError):
        read_gguf_header(truncated)


def test_gguf_estimate_is_weights_plus_f16_kv_per_sequence_plus_buffers(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    write_gqa_gguf(model_dir / "model.bin")
    m = manifest("m", kind="completion", context_length=2048)
    models = load_settings(env={"APPLIANCE_N_CTX": "1024", "APPLIANCE_PARALLEL": "4"}).models
    est = estimate_model_memory(m, model_dir, models)
    # 1024 tokens x 4 sequences x 4 layers x (2 KV heads x (16 + 16)) x 2 bytes
    assert est.kv_cache == 1024 * 4 * 4 * (2 * 32) * 2
    assert est.weights == (model_dir / "model.bin").stat().st_size
    assert est.overhead >= GGUF_FIXED_OVERHEAD
    assert est.total == est.weights + est.kv_cache + est.overhead
    assert "1024 tokens x 4 sequences x 4 layers" in est.explain()
    # The manifest's trained context caps n_ctx, as the engine factory does.
    small = estimate_model_memory(manifest("m", kind="completion", context_length=256), model_dir, models)
    assert small.kv_cache == est.kv_cache // 4


def test_onnx_estimate_grows_with_the_batch(tmp_path: Path) -> None:
    model_dir = tmp_path / "e"
    model_dir.mkdir()
    (model_dir / "model.bin").write_bytes(bytes(1 << 20))
    m = manifest("e", kind="embedding", context_length=256)
    one = estimate_model_memory(m, model_dir, load_settings(env={}).models)
    assert one.kv_cache == 0 and one.total == one.weights + one.overhead
    toml = tmp_path / "s.toml"
    toml.write_text("[models]\nembedding_batch_size = 64\n")
    assert estimate_model_memory(m, model_dir, load_settings(config=toml, env={}).models).total > one.total


def test_missing_file_is_a_model_store_error(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="cannot read"):
        estimate_model_memory(manifest("gone", kind="completion"), tmp_path, load_settings(env={}).models)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("6GB", MemoryLimit(bytes=6_000_000_000)),
        ("6GiB", MemoryLimit(bytes=6 << 30)),
        ("512 mib", MemoryLimit(bytes=512 << 20)),
        ("1.5GB", MemoryLimit(bytes=1_500_000_000)),
        ("6000000000", MemoryLimit(bytes=6_000_000_000)),
        (6_000_000_000, MemoryLimit(bytes=6_000_000_000)),
        ("75%", MemoryLimit(ram_fraction=0.75)),
        ("0", MemoryLimit()),
        (0, MemoryLimit()),
        ("", MemoryLimit()),
    ],
)
def test_max_memory_values(value: str | int, expected: MemoryLimit) -> None:
    assert parse_max_memory(value) == expected


@pytest.mark.parametrize("value", ["6XB", "lots", "-1GB", "0%", "101%", "6 G B"])
def test_bad_max_memory_names_the_setting(value: str) -> None:
    with pytest.raises(SettingsError, match="models.max_memory"):
        load_settings(env={"APPLIANCE_MAX_MEMORY": value})


def test_max_memory_from_toml_and_environment(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('[models]\nmax_memory = "2GiB"\n')
    assert max_memory_bytes(load_settings(config=toml, env={}).models) == 2 << 30
    toml.write_text("[models]\nmax_memory = 3000000000\n")
    assert max_memory_bytes(load_settings(config=toml, env={}).models) == 3_000_000_000
    env = {"APPLIANCE_MAX_MEMORY": "50%"}
    assert max_memory_bytes(load_settings(config=toml, env=env).models, ram=8 << 30) == 4 << 30
    assert max_memory_bytes(load_settings(env={}).models) == 0  # unlimited by default


def test_system_memory_is_known_here() -> None:
    assert system_memory_bytes() > 256 << 20


def test_estimate_models_leaves_out_split_and_unreadable_models(tmp_path: Path) -> None:
    for model_id in ("local", "split"):
        (tmp_path / model_id).mkdir()
        write_gqa_gguf(tmp_path / model_id / "model.bin")
    toml = tmp_path / "s.toml"
    toml.write_text('[models.rpc.split]\npeers = ["127.0.0.1:50052"]\n')
    models = load_settings(config=toml, env={}).models
    manifests = [manifest(i, kind="completion") for i in ("local", "split", "missing")]
    assert list(estimate_models(manifests, tmp_path, models)) == ["local"]
