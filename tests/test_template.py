"""ChatTemplate: image numbering and placement, marker scrubbing, reply location."""

from __future__ import annotations

import pytest
from factories import (
    BLUE,
    CHATML_TEMPLATE,
    GREEN,
    RED,
    TRIMMING_TEMPLATE,
    make_conversation,
    make_image,
    make_tokenizer,
)

from visualchat.messages import Conversation
from visualchat.template import (
    FALLBACK_CHAT_TEMPLATE,
    IMAGE_MARKER,
    ChatTemplate,
    Segment,
    render_message_content,
)

M = IMAGE_MARKER


def two_round_conversation() -> Conversation:
    red, green, blue = make_image(RED), make_image(GREEN), make_image(BLUE)
    return make_conversation(
        [red, green, "compare"], "reply1", ["and", blue, "now?"], "reply2", system="Be brief."
    )


def test_images_are_numbered_across_turns_in_the_order_given() -> None:
    text = ChatTemplate(make_tokenizer()).render(two_round_conversation())
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nImage 1: {M}\nImage 2: {M}\ncompare<|im_end|>\n"
        "<|im_start|>assistant\nreply1<|im_end|>\n"
        f"<|im_start|>user\nand\nImage 3: {M}\nnow?<|im_end|>\n"
        "<|im_start|>assistant\nreply2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_without_generation_prompt() -> None:
    conversation = make_conversation([make_image(RED), "hi"])
    text = ChatTemplate(make_tokenizer()).render(conversation, add_generation_prompt=False)
    assert text == f"<|im_start|>user\nImage 1: {M}\nhi<|im_end|>\n"


