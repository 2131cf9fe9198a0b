"""The split engine's pipe protocol (engines/split_messages.py): every message survives the codec,
errors keep their class, anything else is refused by name; and the child's message loop
(engines/split_child.py) against a fake scheduler over a real pipe."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import threading
from typing import Any

import msgspec
import pytest

from appliance.engines import split_messages as messages
from appliance.engines.split_child import _serve
from appliance.errors import (
    ApplianceError,
    ContextLengthExceeded,
    EngineError,
    PeerUnavailable,
    ServerOverloaded,
)
from appliance.types import (
    Chunk,
    EngineStats,
    GenerationRequest,
    SamplingParams,
    TokenAlternative,
    TokenLogprob,
    ToolGrammar,
    Usage,
)

REQUEST = GenerationRequest(
    prompt="Hello",
    prompt_ids=(1, 2, 3),
    max_tokens=16,
    stop=("\n\n",),
    sampling=SamplingParams(temperature=0.0, seed=2**40),
    tools=ToolGrammar(call_schema='{"type": "object"}', required=False, parallel=True),
    n=2,
    logprobs=2,
)
CHUNK = Chunk(
    text="ca\u00e9",
    finish_reason="stop",
    usage=Usage(prompt_tokens=3, completion_tokens=2),
    generated=2,
    index=1,
    logprobs=(TokenLogprob(token=b"\xc3", logprob=-0.5, top=(TokenAlternative(token=b"a", logprob=-1.25),)),),
)
STATS = EngineStats(
    requests=4, completed=3, cancelled=1, rejected={"queue_full": 2}, prompt_tokens=40, prefix_hit_tokens=8,
    prefix_cache_hit_rate=0.2, generated_tokens=12, mean_batch_tokens=3.5, ttft_p50_s=0.125, queue_depth=1, busy_slots=2,
)
ERROR = messages.WireError.of(ServerOverloaded("full", retry_after=7))

TO_CHILD = [messages.Submit(rid=7, request=REQUEST), messages.Cancel(rid=7), messages.Close()]
TO_SERVER = [
    messages.Ready(n_ctx=2048, devices=[
        messages.Device(name="RPC0", endpoint="127.0.0.1:50052", memory_free=1 << 33, memory_total=1 << 34),
        messages.Device(name="CUDA0", endpoint=None, memory_free=0, memory_total=0),
    ]),
    messages.LoadFailed(error=messages.WireError.of(PeerUnavailable("127.0.0.1:50052 is unreachable"))),
    messages.Heartbeat(stats=STATS),
    messages.Item(rid=7, chunk=CHUNK),
    messages.Failed(rid=7, error=ERROR),
    messages.Fatal(message="ggml_abort: remote RPC server crashed or returned malformed response"),
]


@pytest.mark.parametrize("message", TO_CHILD, ids=lambda m: type(m).__name__)
def test_each_message_to_the_child_survives_the_codec(message: messages.ToChild) -> None:
    assert messages.decode_to_child(messages.encode(message)) == message


@pytest.mark.parametrize("message", TO_SERVER, ids=lambda m: type(m).__name__)
def test_each_message_to_the_server_survives_the_codec(message: messages.ToServer) -> None:
    assert messages.decode_to_server(messages.encode(message)) == message


def test_every_kind_of_message_is_covered_and_tagged_apart() -> None:
    kinds = {type(m): msgspec.inspect.type_info(type(m)).tag for m in TO_CHILD + TO_SERVER}
    assert set(kinds) == {*messages.ToChild.__args__, *messages.ToServer.__args__}
    assert len(set(kinds.values())) == len(kinds)


def test_errors_cross_the_process_boundary_with_their_class_and_fields() -> None:
    error = messages.decode_to_server(messages.encode(messages.Failed(rid=1, error=ERROR)))
    assert isinstance(error, messages.Failed)
    exc = error.error.exception()
    assert type(exc) is ServerOverloaded and exc.message == "full" and exc.retry_after == 7
    assert exc.code == "server_overloaded" and exc.status == 503
    exc = messages.WireError.of(ContextLengthExceeded("too long", param="messages")).exception()
    assert type(exc) is ContextLengthExceeded and exc.param == "messages" and exc.status == 400
    assert isinstance(messages.WireError.of(PeerUnavailable("gone")).exception(), ApplianceError)


@pytest.mark.parametrize("name", ["NoSuchError", "annotations", "Exception", "ApplianceErrorX"])
def test_an_error_of_an_unknown_class_comes_back_as_an_engine_error(name: str) -> None:
    exc = messages.WireError(name=name, message="x", code="engine_error").exception()
    assert type(exc) is EngineError and exc.message == "x"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (msgspec.msgpack.encode({"kind": "reboot"}), "'reboot'"),
        (msgspec.msgpack.encode({"rid": 1}), "missing required field `kind`"),
        (msgspec.msgpack.encode({"kind": "submit", "rid": 1}), "missing required field `request`"),
        (msgspec.msgpack.encode({"kind": "cancel", "rid": "one"}), "Expected `int`"),
        (msgspec.msgpack.encode(["cancel", 1]), "Expected `object`"),
        (messages.encode(messages.Heartbeat(stats=STATS)), "'heartbeat'"),  # the other direction's
        (pickle.dumps(("cancel", 1)), "not a message for the model process"),  # the old tuple protocol
        (b"", "not a message for the model process"),
    ],
)
def test_the_child_refuses_what_is_not_a_message_for_it(data: bytes, why: str) -> None:
    with pytest.raises(messages.MalformedMessage, match="not a message for the model process") as err:
        messages.decode_to_child(data)
    assert why in str(err.value)


@pytest.mark.parametrize(
    "data",
    [
        messages.encode(messages.Close()),
        msgspec.msgpack.encode({"kind": "item", "rid": 1, "chunk": {"finish_reason": "stop"}}),
        msgspec.msgpack.encode({"kind": "item", "rid": 1, "chunk": {"text": "a", "finish_reason": "done"}}),
        msgspec.msgpack.encode({"kind": "heartbeat", "stats": {"queue_depth": "many"}}),
        b"\xc1",
    ],
)
def test_the_server_refuses_what_is_not_a_message_from_the_child(data: bytes) -> None:
    with pytest.raises(messages.MalformedMessage, match="not a message from the model process"):
        messages.decode_to_server(data)


# -- the child's message loop --------------------------------------------------------------------


class FakeScheduler:
    """Answers "ok" with one chunk, refuses "full" at once, and holds "wait" until it is cancelled."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def submit(self, request: GenerationRequest, emit: Any, cancel: threading.Event) -> None:
        if request.prompt == "full":
            raise ServerOverloaded("the queue is full")
        if request.prompt == "wait":
            threading.Thread(target=lambda: cancel.wait(10) and self.cancelled.set(), daemon=True).start()
            return
        emit(Chunk(text="hi", finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1), generated=1))


