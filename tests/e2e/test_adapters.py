"""LoRA adapters on the real Gemma 3 270M: small real adapters written with the `gguf` writer, imported by
the real CLI, decoded by the batch engine beside the base model, and served by the real server."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from appliance.engines.factory import BatchSpec, build_batch_engine
from appliance.types import AdapterRef
from tests.e2e.conftest import REPO, Server, fresh_data_dir, start_server, stop_server
from tests.e2e.test_prefix_sharing import greedy_text, submit_greedy
from tests.e2e.test_routing import chat_models  # noqa: F401  (fixture: the two bundled chat models)
from tests.lora_gguf import write_lora

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma_file(chat_models: Path) -> Path:  # noqa: F811
    return next((chat_models / "models" / "gemma3-270m").glob("*.gguf"))


@pytest.fixture(scope="module")
def lora_files(gemma_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("lora")
    return {name: write_lora(gemma_file, out / f"{name}.gguf", seed=seed) for name, seed in (("tone", 1), ("legal", 2))}


def _llama_cpp_greedy(model: Path, lora: Path | None) -> str:
    """llama.cpp's own answer through llama-cpp-python's high-level API (`Llama(lora_path=...)`)."""
    from llama_cpp import Llama

    llm = Llama(str(model), lora_path=str(lora) if lora else None, n_ctx=1024, n_threads=2, flash_attn=True, verbose=False)
    try:
        return llm(PROMPT, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def test_adapter_output_is_llama_cpps_own_and_the_base_is_unchanged(gemma_file: Path, lora_files: dict[str, Path]) -> None:
    expected = {name: _llama_cpp_greedy(gemma_file, path) for name, path in [("base", None), *lora_files.items()]}
    assert len(set(expected.values())) == 3, "the test adapters must change the greedy answer"
    adapters = {"base": None, **{name: AdapterRef(name, str(path)) for name, path in lora_files.items()}}
    engine = build_batch_engine(BatchSpec(
        model_id="gemma3-270m", model_path=gemma_file, n_ctx_per_seq=1024, n_seq_max=4, n_batch=128, n_threads=2,
        gpu_layers=0, max_queue=8, prefix_min_tokens=32, queue_timeout_s=120, request_timeout_s=600,
    ))
    try:
        # A lone request with an adapter answers as llama.cpp does with that adapter.
        for name in ("tone", "base"):
            assert greedy_text(submit_greedy(engine, PROMPT, adapter=adapters[name])) == expected[name], name
        # Base, both adapters and base again at the same time: each its own answer, the base model's unchanged.
        order = ["base", "tone", "legal", "base"]
        running = [submit_greedy(engine, PROMPT, adapter=adapters[name]) for name in order]
        assert [greedy_text(q) for q in running] == [expected[name] for name in order]
    finally:
        engine.close()


def _cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "models", *args, "--data-dir", str(data)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )


def test_import_checks_an_adapter_against_its_base(
    chat_models: Path, gemma_file: Path, lora_files: dict[str, Path], tmp_path: Path,  # noqa: F811
) -> None:
    data = fresh_data_dir(chat_models, tmp_path / "data")
    bad = {
        "other architecture": (write_lora(gemma_file, tmp_path / "llama.gguf", arch="llama"),
                               "is an adapter for architecture 'llama', but gemma3-270m is 'gemma3'"),
        "other sizes": (write_lora(gemma_file, tmp_path / "narrow.gguf", width=320),
                        "do not fit gemma3-270m (lora_a [320, 8]"),
        "inner sizes": (write_lora(gemma_file, tmp_path / "ranks.gguf", rank_b=4), "do not fit gemma3-270m"),
        "lora_a alone": (write_lora(gemma_file, tmp_path / "half.gguf", drop_b=True), "has no matching lora_b tensor"),
        "a model, not an adapter": (gemma_file, "is not a LoRA adapter (its general.type is 'model'"),
    }
    for case, (path, message) in bad.items():
        done = _cli(data, "import", str(path), "--kind", "adapter", "--base", "gemma3-270m", "--id", "bad")
        assert done.returncode != 0 and message in done.stderr, (case, done.stderr)
    smol = _cli(data, "import", str(lora_files["tone"]), "--kind", "adapter", "--base", "smollm2-135m", "--id", "bad")
    assert "is an adapter for architecture 'gemma3', but smollm2-135m is 'llama'" in smol.stderr
    for args, message in [
        (("--base", "nope"), "no model named 'nope'"),
        (("--kind", "adapter"), "--base MODEL"),
        (("--kind", "adapter", "--base", "gemma3-270m", "--id", "a:b"), "so no ':'"),
    ]:
        done = _cli(data, "import", str(lora_files["tone"]), *args)
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr)
    # Nothing of a refused import is left behind.
    assert sorted(p.name for p in (data / "models").iterdir()) == ["gemma3-270m", "smollm2-135m"]
    good = _cli(data, "import", str(lora_files["tone"]), "--kind", "adapter", "--base", "gemma3-270m", "--id", "tone")
    assert good.returncode == 0, good.stderr
    listed = _cli(data, "list")
    assert "adapter of gemma3-270m: use gemma3-270m:tone" in listed.stdout
    refused = _cli(data, "remove", "gemma3-270m")
    assert refused.returncode != 0 and "is the base of adapters tone: remove them first" in refused.stderr


@pytest.fixture(scope="module")
def adapted_server(
    chat_models: Path, lora_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
) -> Server:
    base = tmp_path_factory.mktemp("adapted")
    data = fresh_data_dir(chat_models, base / "data")
    for name, path in lora_files.items():
        done = _cli(data, "import", str(path), "--kind", "adapter", "--base", "gemma3-270m", "--id", name)
        assert done.returncode == 0, done.stderr
    server = start_server(data, base / "server.log", env={"APPLIANCE_PARALLEL": "4", **os.environ})
    yield server
    stop_server(server)
    assert "Traceback" not in server.log.read_text()


def _complete(client: openai.OpenAI, model: str, **extra: object) -> str:
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, extra_body=extra or None)
    # The answer names the model that served it: the adapter's id when the field chose one.
    assert reply.model == (f"{model}:{extra['adapter']}" if "adapter" in extra else model)
    return reply.choices[0].text


def test_the_server_serves_adapters_by_name_beside_the_base(adapted_server: Server) -> None:
    client = adapted_server.client()
    ids = {m.id for m in client.models.list().data}
    assert {"gemma3-270m", "gemma3-270m:tone", "gemma3-270m:legal"} <= ids and "tone" not in ids
    lone = {model: _complete(client, model) for model in ("gemma3-270m", "gemma3-270m:tone", "gemma3-270m:legal")}
    assert len(set(lone.values())) == 3
    # The request field is the same as the model id, for clients that cannot change the model name.
    assert _complete(client, "gemma3-270m", adapter="tone") == lone["gemma3-270m:tone"]
    # Chat streams too; all three at once are batched and each keeps its own answer.
    order = ["gemma3-270m:legal", "gemma3-270m", "gemma3-270m:tone"] * 2
    with ThreadPoolExecutor(len(order)) as pool:
        together = list(pool.map(lambda m: _complete(adapted_server.client(), m), order))
    assert together == [lone[m] for m in order]
    stream = client.chat.completions.create(
        model="gemma3-270m:tone", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.NotFoundError, match="gemma3-270m has no adapter 'nope' \\(its adapters: legal, tone\\)"):
        _complete(client, "gemma3-270m:nope")
    with pytest.raises(openai.BadRequestError, match="is for model gemma3-270m, not smollm2-135m"):
        _complete(client, "smollm2-135m", adapter="tone")
    assert _complete(client, "gemma3-270m") == lone["gemma3-270m"]
