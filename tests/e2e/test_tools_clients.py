"""Tool calling with the bundled Gemma model through the official `openai` client and LangChain
(chat, embeddings, bind_tools with the tool executed and its result sent back)."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI

from tests.e2e.conftest import Server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _valid(arguments: str, schema: dict) -> dict:
    """The arguments parse and follow the schema's required keys, types and enums."""
    value = json.loads(arguments)
    assert set(schema["required"]) <= set(value)
    for key, rule in schema["properties"].items():
        if key in value:
            assert isinstance(value[key], {"string": str, "integer": int}[rule["type"]])
            assert value[key] in rule.get("enum", [value[key]])
    return value


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_call_follows_the_schema(client: OpenAI, choice: object) -> None:
    resp = client.chat.completions.create(
        model="gemma3", messages=ASK, tools=[WEATHER, ADD], tool_choice=choice,  # type: ignore[arg-type]
        parallel_tool_calls=False, temperature=0, max_tokens=60,
    )
    c = resp.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    [call] = c.message.tool_calls  # type: ignore[misc]
    assert call.id.startswith("call_") and call.type == "function"
    schema = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]["parameters"]
    _valid(call.function.arguments, schema)
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"


def test_streamed_call(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gemma3", messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=60, stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content  # the call's markup never leaks as text
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            entry["name"] += d.function.name or ""  # type: ignore[union-attr]
            entry["arguments"] += d.function.arguments or ""  # type: ignore[union-attr]
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    _valid(calls[0]["arguments"], WEATHER["function"]["parameters"])


def test_auto_is_the_models_choice_and_never_malformed(client: OpenAI) -> None:
    resp = client.chat.completions.create(model="gemma3", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=30)
    message = resp.choices[0].message
    # the 270M base model mostly answers in text under auto; whichever it picks, the shape is whole
    assert (message.tool_calls is None) != (message.content is None)
    for call in message.tool_calls or []:
        _valid(call.function.arguments, WEATHER["function"]["parameters"])


def test_bad_tool_input_is_400_and_the_server_keeps_serving(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma3", messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"  # type: ignore[index]
    remote = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "https://example.com/x.json"}}}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma3", messages=ASK, tools=[remote], tool_choice="required")
    assert info.value.body["param"] == "tools"  # type: ignore[index]
    ok = client.chat.completions.create(model="gemma3", messages=ASK, max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_langchain_bind_tools_round_trip(server: Server) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="not-needed", model="gemma3", temperature=0,
                     max_tokens=40, max_retries=0)  # type: ignore[call-arg]
    asked = [HumanMessage("What is 2 plus 3? Use the add tool.")]
    ai = llm.bind_tools([add], tool_choice="add", parallel_tool_calls=False).invoke(asked)
    [call] = ai.tool_calls
    assert call["name"] == "add" and isinstance(call["args"]["a"], int) and isinstance(call["args"]["b"], int)
    result = add.invoke(call["args"])
    answer = llm.bind_tools([add]).invoke([*asked, ai, ToolMessage(str(result), tool_call_id=call["id"])])
    assert isinstance(answer.content, str)  # the history with the call and its result was accepted


def test_langchain_chat_and_embeddings(server: Server) -> None:
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="not-needed", model="gemma3", temperature=0,
                     max_tokens=8, max_retries=0)  # type: ignore[call-arg]
    assert isinstance(llm.invoke("The capital of France is").content, str)
    # check_embedding_ctx_length=False: LangChain's default token counting downloads a tokenizer (offline: fails)
    emb = OpenAIEmbeddings(base_url=f"{server.url}/v1", api_key="not-needed", model="all-minilm-l6-v2",  # type: ignore[call-arg]
                           check_embedding_ctx_length=False, max_retries=0)
    vectors = emb.embed_documents(["valve torque", "pump pressure"])
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert len(emb.embed_query("valve")) == 384


def test_responses_api_with_the_openai_sdk(client: OpenAI) -> None:
    resp = client.responses.create(model="gemma3", input="The capital of France is", instructions="Answer briefly.",
                                   max_output_tokens=8, temperature=0)
    assert resp.status in ("completed", "incomplete") and resp.output_text
    assert resp.usage is not None and resp.usage.output_tokens <= 8
    deltas, last = [], None
    for event in client.responses.create(model="gemma3", input="The capital of France is", instructions="Answer briefly.",
                                         max_output_tokens=8, temperature=0, stream=True):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        last = event
    # cut at max_output_tokens: OpenAI's stream then ends with response.incomplete, not response.completed
    assert last is not None and last.type in ("response.completed", "response.incomplete")
    assert "".join(deltas) == last.response.output_text == resp.output_text  # type: ignore[union-attr]
