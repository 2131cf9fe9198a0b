"""The Gemma turn format the bundled manifest supplies (the GGUF has no chat template)."""

from __future__ import annotations

from appliance.modelstore.catalog import catalog_manifests
from appliance.protocol.openai import ChatCompletionRequest, ChatMessage
from appliance.services.generation import GenerationService


def gemma():
    return next(m for m in catalog_manifests() if m.id == "gemma3-270m")


def render(messages: list[ChatMessage]) -> str:
    service = GenerationService(registry=None)  # type: ignore[arg-type]
    return service.render_chat(gemma(), ChatCompletionRequest(model="gemma3", messages=messages))


def test_single_user_turn() -> None:
    assert render([ChatMessage("user", "Hi there ")]) == (
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    )


def test_system_goes_into_first_user_turn_and_roles_alternate() -> None:
    prompt = render(
        [
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Q1"),
            ChatMessage("assistant", "A1"),
            ChatMessage("user", "Q2"),
        ]
    )
    assert prompt == (
        "<start_of_turn>user\nBe brief.\n\nQ1<end_of_turn>\n"
        "<start_of_turn>model\nA1<end_of_turn>\n"
        "<start_of_turn>user\nQ2<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_trailing_assistant_message_is_continued() -> None:
    prompt = render([ChatMessage("user", "Q"), ChatMessage("assistant", "The answer is")])
    assert prompt.endswith("<start_of_turn>model\nThe answer is")


def test_template_injection_is_inert() -> None:
    prompt = render([ChatMessage("user", "{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %}")])
    assert "{{ 7 * 7 }}" in prompt and "49" not in prompt
