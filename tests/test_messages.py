import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from visualchat.images import load_image
from visualchat.messages import Conversation, ImagePart, Message, TextPart

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (2, 2)) -> Image.Image:
    return Image.new("RGB", size, color)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_file(tmp_path: Path, name: str, color: tuple[int, int, int]) -> str:
    path = tmp_path / name
    solid(color).save(path)
    return str(path)


def summary(conversation: Conversation) -> list[tuple[str, list[Any]]]:
    """(role, parts) with image parts as (source, name): easy to compare exactly."""
    return [
        (
            message.role,
            [
                part.text if isinstance(part, TextPart) else (part.image, part.name)
                for part in message.parts
            ],
        )
        for message in conversation.messages
    ]


# --- Message and Conversation -----------------------------------------------------------------


def test_message_text_and_images() -> None:
    cat = ImagePart("cat.png", name="cat.png")
    message = Message("user", [TextPart("look:"), cat, TextPart("what is it?")])
    assert message.text == "look:\nwhat is it?"
    assert message.images == [cat]


@pytest.mark.parametrize(
    ("role", "parts", "error"),
    [
        ("tool", [], "unknown role 'tool'; expected one of system, user, assistant"),
        ("assistant", [ImagePart("a.png")], "assistant messages cannot hold images"),
        ("system", [ImagePart("a.png")], "system messages cannot hold images"),
    ],
)
def test_message_is_validated(role: str, parts: list, error: str) -> None:
    with pytest.raises(ValueError, match=f"^{error}"):
        Message(role, parts)  # type: ignore[arg-type]


