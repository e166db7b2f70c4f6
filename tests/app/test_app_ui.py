"""The web chat's state views (image numbering, failed turns) and the page's wiring, without a
server: what the Chatbot shows, what the model reads, and how the events are configured."""

from __future__ import annotations

from pathlib import Path

import gradio as gr  # noqa: E402  (a dependency: fail loudly if missing)

from app.turns import EMPTY_REPLY, Turn, display_history, model_history, pop_last_turn
from visualchat.messages import Conversation, ImagePart

TURNS = [
    Turn(["/up/a.png", "/up/b.png"], "compare", "reply 1", is_done=True),
    Turn(["/up/notes.txt"], "and this?", "⚠️ Image 3: notes.txt is not an image", True, True),
    Turn(["/up/c.png"], "", "reply 3", is_done=True),
    Turn([], "thanks", "", is_done=True),  # a reply that ended before any text
    Turn(["/up/d.png"], "last"),  # being answered
]


def test_display_numbers_images_as_the_model_does() -> None:
    shown = display_history(TURNS)
    assert [m["role"] for m in shown] == ["user", "assistant"] * 4 + ["user"]
    assert shown[0]["content"] == [
        "**Image 1**",
        {"path": "/up/a.png", "alt_text": "Image 1"},
        "**Image 2**",
        {"path": "/up/b.png", "alt_text": "Image 2"},
        "compare",
    ]
    assert shown[2]["content"][0] == "**notes.txt (not sent)**"  # refused: no number
    assert shown[3]["content"] == "⚠️ Image 3: notes.txt is not an image"
    assert shown[4]["content"] == ["**Image 3**", {"path": "/up/c.png", "alt_text": "Image 3"}]
    assert shown[7]["content"] == EMPTY_REPLY
    assert shown[8]["content"][0] == "**Image 4**"

    # The model's own numbering (the processor's) of the same history agrees.
    history = model_history(TURNS[:-1])
    conversation = Conversation.from_gradio(history, TURNS[-1].message)
    assert [part.image for part in conversation.images()] == [
        "/up/a.png",
        "/up/b.png",
        "/up/c.png",
        "/up/d.png",
    ]
    assert all(isinstance(part, ImagePart) for part in conversation.images())
    assert [(m.role, m.text) for m in conversation.messages] == [
        ("user", "compare"),
        ("assistant", "reply 1"),
        ("user", ""),
        ("assistant", "reply 3"),
        ("user", "thanks"),
        ("assistant", ""),
        ("user", "last"),
    ]


def test_undo_returns_the_last_message_for_editing() -> None:
    turns, message = pop_last_turn(TURNS)
    assert turns == TURNS[:-1]
    assert message == {"text": "last", "files": ["/up/d.png"]}
    assert pop_last_turn([]) == ([], None)


def test_chatbot_accepts_the_display_messages(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"")  # postprocess only needs the path
    value = gr.Chatbot().postprocess(display_history([Turn([str(image)], "hi", "hello", False)]))
    (user, assistant) = value.root
    assert [item.type for item in user.content] == ["text", "file", "text"]
    assert user.content[1].alt_text == "Image 1"
    assert assistant.content[0].text == "hello"


class NoBackend:
    def stream_outputs(self, conversation, params, limits=None):
        raise AssertionError("not called when only building the page")


def test_page_wiring() -> None:
    from app.ui import EXAMPLES, EXAMPLES_DIR, build_app

    demo = build_app(NoBackend(), title="Test chat")
    config = demo.get_config_file()
    components = {c["id"]: c for c in config["components"]}
    by_type: dict[str, list[dict]] = {}
    for component in components.values():
        by_type.setdefault(component["type"], []).append(component)

    (textbox,) = by_type["multimodaltextbox"]
    assert textbox["props"]["file_count"] == "multiple"
    assert textbox["props"]["file_types"] == ["image"]
    (chatbot,) = by_type["chatbot"]
    props = chatbot["props"]
    assert props["_retryable"] and props["_undoable"]
    assert set(props["buttons"]) >= {"copy", "copy_all"}
    assert len(props["examples"]) == len(EXAMPLES)
    assert all(len(example["files"]) >= 1 for example in props["examples"])
    labels = {c["props"].get("label") for c in components.values()}
    assert {"Max new tokens", "Temperature (0: greedy)", "Top-p"} <= labels
    assert "System prompt (optional)" in labels

    functions = list(demo.fns.values())
    replies = [f for f in functions if f.name in ("respond", "api_chat")]
    assert len(replies) == 4  # after submit, example click and retry; and the /chat API
    assert all(f.concurrency_limit is None for f in replies)  # no queue of one
    (api,) = [f for f in functions if f.api_name == "chat"]
    assert api.api_visibility == "public"
    cancelling = {d["targets"][0][1]: d["cancels"] for d in config["dependencies"] if d["cancels"]}
    reply_ids = sorted(f._id for f in replies if f.name == "respond")
    assert cancelling == {"stop": reply_ids, "clear": reply_ids}
    assert config["title"] == "Test chat"

    # the bundled example images: small, and all present
    pngs = sorted(EXAMPLES_DIR.glob("*.png"))
    assert {p.name for p in pngs} == {n for _, names in EXAMPLES for n in names}
    assert sum(p.stat().st_size for p in pngs) < 100_000
