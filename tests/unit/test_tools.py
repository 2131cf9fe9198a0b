"""Tool calling: the request's checks and grammar, the prompt (native template or fallback), the parsers."""

from __future__ import annotations

import json

import jinja2.sandbox
import msgspec
import pytest

from appliance.errors import InvalidRequest
from appliance.protocol.openai import ChatCompletionRequest, decode_request
from appliance.services.tools import ToolCallStream, fallback_preamble, history, split_calls, template_knows_tools

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def request(**kw: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    req = decode_request(json.dumps(body).encode(), ChatCompletionRequest)
    req.check()
    return req


def test_grammar_follows_tool_choice() -> None:
    auto = request(tools=[ADD, WEATHER]).tool_grammar()
    assert auto is not None and not auto.required and auto.parallel
    schema = json.loads(auto.call_schema)
    assert [a["properties"]["name"]["const"] for a in schema["anyOf"]] == ["add", "get_weather"]
    assert schema["anyOf"][0]["properties"]["arguments"] == ADD["function"]["parameters"]
    named = request(tools=[ADD, WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    g = named.tool_grammar()
    assert g is not None and g.required and not g.parallel
    assert json.loads(g.call_schema)["properties"]["name"]["const"] == "get_weather"
    assert request(tools=[ADD], tool_choice="required", parallel_tool_calls=False).tool_grammar().parallel is False  # type: ignore[union-attr]
    assert request(tools=[ADD], tool_choice="none").tool_grammar() is None


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [ADD, ADD]}, "tools"),
    ({"tools": [ADD], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [ADD], "collection": "docs"}, "tools"),
])
def test_bad_tool_requests_name_the_parameter(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        request(**body)
    assert info.value.param == param


def test_bad_function_name_is_a_validation_error() -> None:
    bad = {"type": "function", "function": {"name": "has spaces"}}
    with pytest.raises(InvalidRequest) as info:
        request(tools=[bad])
    assert info.value.param == "tools[0].function.name"


def test_unsupported_schema_cannot_become_a_grammar() -> None:
    from appliance.engines.llama import tools_gbnf

    req = request(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "https://example.com/remote.json"}}}}}])
    with pytest.raises(InvalidRequest) as info:
        tools_gbnf(req.tool_grammar())  # type: ignore[arg-type]
    assert info.value.param == "tools"


def test_grammar_text() -> None:
    from appliance.engines.llama import tools_gbnf

    auto = tools_gbnf(request(tools=[ADD]).tool_grammar())  # type: ignore[arg-type]
    assert auto.startswith("root ::= tc-calls | tc-text\n") and 'tc-text ::= [^<]' in auto
    required = tools_gbnf(request(tools=[ADD], tool_choice="required", parallel_tool_calls=False).tool_grammar())  # type: ignore[arg-type]
    assert required.startswith("root ::= tc-calls\n") and "tc-text" not in required and ")*" not in required.splitlines()[1]


def test_split_calls() -> None:
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls, complete = split_calls(text)
    assert content is None and complete
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    assert split_calls("plain answer") == ("plain answer", [], True)
    cut = split_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>{"name": "ad')
    assert cut[0] is None and len(cut[1]) == 1 and cut[2] is False


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_stream_parses_at_any_chunk_boundary(size: int) -> None:
    text = ' <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>'
    stream = ToolCallStream()
    out, calls = "", []
    for i in range(0, len(text), size):
        piece, done = stream.feed(text[i:i + size])
        out += piece
        calls += done
    out += stream.finish()
    assert out == "" and [json.loads(c.arguments) for c in calls] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_stream_passes_text_through(size: int) -> None:
    text = "No function is needed: 2 + 2 = 4. <tool_call> inside text stays text."
    stream = ToolCallStream()
    out = ""
    for i in range(0, len(text), size):
        piece, done = stream.feed(text[i:i + size])
        assert done == []
        out += piece
    assert out + stream.finish() == text


def test_stream_drops_a_cut_off_call_and_keeps_an_undecided_prefix() -> None:
    cut = ToolCallStream()
    assert cut.feed('<tool_call>{"name": "add", "argu') == ("", [])
    assert cut.finish() == ""
    undecided = ToolCallStream()
    assert undecided.feed("<to") == ("", [])
    assert undecided.finish() == "<to"


def test_fallback_history_writes_calls_and_results_as_text() -> None:
    req = decode_request(json.dumps({"model": "m", "tools": [ADD], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]}).encode(), ChatCompletionRequest)
    texts = [m.text(i) for i, m in enumerate(req.messages)]
    msgs = history(req.messages, texts, fallback=True)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    assert msgs[3]["content"] == '<tool_response name="add">\n3\n</tool_response>'
    native = history(req.messages, texts, fallback=False)
    assert native[2]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert native[3] == {"role": "tool", "content": "3", "tool_call_id": "call_1", "name": None}
    preamble = fallback_preamble(req, req.active_tools())
    assert '"name": "add"' in preamble and "<tool_call>" in preamble and "plain text" in preamble


def test_template_knows_tools() -> None:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    assert template_knows_tools(env, "{% if tools %}{{ tools | tojson }}{% endif %}{{ messages[0].content }}")
    assert not template_knows_tools(env, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_knows_tools(env, "{% broken")


def test_tool_call_wire_types_round_trip() -> None:
    from appliance.protocol.responses import AssistantMessage, FunctionCallOut, ToolCallOut

    msg = msgspec.json.decode(msgspec.json.encode(AssistantMessage(None, tool_calls=[
        ToolCallOut("call_1", FunctionCallOut("add", '{"a": 1}'))])))
    assert msg == {"content": None, "role": "assistant",
                   "tool_calls": [{"id": "call_1", "function": {"name": "add", "arguments": '{"a": 1}'}, "type": "function"}]}