def test_parts_are_type_checked() -> None:
    with pytest.raises(TypeError, match="message parts must be TextPart or ImagePart"):
        Message("user", ["hello"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="ImagePart.image must be .* got int"):
        ImagePart(3)  # type: ignore[arg-type]


def test_conversation_building() -> None:
    red, green = solid(RED), solid(GREEN)
    conversation = Conversation()
    conversation.add_system("be brief")
    first = conversation.add_user("compare", images=[red, green])
    conversation.add_assistant("red vs green")
    conversation.add_user(images=["blue.png"])
    assert [type(p).__name__ for p in first.parts] == ["ImagePart", "ImagePart", "TextPart"]
    assert conversation.system == "be brief"
    assert len(conversation) == 4
    assert conversation.num_images == 3
    assert [part.image for part in conversation.images()] == [red, green, "blue.png"]
    assert summary(conversation)[2:] == [
        ("assistant", ["red vs green"]),
        ("user", [("blue.png", None)]),
    ]


def test_conversation_guards() -> None:
    conversation = Conversation()
    assert conversation.system is None
    with pytest.raises(ValueError, match="a user message needs text or at least one image"):
        conversation.add_user()
    with pytest.raises(TypeError, match="images must be a list"):
        conversation.add_user("hi", images="cat.png")  # type: ignore[arg-type]
    conversation.add_user("hi")
    with pytest.raises(ValueError, match="the system message must come first"):
        conversation.add_system("late")


def test_copy_is_shallow() -> None:
    conversation = Conversation()
    conversation.add_user("hi")
    copy = conversation.copy()
    copy.add_assistant("hello")
    assert (len(conversation), len(copy)) == (1, 2)
    assert copy.messages[0] is conversation.messages[0]


# --- OpenAI -------------------------------------------------------------------------------------


def test_openai_round_trip_keeps_order() -> None:
    red, green, blue = data_url(solid(RED)), data_url(solid(GREEN)), data_url(solid(BLUE))
    messages = [
        {"role": "system", "content": "You describe images."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": red, "detail": "low"}},
                {"type": "text", "text": "and"},
                {"type": "image_url", "image_url": green},
                {"type": "text", "text": "differ how?"},
            ],
        },
        {"role": "assistant", "content": "Colour."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": blue}}]},
    ]
    conversation = Conversation.from_openai(messages)
    assert summary(conversation) == [
        ("system", ["You describe images."]),
        (
            "user",
            [
                (red, "messages[1].content[0]"),
                "and",
                (green, "messages[1].content[2]"),
                "differ how?",
            ],
        ),
        ("assistant", ["Colour."]),
        ("user", [(blue, "messages[3].content[0]")]),
    ]
    assert conversation.to_openai() == [
        {"role": "system", "content": "You describe images."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": red}},
                {"type": "text", "text": "and"},
                {"type": "image_url", "image_url": {"url": green}},
                {"type": "text", "text": "differ how?"},
            ],
        },
        {"role": "assistant", "content": "Colour."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": blue}}]},
    ]


def test_to_openai_encodes_other_sources_as_png_data_urls(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    conversation = Conversation()
    conversation.add_user("what?", images=[image_file(tmp_path, "r.png", RED), rgba])
    content = conversation.to_openai()[0]["content"]
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
    urls = [part["image_url"]["url"] for part in content[:2]]
    assert all(url.startswith("data:image/png;base64,") for url in urls)
    first, second = load_image(urls[0]), load_image(urls[1])
    assert (first.size, first.getcolors()) == ((2, 2), [(4, RED)])
    assert (second.size, second.getcolors()) == ((2, 1), [(2, BLUE)])


def test_openai_aliases_and_empty_assistant() -> None:
    conversation = Conversation.from_openai(
        [
            {"role": "developer", "content": [{"type": "text", "text": "rules"}]},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None},
        ]
    )
    assert summary(conversation) == [("system", ["rules"]), ("user", ["hi"]), ("assistant", [])]
    assert conversation.system == "rules"
    assert conversation.to_openai()[2] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
            "messages[1]: unsupported role 'tool' (supported: system, developer, user, assistant;",
        ),
        (
            [{"role": "function", "content": "42"}],
            "messages[0]: unsupported role 'function'",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "listen"},
                        {"type": "input_audio", "input_audio": {}},
                    ],
                }
            ],
            "messages[0].content[1]: unsupported content part type 'input_audio' "
            "(supported: text, image_url)",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "/etc/passwd"}]}],
            "messages[0].content[0]: image URL must be a data:, http(s):// or file:// URL, "
            "not a bare path ('/etc/passwd')",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}],
                },
            ],
            "messages[1]: assistant messages cannot hold images; only user messages can",
        ),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
            "messages[0]: tool calls are not supported",
        ),
        (
            [{"role": "user", "content": 7}],
            "messages[0]: content must be a string or a list of parts, got int",
        ),
        (
            [{"role": "user", "content": None}],
            "messages[0]: content must be a string or a list of parts, got NoneType",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[0].content[0]: image_url needs a 'url' string",
        ),
        (["hello"], "messages[0]: expected a message object, got str"),
    ],
)
def test_openai_errors_name_the_message(messages: list, error: str) -> None:
    with pytest.raises(ValueError) as info:
        Conversation.from_openai(messages)
    assert str(info.value).startswith(error), str(info.value)


# --- HF chat templates --------------------------------------------------------------------------


def test_hf_blocks_both_ways() -> None:
    red, green, blue = solid(RED), solid(GREEN), solid(BLUE)
    messages = [
        {"role": "system", "content": "short answers"},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image", "url": "https://example.com/x.png"},
                {"type": "text", "text": "compare"},
                {"type": "image"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "image", "image": blue}, {"type": "image"}]},
        {"role": "user", "content": [{"type": "image", "path": "/data/p.png"}]},
    ]
    conversation = Conversation.from_hf(messages, images=[red, green, "last.png"])
    assert summary(conversation) == [
        ("system", ["short answers"]),
        (
            "user",
            [
                (red, "images[0]"),
                ("https://example.com/x.png", "messages[1].content[1]"),
                "compare",
                (green, "images[1]"),
            ],
        ),
        ("assistant", ["ok"]),
        ("user", [(blue, "messages[3].content[0]"), ("last.png", "images[2]")]),
        ("user", [("/data/p.png", "messages[4].content[0]")]),
    ]
    hf_messages, hf_images = conversation.to_hf()
    assert hf_messages == [
        {"role": "system", "content": [{"type": "text", "text": "short answers"}]},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "compare"},
                {"type": "image"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
        {"role": "user", "content": [{"type": "image"}]},
    ]
    assert hf_images == [red, "https://example.com/x.png", green, blue, "last.png", "/data/p.png"]
    again = Conversation.from_hf(hf_messages, hf_images)
    assert [[getattr(p, "image", None) for p in m.parts] for m in again.messages] == [
        [None],
        [red, "https://example.com/x.png", None, green],
        [None],
        [blue, "last.png"],
        ["/data/p.png"],
    ]


