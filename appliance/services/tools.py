"""Tool calling for chat models: the prompt side and the output side.

Prompt: a model whose chat template renders `tools` gets them through its template, with the history's
calls and results in the Hugging Face message shape. Any other template gets the fallback format: a
system turn listing the functions (name, description, parameters schema) and saying how to call one,
assistant calls written back as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and tool results
as user turns wrapped in `<tool_response>`. That is the Hermes format, which Qwen 2.5's and Hermes'
templates ask for, so both paths parse the same output.

Output: the engine generates under a grammar (engines/llama.py `tools_gbnf`), so a call is always the
opener, one JSON object whose `arguments` match the function's schema, and the closer. `split_calls`
parses a whole answer; `ToolCallStream` parses one as it streams.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import jinja2
import jinja2.meta
import msgspec

from appliance.protocol.openai import ChatCompletionRequest, ChatMessage, ToolDef
from appliance.types import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


class ToolCall(msgspec.Struct, frozen=True):
    id: str
    name: str
    arguments: str
    """The arguments object as JSON text (OpenAI's shape)."""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def template_knows_tools(env: jinja2.Environment, source: str) -> bool:
    """Whether a chat template renders a `tools` variable (then it gets the tools itself)."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateSyntaxError:
        return False


def _tool_json(tool: ToolDef) -> dict[str, Any]:
    f = tool.function
    out: dict[str, Any] = {"name": f.name}
    if f.description:
        out["description"] = f.description
    out["parameters"] = f.parameters or {"type": "object", "properties": {}}
    return out


def template_tools(tools: list[ToolDef]) -> list[dict[str, Any]]:
    """The `tools` variable for a template that knows tools (the Hugging Face shape)."""
    return [{"type": "function", "function": _tool_json(t)} for t in tools]


def fallback_preamble(request: ChatCompletionRequest, tools: list[ToolDef]) -> str:
    """The system text that teaches a template without tool support how to call the functions."""
    listing = "\n".join(json.dumps(_tool_json(t), ensure_ascii=False) for t in tools)
    example = f'{TOOL_CALL_OPEN}{{"name": "<function name>", "arguments": {{<arguments>}}}}{TOOL_CALL_CLOSE}'
    lines = [
        "You can call these functions. Each is described by a JSON object with its name, what it does and a "
        "JSON schema of its arguments:",
        listing,
        f"To call a function, reply with {example}, the arguments following its schema.",
    ]
    if request.parallel_tool_calls and len(tools) > 0:
        lines.append("To call several, write one such block after another.")
    if request.tool_choice in (None, "auto"):
        lines.append("If no function is needed, answer in plain text instead.")
    lines.append("A function's result comes back between <tool_response> and </tool_response>.")
    return "\n".join(lines)


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def history(
    messages: list[ChatMessage], texts: list[str], *, fallback: bool
) -> list[dict[str, Any]]:
    """Template messages for a history that may hold calls and results; `texts` are the screened
    contents, one per message. The fallback writes calls and results as text in the Hermes format."""
    names = {c.id: c.function.name for m in messages for c in (m.tool_calls or [])}
    out: list[dict[str, Any]] = []
    for m, text in zip(messages, texts, strict=True):
        if m.role == "assistant" and m.tool_calls:
            if fallback:
                calls = "".join(
                    TOOL_CALL_OPEN
                    + json.dumps({"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                                 ensure_ascii=False)
                    + TOOL_CALL_CLOSE
                    for c in m.tool_calls
                )
                out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
            else:
                out.append({
                    "role": "assistant",
                    "content": text,
                    "tool_calls": [
                        {"id": c.id, "type": "function",
                         "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                        for c in m.tool_calls
                    ],
                })
        elif m.role == "tool":
            if fallback:
                name = names.get(m.tool_call_id or "", m.name or "")
                label = f" name={json.dumps(name)}" if name else ""
                out.append({"role": "user", "content": f"<tool_response{label}>\n{text}\n</tool_response>"})
            else:
                out.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id, "name": m.name})
        else:
            out.append({"role": m.role, "content": text})
    if fallback:
        # templates without tool support know no `tool` role; consecutive results become one user turn
        merged: list[dict[str, Any]] = []
        for msg in out:
            if merged and msg["role"] == "user" and merged[-1]["role"] == "user" and \
                    msg["content"].startswith("<tool_response") and merged[-1]["content"].startswith("<tool_response"):
                merged[-1] = {"role": "user", "content": merged[-1]["content"] + "\n" + msg["content"]}
            else:
                merged.append(msg)
        out = merged
    return out


def _parse_block(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        parsed = _arguments(arguments)
        arguments = parsed if isinstance(parsed, dict) else arguments
    return ToolCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def split_calls(text: str) -> tuple[str | None, list[ToolCall], bool]:
    """(content, calls, complete) of a whole answer. An answer that opens with a call is calls only;
    `complete` is False when the last call was cut off (max_tokens) or did not parse."""
    rest = text.lstrip()
    if not rest.startswith(TOOL_CALL_OPEN):
        return text, [], True
    calls: list[ToolCall] = []
    while rest.startswith(TOOL_CALL_OPEN):
        end = rest.find(TOOL_CALL_CLOSE)
        if end < 0:
            return None, calls, False
        call = _parse_block(rest[len(TOOL_CALL_OPEN):end])
        if call is None:
            return None, calls, False
        calls.append(call)
        rest = rest[end + len(TOOL_CALL_CLOSE):].lstrip()
    return None, calls, not rest


class ToolCallStream:
    """Splits a streamed answer into text pieces and whole calls, deciding at the first non-space
    character: the call opener means calls, anything else means text (passed through as it comes)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._mode: str | None = None  # None (undecided) | "text" | "calls"
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Text to pass on now, and the calls completed by this piece."""
        if self._mode == "text":
            return text, []
        self._buffer += text
        if self._mode is None:
            stripped = self._buffer.lstrip()
            if not stripped:
                return "", []
            if not TOOL_CALL_OPEN.startswith(stripped[: len(TOOL_CALL_OPEN)]):
                self._mode = "text"
                out, self._buffer = self._buffer, ""
                return out, []
            if len(stripped) < len(TOOL_CALL_OPEN):
                return "", []  # a prefix of the opener: wait for more
            self._mode = "calls"
        done: list[ToolCall] = []
        while True:
            stripped = self._buffer.lstrip()
            end = stripped.find(TOOL_CALL_CLOSE)
            if not stripped.startswith(TOOL_CALL_OPEN) or end < 0:
                break
            call = _parse_block(stripped[len(TOOL_CALL_OPEN):end])
            if call is not None:
                done.append(call)
            self._buffer = stripped[end + len(TOOL_CALL_CLOSE):]
        self.calls += done
        return "", done

    def finish(self) -> str:
        """Text still held back at the end of an answer that never decided (a prefix of the opener).
        A call that never closed (max_tokens) is dropped, as `split_calls` drops it."""
        out, self._buffer = ("" if self._mode == "calls" else self._buffer), ""
        return out

    @property
    def in_calls(self) -> bool:
        return self._mode == "calls"
