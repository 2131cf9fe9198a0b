from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from appliance.api.app import create_app
from appliance.engines.registry import ModelRegistry
from appliance.settings import load_settings
from tests.fakes import FakeChatEngine, FakeEmbeddingEngine, manifest


class World:
    def __init__(self) -> None:
        self.chat = FakeChatEngine("chat-model")
        self.embed = FakeEmbeddingEngine("embed-model")
        self.engines: dict[str, Any] = {"chat-model": self.chat, "embed-model": self.embed}
        self.manifests = [
            manifest("chat-model", aliases=["chat-alias"], stop=["</assistant>"]),
            manifest("embed-model", kind="embedding"),
            manifest("base-model", kind="completion"),
        ]
        self.engines["base-model"] = FakeChatEngine("base-model", reply="base reply")

    def factory(self, m: Any) -> Any:
        engine = self.engines[m.id]
        if isinstance(engine, Exception):
            raise engine
        return engine


@pytest.fixture
def world() -> World:
    return World()


def make_client(world: World, **env: str) -> TestClient:
    env.setdefault("APPLIANCE_DATA_DIR", tempfile.mkdtemp(prefix="appliance-api-"))
    settings = load_settings(env=env)
    registry = ModelRegistry(world.manifests, world.factory, load_timeout_s=5)
    return TestClient(create_app(settings, registry), raise_server_exceptions=False)


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with make_client(world) as c:
        yield c