@pytest.mark.parametrize(
    ("messages", "images", "error"),
    [
        (
            [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}],
            ["a.png"],
            "messages[0].content[1]: more image blocks than images; only 1 image(s) given",
        ),
        (
            [{"role": "user", "content": [{"type": "image"}]}],
            ["a.png", "b.png"],
            '2 image(s) given but only 1 {"type": "image"} block(s) in the messages',
        ),
        (
            [{"role": "user", "content": [{"type": "video"}]}],
            [],
            "messages[0].content[0]: unsupported content block type 'video' "
            "(supported: text, image)",
        ),
        (
            [{"role": "tool", "content": "x"}],
            [],
            "messages[0]: unsupported role 'tool'",
        ),
    ],
)
def test_hf_errors(messages: list, images: list, error: str) -> None:
    with pytest.raises(ValueError) as info:
        Conversation.from_hf(messages, images)
    assert str(info.value).startswith(error), str(info.value)


# --- Gradio -------------------------------------------------------------------------------------


def test_gradio_client_shape_merges_consecutive_user_entries(tmp_path: Path) -> None:
    # What gradio_client sends and ChatInterface appends: one entry per uploaded file.
    cat, dog = image_file(tmp_path, "cat.png", RED), image_file(tmp_path, "dog.jpg", GREEN)
    history = [
        {"role": "user", "content": {"path": cat}},
        {"role": "user", "content": {"path": dog, "orig_name": "my dog.jpg"}},
        {"role": "user", "content": "Which is cuter?"},
        {"role": "assistant", "content": "Weighing...", "metadata": {"title": "Thinking"}},
        {"role": "assistant", "content": "The cat."},
        {"role": "user", "content": [{"path": cat}, "Again?"]},
    ]
    conversation = Conversation.from_gradio(history)
    assert summary(conversation) == [
        ("user", [(cat, "cat.png"), (dog, "my dog.jpg"), "Which is cuter?"]),
        ("assistant", ["The cat."]),
        ("user", [(cat, "cat.png"), "Again?"]),
    ]


def test_gradio_browser_shape_literal() -> None:
    # NormalizedMessageDict, as Chatbot.preprocess hands it to a Python chat function.
    def file_item(path: str, mime_type: str | None) -> dict:
        file = {"path": path, "url": None, "size": None, "orig_name": None}
        file |= {"mime_type": mime_type, "is_stream": False, "meta": {"_type": "gradio.FileData"}}
        return {"file": file, "alt_text": None, "type": "file"}

    history = [
        {"role": "system", "metadata": None, "content": [{"text": "sys", "type": "text"}]},
        {
            "role": "user",
            "metadata": None,
            "content": [file_item("/g/a.webp", "image/webp"), file_item("/g/blob", None)],
            "options": None,
        },
        {"role": "user", "metadata": None, "content": [{"text": "hi", "type": "text"}]},
        {"role": "assistant", "metadata": {"title": "Tool"}, "content": [{"text": "x"}]},
        {"role": "assistant", "metadata": None, "content": [{"text": "hello", "type": "text"}]},
    ]
    assert summary(Conversation.from_gradio(history)) == [
        ("system", ["sys"]),
        ("user", [("/g/a.webp", "a.webp"), ("/g/blob", "blob"), "hi"]),
        ("assistant", ["hello"]),
    ]


