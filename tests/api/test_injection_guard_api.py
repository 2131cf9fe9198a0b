"""The gateway with the bundled injection classifiers (models/injection-guard*) through the real ASGI app:
named by the default settings, they decide beside the rules once loaded."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.modelstore.catalog import CATALOG_DIR, catalog_manifests
from tests.api.conftest import World, make_client
from tests.api.test_injection_classifier import chat, wait_ready
from tests.unit.test_injection_guard import QUESTION, ROLEPLAY


@pytest.fixture
def guarded(world: World) -> World:
    from appliance.engines.onnx import OnnxTextClassifier

    bundled = {m.id: m for m in catalog_manifests() if m.id.startswith("injection-guard")}
    world.manifests += list(bundled.values())
    factory = world.factory

    def load(m: Any) -> Any:
        if m.id not in bundled:
            return factory(m)
        return OnnxTextClassifier(CATALOG_DIR / m.id / "model.onnx", CATALOG_DIR / "injection-guard" / "tokenizer.json",
                                  model_id=m.id, labels=m.labels, max_length=m.context_length, batch_size=8,
                                  n_threads=1, gpu="off")

    world.factory = load  # type: ignore[method-assign]
    return world


def test_the_default_classifier_blocks_what_no_rule_flags(guarded: World) -> None:
    with make_client(guarded) as client:
        assert chat(client, QUESTION).status_code == 200  # starts the load; the rules decide meanwhile
        wait_ready(client, "injection-guard")
        blocked = chat(client, ROLEPLAY)
        assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "guardrail_blocked", blocked.text
        assert chat(client, QUESTION + " ").status_code == 200
        assert not any(ROLEPLAY in r.prompt for r in guarded.chat.requests)


def test_the_classifier_can_be_turned_off(guarded: World) -> None:
    with make_client(guarded, APPLIANCE_INJECTION_CLASSIFIER="", APPLIANCE_RETRIEVED_INJECTION_CLASSIFIER="") as client:
        assert chat(client, QUESTION).status_code == 200
        assert chat(client, ROLEPLAY).status_code == 200  # the rules alone let it through
