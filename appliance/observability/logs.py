"""Structured logs: one JSON object per line, with the request id, PII redacted from the message.

The redactor is the guardrails' PII masker; log records never carry request text on purpose, and
the redactor is the second line of defence for anything that slips into a message or exception.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
Redactor = Callable[[str], str]


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self._redact = redact or (lambda text: text)

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
        self._redact = redact or (lambda text: text)

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


def setup_logging(level: str, *, json_lines: bool, redact: Redactor | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if json_lines else _TextFormatter(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate ours without the request id and tenant.
    logging.getLogger("uvicorn.access").disabled = True
