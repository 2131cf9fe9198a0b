"""The official `openai` client against the real server process and the bundled models."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import math

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from tests.e2e.conftest import Server

GREEDY_PROMPT = "The capital of France is"
# Gemma 3 270M Q4_K_M, greedy, 20 tokens: fixed by the model file (sha256-pinned in models/).
GREEDY_TEXT = " the capital of the country of France. It is the largest city in France. It is the capital"


def test_models_list(client: OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"gemma3-270m", "smollm2-135m", "all-minilm-l6-v2"} <= ids  # the bundled defaults (and the guardrails' classifiers)
    assert client.models.retrieve("gemma3").id == "gemma3-270m"


def test_greedy_completion_is_exact(client: OpenAI) -> None:
    resp = client.completions.create(model="gemma3-270m", prompt=GREEDY_PROMPT, max_tokens=20, temperature=0)
    assert resp.choices[0].text == GREEDY_TEXT
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (6, 20)


def test_greedy_matches_raw_llama_cpp(client: OpenAI, data_dir) -> None:  # type: ignore[no-untyped-def]
    import llama_cpp

    import appliance.engines.llama  # noqa: F401  loads the backend modules of a GGML_BACKEND_DL (portable) build

    path = data_dir / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    # flash attention as the server's default (models.flash_attn = "auto" uses it on this CPU)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=4096, flash_attn=True, verbose=False)
    prompt = "Q: Name three colours of the rainbow.\nA:"
    raw = llm.create_completion(prompt, max_tokens=40, temperature=0)
    ours = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=40, temperature=0)
    assert ours.choices[0].text == raw["choices"][0]["text"]
    assert ours.usage.completion_tokens == raw["usage"]["completion_tokens"]


def test_chat_stream_equals_non_stream(client: OpenAI) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of Italy?"}]
    full = client.chat.completions.create(model="gemma3", messages=messages, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model="gemma3", messages=messages, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert text  # the model said something
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert "<end_of_turn>" not in text and "<start_of_turn>" not in text


def test_stop_strings_cut_output(client: OpenAI) -> None:
    resp = client.completions.create(model="gemma3-270m", prompt=GREEDY_PROMPT, max_tokens=20, temperature=0, stop=["France"])
    assert resp.choices[0].text == " the capital of the country of "
    assert resp.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client: OpenAI) -> None:
    kw = dict(model="gemma3-270m", prompt="Once upon a time", max_tokens=24, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b


# Continuations the model is sure of: llama.cpp's numerics depend slightly on batch composition, so
# only near-tie tokens can differ between a batched and a lone run; these have none in 6 tokens.
CONFIDENT = [
    "1, 2, 3, 4, 5, 6,",
    "a, b, c, d, e, f,",
    "Monday, Tuesday, Wednesday,",
    "January, February, March,",
    "10, 20, 30, 40, 50,",
    "A B C D E F G",
    "one two three four five",
    "2, 4, 6, 8, 10,",
]


def test_eight_concurrent_streams_match_lone_runs(client: OpenAI) -> None:
    def run(prompt: str) -> str:
        return client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=6, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    alone = [run(p) for p in CONFIDENT]
    assert alone[0].startswith(" 7, 8") and alone[5].startswith(" H I J")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, CONFIDENT))
        again = list(pool.map(run, CONFIDENT))
    assert together == alone
    assert again == alone


def test_json_response_format_constrains_output(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    resp = client.chat.completions.create(
        model="gemma3",
        messages=[{"role": "user", "content": "Give the largest city of France and its population as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        max_tokens=60,
        temperature=0,
    )
    data = json.loads(resp.choices[0].message.content)
    assert set(data) == {"city", "population"}
    assert isinstance(data["city"], str) and isinstance(data["population"], int)


def embed(client: OpenAI, texts: list[str]) -> np.ndarray:
    resp = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    return np.array([d.embedding for d in resp.data])


def test_embeddings_shape_norm_and_similarity(client: OpenAI) -> None:
    v = embed(client, ["A cat sits on the mat.", "A kitten is resting on a rug.", "Quarterly tax filing deadlines."])
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    single = client.embeddings.create(model="minilm", input="A cat sits on the mat.")
    assert np.allclose(single.data[0].embedding, v[0], atol=1e-5)  # batching does not change results
    assert single.usage.prompt_tokens > 0


def test_embedding_usage_counts_each_input_unpadded(client: OpenAI) -> None:
    texts = ["hi", "A considerably longer sentence that has many more tokens than the first one does."]
    singles = [client.embeddings.create(model="minilm", input=t).usage.prompt_tokens for t in texts]
    both = client.embeddings.create(model="minilm", input=texts).usage.prompt_tokens
    assert singles[0] == 3  # [CLS] hi [SEP]
    assert both == sum(singles)


def test_embeddings_base64(server: Server) -> None:
    body = {"model": "all-minilm-l6-v2", "input": ["hello world"]}
    floats = httpx.post(f"{server.url}/v1/embeddings", json=body).json()["data"][0]["embedding"]
    b64 = httpx.post(f"{server.url}/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    assert decoded.shape == (384,)
    assert np.allclose(decoded, floats, atol=1e-6)


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_bad_parameters_are_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma3", messages=[{"role": "user", "content": "hi"}], temperature=7)
    assert info.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="gemma3", input="chat model cannot embed")


def test_models_report_the_context_a_request_can_use(client: OpenAI) -> None:
    card = client.models.retrieve("gemma3").model_dump()
    # models.n_ctx (4096 by default) caps Gemma 3's trained 32,768 tokens
    assert (card["context_length"], card["trained_context_length"]) == (4096, 32768)
    listed = {m.id: m.model_dump() for m in client.models.list()}
    assert listed["all-minilm-l6-v2"]["context_length"] == 256
    # a prompt that fits the reported window is served; one past it is refused
    fits = client.completions.create(model="gemma3", prompt="data " * (card["context_length"] - 64), max_tokens=1)
    assert fits.usage is not None and fits.usage.prompt_tokens < card["context_length"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="gemma3", prompt="data " * (card["context_length"] + 10), max_tokens=1)
    assert "maximum context length is 4096 tokens" in info.value.body["message"]  # type: ignore[index]


def test_prompt_longer_than_context_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="gemma3-270m", prompt="data " * 6000, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert info.value.body["param"] == "prompt"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma3", messages=[{"role": "user", "content": "data " * 6000}])
    assert info.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="minilm", input="word " * 400)
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_malformed_and_oversized_bodies(server: Server) -> None:
    resp = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "gemma3", "messages": [', headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    big = json.dumps({"model": "gemma3-270m", "prompt": "x" * (9 * 1024 * 1024)})
    resp = httpx.post(f"{server.url}/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_health_and_version(server: Server) -> None:
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok"
    assert {m["state"] for m in health["models"].values()} == {"ready"}
    version = httpx.get(f"{server.url}/version").json()
    assert version["version"] and version["llama_cpp_python"] == "0.3.36"
    assert math.isfinite(health["models"]["gemma3-270m"]["load_seconds"])


def test_logprobs_are_the_models_distribution(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model="gemma3", messages=[{"role": "user", "content": "The capital of France is"}],
        temperature=0, max_tokens=6, logprobs=True, top_logprobs=3,
    )
    content = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == resp.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one, and its logprob is the top one
        assert t.top_logprobs[0].token == t.token and math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-6)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert bytes(t.bytes or []).decode("utf-8", "replace") == t.token
    legacy = client.completions.create(model="gemma3", prompt=GREEDY_PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert lp is not None and "".join(lp.tokens or []) == legacy.choices[0].text
    assert all(max(top.values()) == pytest.approx(tok) for top, tok in zip(lp.top_logprobs or [], lp.token_logprobs or []))


def test_n_choices_share_a_prefill_and_are_reproducible(client: OpenAI, server: Server) -> None:
    def ask() -> object:
        return client.chat.completions.create(
            model="gemma3", messages=[{"role": "user", "content": "Write a word about the sea."}],
            n=3, seed=7, temperature=1.0, max_tokens=12, logprobs=True,
        )

    first, second = ask(), ask()
    texts = [c.message.content for c in first.choices]  # type: ignore[attr-defined]
    assert [c.index for c in first.choices] == [0, 1, 2]  # type: ignore[attr-defined]
    assert texts == [c.message.content for c in second.choices]  # type: ignore[attr-defined]
    assert len(set(texts)) > 1  # each choice draws from its own seed
    # metered as the sum: the prompt once, every choice's tokens
    usage = first.usage  # type: ignore[attr-defined]
    assert usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)  # type: ignore[attr-defined]
    one = client.chat.completions.create(
        model="gemma3", messages=[{"role": "user", "content": "Write a word about the sea."}], max_tokens=1)
    assert usage.prompt_tokens == one.usage.prompt_tokens  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model="gemma3", messages=[{"role": "user", "content": "Write a word about the sea."}],
        n=2, seed=7, temperature=1.0, max_tokens=12, stream=True, stream_options={"include_usage": True},
    )
    got: dict[int, str] = {}
    finished = set()
    total = None
    for chunk in stream:
        for c in chunk.choices:
            got[c.index] = got.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
        if chunk.usage is not None:
            total = chunk.usage.completion_tokens
    assert finished == {0, 1} and got == {0: texts[0], 1: texts[1]}
    assert total is not None and total >= 2
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma3", messages=[{"role": "user", "content": "x"}], n=9)
    assert info.value.body["param"] == "n"  # type: ignore[index]
