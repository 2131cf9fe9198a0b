"""The server's log: PII masked in what users sent, the server's own addresses readable, llama.cpp's
output as log records (whole lines, mapped levels) instead of raw text on stderr."""

from __future__ import annotations

import ctypes
import logging
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from appliance.observability.logs import (
    JsonFormatter,
    KeepingRedactor,
    server_addresses,
    server_formatter,
    setup_logging,
)
from appliance.policy.guardrails.masking import redact_text
from appliance.settings import Settings, load_settings

OWN = ["127.0.0.1", "::1", "10.0.0.2", "192.168.7.20"]


def _settings(tmp_path: Path, body: str = "") -> Settings:
    path = tmp_path / "appliance.toml"
    path.write_text(body)
    return load_settings(config=path, env={})


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """setup_logging replaces the root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def _record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("appliance", logging.INFO, __file__, 1, message, args, None)


# -- the server's own addresses ------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "appliance 0.2.0 serving gemma3-270m on http://127.0.0.1:18901 (data in /var/lib/appliance)",
        "Uvicorn running on http://127.0.0.1:18901 (Press CTRL+C to quit)",
        "Uvicorn running on http://[::1]:8080 (Press CTRL+C to quit)",
        "cluster peer b (http://10.0.0.2:18802) is up",
        "model gemma-split: split over 192.168.7.20:50052 (RPC0 192.168.7.20:50052)",
    ],
)
def test_the_servers_own_addresses_stay_readable(line: str) -> None:
    assert redact_text(line) != line  # what the guardrails' masker alone does to these lines
    assert KeepingRedactor(redact_text, OWN)(line) == line


@pytest.mark.parametrize(
    ("line", "leaked"),
    [
        ("request from 203.0.113.9 failed", "203.0.113.9"),
        ("write to bob@example.com please", "bob@example.com"),
        ("near misses 10.0.0.23 and 110.0.0.2", "10.0.0.23"),
        ("near misses 10.0.0.23 and 110.0.0.2", "110.0.0.2"),
        ("an address in an email: admin@10.0.0.2", "admin@10.0.0.2"),
        ("a longer IPv6 fe80::1 stays masked", "fe80::1"),
        ("card 4111 1111 1111 1111 next to 127.0.0.1", "4111 1111 1111 1111"),
    ],
)
def test_everything_else_is_still_masked(line: str, leaked: str) -> None:
    out = KeepingRedactor(redact_text, OWN)(line)
    assert leaked not in out and "[" in out


def test_the_kept_and_the_masked_share_a_line() -> None:
    out = KeepingRedactor(redact_text, OWN)(
        "peer 10.0.0.2 answered client 203.0.113.9 (bob@example.com), then 198.51.100.4, then 203.0.113.9"
    )
    assert out == "peer 10.0.0.2 answered client [IP_ADDRESS_1] ([EMAIL_1]), then [IP_ADDRESS_2], then [IP_ADDRESS_1]"


def test_the_guardrails_masker_is_unchanged() -> None:
    """The exception is the log's only: user text masked by the guardrails loses loopback as before."""
    assert redact_text("call http://127.0.0.1:8080 or 10.0.0.2") == "call http://[IP_ADDRESS_1]:8080 or [IP_ADDRESS_2]"


def test_server_addresses_come_from_the_settings(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        '[server]\nhost = "0.0.0.0"\n'
        '[cluster]\nsecret = "' + "s" * 32 + '"\n'
        '[[cluster.peers]]\nname = "b"\nurl = "http://10.0.0.2:18802"\n'
        '[[cluster.peers]]\nname = "c"\nurl = "https://node-c.lan:8443/"\n'
        '[models.rpc.gemma3-270m]\npeers = ["192.168.7.20:50052", "gpu-box:50052"]\n',
    )
    assert server_addresses(settings) == {
        "0.0.0.0", "127.0.0.1", "::1", "10.0.0.2", "node-c.lan", "192.168.7.20", "gpu-box"
    }
    assert server_addresses(_settings(tmp_path)) == {"127.0.0.1", "::1"}


def test_the_served_address_is_logged_through_the_cli_setup(tmp_path: Path, root_logging: logging.Logger) -> None:
    """The wiring in `appliance serve`: JSON lines that keep the configured addresses and mask the rest."""
    from appliance.cli import _setup_server_logging

    settings = _settings(
        tmp_path,
        '[server]\nhost = "192.168.7.20"\nport = 18901\n'
        '[cluster]\nsecret = "' + "s" * 32 + '"\n[[cluster.peers]]\nname = "b"\nurl = "http://10.0.0.2:18802"\n',
    )
    _setup_server_logging(settings)
    formatter = root_logging.handlers[0].formatter
    assert isinstance(formatter, JsonFormatter)
    served = formatter.format(_record("serving %s on http://%s:%d", "gemma3-270m", "192.168.7.20", 18901))
    assert "http://192.168.7.20:18901" in served
    assert "http://10.0.0.2:18802" in formatter.format(_record("cluster peer b (http://10.0.0.2:18802) is up"))
    user = formatter.format(_record("client 203.0.113.9 sent bob@example.com"))
    assert "203.0.113.9" not in user and "bob@example.com" not in user