def test_gradio_shapes_built_by_gradio(tmp_path: Path) -> None:
    import gradio as gr
    from gradio.components.chatbot import ChatbotDataMessages

    cat, dog = image_file(tmp_path, "cat.png", RED), image_file(tmp_path, "dog.png", GREEN)
    client_history = [
        {"role": "user", "content": {"path": cat}},
        {"role": "user", "content": [{"path": dog}, "Same animal?"]},
        gr.ChatMessage(role="assistant", content="Thinking", metadata={"title": "Plan"}),
        gr.ChatMessage(role="assistant", content="No."),
    ]
    expected = [
        ("user", [(cat, "cat.png"), (dog, "dog.png"), "Same animal?"]),
        ("assistant", ["No."]),
    ]
    assert summary(Conversation.from_gradio(client_history)) == expected

    chatbot = gr.Chatbot()
    sent_to_browser = chatbot.postprocess(client_history)  # ChatbotDataMessages
    assert summary(Conversation.from_gradio(sent_to_browser.root)) == expected  # pydantic models
    from_browser = ChatbotDataMessages.model_validate(sent_to_browser.model_dump())
    normalized = chatbot.preprocess(from_browser)  # what the chat function receives
    assert normalized[0]["content"][0]["type"] == "file"
    assert summary(Conversation.from_gradio(normalized)) == expected


def test_gradio_multimodal_message_is_the_last_user_turn(tmp_path: Path) -> None:
    cat, dog = image_file(tmp_path, "cat.png", RED), image_file(tmp_path, "dog.png", GREEN)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    message = {"text": "what are these?", "files": [cat, {"path": dog}]}
    assert summary(Conversation.from_gradio(history, message)) == [
        ("user", ["hi"]),
        ("assistant", ["hello"]),
        ("user", [(cat, "cat.png"), (dog, "dog.png"), "what are these?"]),
    ]
    assert summary(Conversation.from_gradio(history, "plain")) == [
        ("user", ["hi"]),
        ("assistant", ["hello"]),
        ("user", ["plain"]),
    ]
    # Nothing new to say: no empty user turn.
    assert len(Conversation.from_gradio(history, {"text": "", "files": []})) == 2
    # A trailing user entry in the history merges with the new message.
    pending = [{"role": "user", "content": {"path": cat}}]
    assert summary(Conversation.from_gradio(pending, "this?")) == [
        ("user", [(cat, "cat.png"), "this?"])
    ]


def test_gradio_tuples_format() -> None:
    history = [
        [("/up/cat.png",), None],
        ["What is it?", "A cat."],
        [("/up/dog.png", "a dog"), None],
        ["And this?", None],
    ]
    assert summary(Conversation.from_gradio(history)) == [
        ("user", [("/up/cat.png", "cat.png"), "What is it?"]),
        ("assistant", ["A cat."]),
        ("user", [("/up/dog.png", "dog.png"), "And this?"]),
    ]


def test_gradio_chat_message_like_objects() -> None:
    @dataclass
    class ChatMessageLike:
        content: Any
        role: str = "assistant"
        metadata: dict = field(default_factory=dict)

    history = [
        ChatMessageLike(role="user", content=[{"path": "/up/a.png"}, "hey"]),
        ChatMessageLike(content="thinking", metadata={"title": "Thought"}),
        ChatMessageLike(content="hi there"),
    ]
    assert summary(Conversation.from_gradio(history)) == [
        ("user", [("/up/a.png", "a.png"), "hey"]),
        ("assistant", ["hi there"]),
    ]


@pytest.mark.parametrize(
    ("history", "message", "error"),
    [
        (
            [{"role": "user", "content": {"path": "/up/report.pdf"}}],
            None,
            "history[0]: report.pdf is not an image (application/pdf); only image files",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "file", "file": {"path": "/g/notes", "mime_type": "text/plain"}}
                    ],
                }
            ],
            None,
            "history[0]: notes is not an image (text/plain)",
        ),
        ([], {"text": "", "files": ["/up/song.mp3"]}, "message.files[0]: song.mp3 is not an image"),
        (
            [{"role": "assistant", "content": {"path": "/up/plot.png"}}],
            None,
            "history[0]: assistant messages cannot hold images",
        ),
        (
            [{"role": "user", "content": {"type": "component", "component": "audio"}}],
            None,
            "history[0]: unsupported Gradio component 'audio'",
        ),
        ([["a", "b", "c"]], None, "history[0]: a tuples-format entry must be [user, bot]"),
        ([{"role": "bot", "content": "x"}], None, "history[0]: unsupported role 'bot'"),
    ],
)
def test_gradio_errors(history: list, message: Any, error: str) -> None:
    with pytest.raises(ValueError) as info:
        Conversation.from_gradio(history, message)
    assert str(info.value).startswith(error), str(info.value)
