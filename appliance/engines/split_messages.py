"""The messages between a split model's server-side proxy (engines/split.py) and its child process
(engines/split_child.py), over their multiprocessing pipe.

One tagged msgspec Struct per kind of message and one Union per direction; each message crosses as
msgpack bytes (`Connection.send_bytes`) and is decoded with its direction's Union, so that a message
of another kind, or with a field missing or of the wrong type, is refused by name instead of being
misread.
"""

from __future__ import annotations

import msgspec

from appliance import errors
from appliance.errors import ApplianceError, EngineError
from appliance.types import Chunk, EngineStats, GenerationRequest


class MalformedMessage(Exception):
    """Bytes on the pipe that are not a message of the expected direction (a bug, never a user's error)."""


class WireError(msgspec.Struct, frozen=True, kw_only=True):
    """An ApplianceError across the pipe: its class by name and its fields."""

    name: str
    """The class in appliance.errors; an unknown name comes back as EngineError."""
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None

    @classmethod
    def of(cls, exc: ApplianceError) -> WireError:
        return cls(
            name=type(exc).__name__, message=exc.message, param=exc.param, code=exc.code,
            retry_after=exc.retry_after,
        )

    def exception(self) -> ApplianceError:
        error_class = getattr(errors, self.name, None)
        if not (isinstance(error_class, type) and issubclass(error_class, ApplianceError)):
            error_class = EngineError
        return error_class(self.message, param=self.param, code=self.code, retry_after=self.retry_after)


class Device(msgspec.Struct, frozen=True, kw_only=True):
    """A device the model is offloaded to: a worker's (endpoint host:port) or a local GPU (endpoint None)."""

    name: str
    endpoint: str | None
    memory_free: int
    memory_total: int


# -- server to child -----------------------------------------------------------------------------


class _ToChild(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    pass


class Submit(_ToChild, tag="submit"):
    """Generate for this request; its chunks come back as Item messages with the same rid."""

    rid: int
    request: GenerationRequest


class Cancel(_ToChild, tag="cancel"):
    rid: int


class Close(_ToChild, tag="close"):
    """Stop the scheduler and exit."""


ToChild = Submit | Cancel | Close


# -- child to server -----------------------------------------------------------------------------


class _ToServer(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    pass


class Ready(_ToServer, tag="ready"):
    """The model is loaded and the child takes Submit messages."""

    n_ctx: int
    devices: list[Device]


class LoadFailed(_ToServer, tag="load_failed"):
    """Loading failed; the child exits after sending this."""

    error: WireError


class Heartbeat(_ToServer, tag="heartbeat"):
    """Every worker answered a ping; the scheduler's statistics as of now."""

    stats: EngineStats


class Item(_ToServer, tag="item"):
    """A chunk of request rid's output (its last one has a finish_reason)."""

    rid: int
    chunk: Chunk


class Failed(_ToServer, tag="failed"):
    """Request rid failed; nothing more comes for it."""

    rid: int
    error: WireError


class Fatal(_ToServer, tag="fatal"):
    """ggml's abort message, sent just before the child dies."""

    message: str


ToServer = Ready | LoadFailed | Heartbeat | Item | Failed | Fatal


# -- the codec -----------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_to_child = msgspec.msgpack.Decoder(ToChild)
_to_server = msgspec.msgpack.Decoder(ToServer)


def encode(message: ToChild | ToServer) -> bytes:
    return _encoder.encode(message)


def decode_to_child(data: bytes) -> ToChild:
    """A message from the server; MalformedMessage if the bytes are not one."""
    try:
        return _to_child.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise MalformedMessage(f"not a message for the model process: {exc}") from None


def decode_to_server(data: bytes) -> ToServer:
    """A message from the child; MalformedMessage if the bytes are not one."""
    try:
        return _to_server.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise MalformedMessage(f"not a message from the model process: {exc}") from None