def test_setup_logging_without_keep_masks_every_address(root_logging: logging.Logger) -> None:
    setup_logging("info", json_lines=True, redact=redact_text)
    assert "127.0.0.1" not in root_logging.handlers[0].format(_record("on http://127.0.0.1:8080"))


def test_the_formatter_travels_to_a_split_engines_child(root_logging: logging.Logger) -> None:
    """The split child (a spawned process) gets the server's formatter pickled: same JSON, same redaction."""
    setup_logging("info", json_lines=True, redact=redact_text, keep=OWN)
    formatter = server_formatter()
    assert formatter is not None
    copy = pickle.loads(pickle.dumps(formatter))
    line = copy.format(_record("worker 192.168.7.20:50052 for client 203.0.113.9"))
    assert "192.168.7.20:50052" in line and "203.0.113.9" not in line
    setup_logging("info", json_lines=True)  # no redactor at all: still picklable
    pickle.dumps(server_formatter())


# -- llama.cpp's log -----------------------------------------------------------------------------


@pytest.fixture
def llama() -> ModuleType:
    return pytest.importorskip("appliance.engines.llama")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in self.records]


Captured = tuple[logging.Logger, _Records]


@pytest.fixture
def captured() -> Iterator[Captured]:
    logger = logging.Logger("llama_cpp_test", logging.DEBUG)
    handler = _Records()
    logger.addHandler(handler)
    yield logger, handler


# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
def test_pieces_are_joined_into_lines_with_mapped_levels(llama: ModuleType, captured: Captured) -> None:
    logger, handler = captured
    lines = llama.LlamaLogLines(logger)
    lines(2, b"load_tensors: loading model tensors, ", None)
    lines(5, b"this can take a while\n", None)
    lines(2, b"...", None)
    lines(5, b"....", None)
    lines(5, b"\n", None)
    lines(3, b"llama_context: n_ctx_seq < n_ctx_train\nsecond warning line\n", None)
    lines(4, b"llama_model_load: error loading model\n", None)
    lines(1, b"graph_reserve: debug detail\n", None)
    lines(2, b"\n", None)
    assert handler.lines() == [
        (logging.DEBUG, "load_tensors: loading model tensors, this can take a while"),
        (logging.DEBUG, "......."),
        (logging.WARNING, "llama_context: n_ctx_seq < n_ctx_train"),
        (logging.WARNING, "second warning line"),
        (logging.ERROR, "llama_model_load: error loading model"),
        (logging.DEBUG, "graph_reserve: debug detail"),
    ]


def test_an_unfinished_line_is_not_relabelled_by_the_next_level(llama: ModuleType, captured: Captured) -> None:
    logger, handler = captured
    lines = llama.LlamaLogLines(logger)
    lines(2, b"info without a newline", None)
    lines(4, b"an error\n", None)
    assert handler.lines() == [(logging.DEBUG, "info without a newline"), (logging.ERROR, "an error")]


def test_threads_do_not_mix_their_pieces(llama: ModuleType, captured: Captured) -> None:
    logger, handler = captured
    lines = llama.LlamaLogLines(logger)
    lines(3, b"main thread: ", None)
    worker = threading.Thread(target=lambda: lines(2, b"worker line\n", None))
    worker.start()
    worker.join()
    lines(5, b"continued\n", None)
    assert sorted(handler.lines()) == [(logging.DEBUG, "worker line"), (logging.WARNING, "main thread: continued")]


def test_invalid_utf8_does_not_break_the_line(llama: ModuleType, captured: Captured) -> None:
    logger, handler = captured
    llama.LlamaLogLines(logger)(3, b"token '\xe2\x82' split\n", None)
    assert handler.lines() == [(logging.WARNING, "token '\ufffd' split")]


def test_llama_cpp_writes_log_records_not_stderr(
    llama: ModuleType, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Through the real library: a model that fails to load logs its lines (INFO as debug, the failure
    as errors) on the `llama_cpp` logger, and nothing reaches the process's stderr directly."""
    from appliance.errors import EngineError
    from tests.tinygguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    logger, handler = logging.getLogger("llama_cpp"), _Records()
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.DEBUG
    capfd.readouterr()
    try:
        with pytest.raises(EngineError):
            llama.LlamaTokenizer(path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    lines = handler.lines()
    assert (logging.DEBUG, "print_info: file format = GGUF V3 (latest)") in lines
    assert any(level == logging.ERROR and "failed to load model" in text for level, text in lines)
    assert all(text and "\n" not in text for _, text in lines)


def test_ggml_logs_through_the_same_callback(llama: ModuleType) -> None:
    """llama_log_set also sets ggml's logger (backend loading, RPC): one callback for both."""
    get = llama.ggml_library().ggml_log_get
    get.restype, get.argtypes = None, [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
    callback, user_data = ctypes.c_void_p(), ctypes.c_void_p()
    get(ctypes.byref(callback), ctypes.byref(user_data))
    assert callback.value == ctypes.cast(llama._log_callback, ctypes.c_void_p).value