def test_the_child_serves_submit_cancel_and_close_over_a_pipe(caplog: pytest.LogCaptureFixture) -> None:
    server, child = multiprocessing.Pipe()
    scheduler = FakeScheduler()
    sent: list[messages.ToServer] = []
    loop = threading.Thread(target=_serve, args=(child, scheduler, sent.append), daemon=True)
    loop.start()

    def submit(rid: int, prompt: str) -> None:
        server.send_bytes(messages.encode(messages.Submit(rid=rid, request=GenerationRequest(prompt=prompt, max_tokens=4))))

    with caplog.at_level(logging.ERROR, logger="appliance.engines.split_child"):
        server.send_bytes(b"garbage")  # logged and passed over: the loop goes on
        submit(1, "ok")
        submit(2, "full")
        submit(3, "wait")
        server.send_bytes(messages.encode(messages.Cancel(rid=3)))
        server.send_bytes(messages.encode(messages.Close()))
        loop.join(5)
    assert not loop.is_alive()
    assert scheduler.cancelled.wait(5)
    assert [type(m) for m in sent] == [messages.Item, messages.Failed]
    item, failed = sent
    assert isinstance(item, messages.Item) and item.rid == 1 and item.chunk.text == "hi"
    assert isinstance(failed, messages.Failed) and failed.rid == 2
    assert type(failed.error.exception()) is ServerOverloaded
    assert "not a message for the model process" in caplog.text


def test_the_child_stops_when_the_server_is_gone() -> None:
    server, child = multiprocessing.Pipe()
    loop = threading.Thread(target=_serve, args=(child, FakeScheduler(), lambda m: None), daemon=True)
    loop.start()
    server.close()
    loop.join(5)
    assert not loop.is_alive()