def test_images_interleaved_with_text_keep_their_positions() -> None:
    red, green = make_image(RED), make_image(GREEN)
    conversation = make_conversation(["Look at", red, "and", green, "then answer."])
    text = ChatTemplate(make_tokenizer()).render(conversation)
    assert text == (
        f"<|im_start|>user\nLook at\nImage 1: {M}\nand\nImage 2: {M}\nthen answer.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_message_content_starts_at_the_given_number() -> None:
    parts = make_conversation([make_image(RED), "x", make_image(GREEN)]).messages[0].parts
    assert render_message_content(parts, 4) == f"Image 4: {M}\nx\nImage 5: {M}"


def test_marker_in_user_text_is_scrubbed() -> None:
    conversation = make_conversation([f"sneaky {M}text{M}", make_image(RED)], f"ok{M}", "again")
    template = ChatTemplate(make_tokenizer())
    assert template.render(conversation) == (
        f"<|im_start|>user\nsneaky text\nImage 1: {M}<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n"
        "<|im_start|>user\nagain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    images = [s for s in template.segments(conversation) if s.kind == "image"]
    assert images == [Segment("image", image_index=0)]


def test_a_text_part_of_only_the_marker_is_dropped() -> None:
    conversation = make_conversation([M, make_image(RED)])
    assert ChatTemplate(make_tokenizer()).render(conversation) == (
        f"<|im_start|>user\nImage 1: {M}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_segments_split_text_images_and_replies_in_order() -> None:
    segments = ChatTemplate(make_tokenizer()).segments(two_round_conversation())
    assert segments == [
        Segment("text", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nImage 1: "),
        Segment("image", image_index=0),
        Segment("text", "\nImage 2: "),
        Segment("image", image_index=1),
        Segment("text", "\ncompare<|im_end|>\n<|im_start|>assistant\n"),
        Segment("reply", "reply1<|im_end|>"),
        Segment("text", "\n<|im_start|>user\nand\nImage 3: "),
        Segment("image", image_index=2),
        Segment("text", "\nnow?<|im_end|>\n<|im_start|>assistant\n"),
        Segment("reply", "reply2<|im_end|>"),
        Segment("text", "\n<|im_start|>assistant\n"),
    ]


def test_adjacent_images_give_adjacent_image_segments() -> None:
    conversation = make_conversation([make_image(RED), make_image(GREEN)])
    kinds = [(s.kind, s.image_index) for s in ChatTemplate(make_tokenizer()).segments(conversation)]
    assert kinds == [("text", -1), ("image", 0), ("text", -1), ("image", 1), ("text", -1)]


def test_fallback_template_is_used_without_a_chat_template() -> None:
    tokenizer = make_tokenizer(with_chat_template=False)
    assert tokenizer.chat_template is None
    template = ChatTemplate(tokenizer)
    assert template.chat_template == FALLBACK_CHAT_TEMPLATE
    assert FALLBACK_CHAT_TEMPLATE == CHATML_TEMPLATE
    assert template.render(two_round_conversation()) == ChatTemplate(make_tokenizer()).render(
        two_round_conversation()
    )


def test_the_backbone_template_is_used_when_it_has_one() -> None:
    plain = (
        "{% for message in messages %}"
        "{{ '### ' + message['role'] + ': ' + message['content'] + '<|im_end|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}"
    )
    template = ChatTemplate(make_tokenizer(plain))
    conversation = make_conversation([make_image(RED), "hi"], "hello", "bye")
    assert template.render(conversation) == (
        f"### user: Image 1: {M}\nhi<|im_end|>### assistant: hello<|im_end|>"
        "### user: bye<|im_end|>### assistant: "
    )
    replies = [s.text for s in template.segments(conversation) if s.kind == "reply"]
    assert replies == ["hello<|im_end|>"]


def test_a_template_that_is_not_prefix_stable_fails_loudly() -> None:
    unstable = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant:\n' }}{% endif %}"
    )
    template = ChatTemplate(make_tokenizer(unstable))
    with pytest.raises(ValueError, match="chat template is not prefix-stable"):
        template.segments(make_conversation("hi", "hello", "bye"))


def test_reply_with_trailing_space_under_a_trimming_template() -> None:
    # The template writes "Sure!" but the reply span is measured on "Sure! ": the span must
    # still end at the end-of-turn token, which must stay whole in the text segment.
    template = ChatTemplate(make_tokenizer(TRIMMING_TEMPLATE))
    conversation = make_conversation("hi", "Sure! ", "more")
    segments = template.segments(conversation)
    assert [s.text for s in segments if s.kind == "reply"] == ["Sure!<|im_end|>"]
    assert "".join(s.text for s in segments) == template.render(conversation)


def test_a_default_system_turn_is_put_first_when_the_conversation_has_none() -> None:
    template = ChatTemplate(make_tokenizer(), default_system="Look closely.")
    conversation = make_conversation([make_image(RED), "colour?"], "red")
    assert template.render(conversation) == (
        "<|im_start|>system\nLook closely.<|im_end|>\n"
        f"<|im_start|>user\nImage 1: {M}\ncolour?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n<|im_start|>assistant\n"
    )
    replies = [s.text for s in template.segments(conversation) if s.kind == "reply"]
    assert replies == ["red<|im_end|>"]


def test_an_empty_default_system_renders_an_empty_system_turn() -> None:
    template = ChatTemplate(make_tokenizer(), default_system="")
    text = template.render(make_conversation("hi"))
    assert text == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_conversations_own_system_prompt_wins_over_the_default() -> None:
    with_default = ChatTemplate(make_tokenizer(), default_system="Look closely.")
    plain = ChatTemplate(make_tokenizer())
    conversation = two_round_conversation()  # system "Be brief."
    assert with_default.render(conversation) == plain.render(conversation)
    assert "Look closely." not in with_default.render(conversation)


def test_without_a_default_the_templates_own_system_prompt_stays() -> None:
    # SmolLM2-style: the template writes its own system turn when the conversation has none.
    own = (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nI am the template.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    conversation = make_conversation("hi")
    assert "I am the template." in ChatTemplate(make_tokenizer(own)).render(conversation)
    replaced = ChatTemplate(make_tokenizer(own), default_system="").render(conversation)
    assert replaced.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi")
