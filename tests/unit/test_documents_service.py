"""DocumentService opening collections: concurrent first opens never block the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from appliance.engines.registry import ModelRegistry
from appliance.errors import CollectionNotFound
from appliance.services.documents import DocumentService
from tests.fakes import FakeEmbeddingEngine, manifest


def _service(root: Path) -> DocumentService:
    registry = ModelRegistry(
        [manifest("embed", kind="embedding")], lambda m: FakeEmbeddingEngine(m.id), load_timeout_s=5
    )
    return DocumentService(root, registry, embedding_model="embed")


def _run_bounded(coro_fn, seconds: float = 60):  # type: ignore[no-untyped-def]
    """Run in a thread of its own, so a deadlocked event loop fails the test instead of hanging it."""
    out: dict[str, object] = {}

    def main() -> None:
        try:
            out["value"] = asyncio.run(coro_fn())
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the event loop is blocked: concurrent collection opens deadlocked"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]


def test_concurrent_first_opens_do_not_deadlock(tmp_path: Path) -> None:
    async def make() -> None:
        svc = _service(tmp_path)
        await svc.create("t", "a")
        await svc.create("t", "b")
        svc.close()

    _run_bounded(make)

    async def after_restart() -> list[object]:
        svc = _service(tmp_path)  # a fresh service, as after a restart: nothing open yet
        try:
            return list(await asyncio.gather(
                svc.documents("t", "a"), svc.documents("t", "b"), svc.documents("t", "a"), svc.documents("t", "b")
            ))
        finally:
            svc.close()

    assert _run_bounded(after_restart) == [[], [], [], []]


def test_one_collection_object_per_name(tmp_path: Path) -> None:
    async def opened() -> bool:
        svc = _service(tmp_path)
        await svc.create("t", "a")
        svc.close()
        svc = _service(tmp_path)
        pairs = await asyncio.gather(*(svc._collection("t", "a") for _ in range(8)))
        svc.close()
        return len({id(col) for col, _ in pairs}) == 1

    assert _run_bounded(opened)


def test_missing_collection_says_how_to_create_it(tmp_path: Path) -> None:
    async def missing() -> None:
        await _service(tmp_path).documents("t", "nope")

    with pytest.raises(CollectionNotFound) as info:
        _run_bounded(missing)
    assert "POST /v1/collections" in info.value.message and "--create" in info.value.message


def test_title_is_the_documents_first_heading_even_without_a_body() -> None:
    from appliance.retrieval.parsing import parse
    from appliance.services.documents import _title

    assert _title("m.md", parse("m.md", b"# Manual\n\n## Intro\n\nThe valve is torqued to 35 Nm.\n")) == "Manual"
    assert _title("m.md", parse("m.md", b"# Manual\n\nBody.\n\n## Intro\n\nMore.\n")) == "Manual"
    assert _title("notes.txt", parse("notes.txt", b"plain text, no heading")) == "notes"
