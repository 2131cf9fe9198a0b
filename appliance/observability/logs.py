"""Structured logs: one JSON object per line, with the request id, PII redacted from the message.

The redactor is the guardrails' PII masker; log records never carry request text on purpose, and
the redactor is the second line of defence for anything that slips into a message or exception.
It masks what users sent, not the server's own configuration: the addresses the server binds and
talks to (`server_addresses`) are known at start and stay readable, so the log says where it listens.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from appliance.settings import Settings

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
Redactor = Callable[[str], str]
LOOPBACK = ("127.0.0.1", "::1")


def _unchanged(text: str) -> str:
    return text


def server_addresses(settings: Settings) -> frozenset[str]:
    """The hosts in the server's own configuration: the bound host, cluster peers, RPC workers, loopback."""
    hosts = {settings.server.host.strip("[]"), *LOOPBACK}
    hosts.update(urlsplit(peer.url).hostname or "" for peer in settings.cluster.peers)
    hosts.update(worker.rpartition(":")[0] for split in settings.models.rpc.values() for worker in split.peers)
    return frozenset(h for h in hosts if h)


def _kept_value(value: str) -> str:
    """A pattern for `value` standing alone, with the boundaries the PII detector gives an address: not
    a part of a longer address, an email or a name ("10.0.0.2" is not kept in "10.0.0.23" or "a@10.0.0.2")."""
    if ":" in value:  # IPv6: a neighbouring colon or hex digit makes it another address
        return rf"(?<![\w:.@]){re.escape(value)}(?![\w:]|\.\w)"
    return rf"(?<![\w.@-]){re.escape(value)}(?![\w@-]|\.\w)"


class KeepingRedactor:
    """`redact` for log lines, except that the given values (the server's own addresses) stay as they are.

    Each kept value is swapped for a token of private-use characters that no PII rule matches, the
    text is redacted, and the values are put back: one redaction, so placeholders number as before.
    Picklable (a split engine's child process logs with it too).
    """

    _OPEN, _CLOSE, _FIRST = "\ue000", "\ue001", 0xE100

    def __init__(self, redact: Redactor, keep: Iterable[str]) -> None:
        self._redact = redact
        self._values = sorted({v for v in keep if v}, key=len, reverse=True)  # longest first
        self._pattern = (
            re.compile("|".join(_kept_value(v) for v in self._values), re.IGNORECASE) if self._values else None
        )
        self._index = {v.casefold(): i for i, v in enumerate(self._values)}
        self._token = re.compile(f"{self._OPEN}([\ue100-\uf8ff]){self._CLOSE}")

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return self._redact(text)
        held: dict[str, str] = {}

        def hold(m: re.Match[str]) -> str:
            token = self._OPEN + chr(self._FIRST + self._index[m.group().casefold()]) + self._CLOSE
            held[token] = m.group()
            return token

        protected = self._pattern.sub(hold, text)
        if not held:
            return self._redact(text)
        redacted = self._redact(protected)
        return self._token.sub(lambda m: held.get(m.group(), m.group()), redacted)


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self._redact = redact or _unchanged

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self._redact(record.getMessage()),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            out["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self._redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor | None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redact or _unchanged

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


def setup_logging(
    level: str, *, json_lines: bool, redact: Redactor | None = None, keep: Iterable[str] = ()
) -> None:
    """Log to stderr; `redact` masks every line except the values in `keep` (see `server_addresses`)."""
    if redact is not None and keep:
        redact = KeepingRedactor(redact, keep)
    _install(JsonFormatter(redact) if json_lines else _TextFormatter(redact), level.upper())
    # uvicorn's own access log would duplicate ours without the request id and tenant.
    logging.getLogger("uvicorn.access").disabled = True


def server_formatter() -> logging.Formatter | None:
    """The formatter `setup_logging` installed, for a child process that writes to the same stderr."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, (JsonFormatter, _TextFormatter)):
            return handler.formatter
    return None


def setup_child_logging(level: int, formatter: logging.Formatter | None) -> None:
    """A child process's log: the server's lines (JSON, redacted) given its formatter, plain text without."""
    _install(formatter or _TextFormatter(None), level)


def _install(formatter: logging.Formatter, level: int | str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
