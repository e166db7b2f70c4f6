"""The web chat's state views (image numbering, failed turns) and the page's wiring, without a
server: what the Chatbot shows, what the model reads, how the events are configured, and how
Stop and Clear end a session's reply (the page's functions called as Gradio calls them)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr  # noqa: E402  (a dependency: fail loudly if missing)
import pytest
from app_testing import image_files, is_idle, make_loop, wait_until

from app.turns import EMPTY_REPLY, Turn, display_history, model_history, pop_last_turn
from app.ui import CLEAR_WAIT_S, EXAMPLES, EXAMPLES_DIR, build_app
from serving.engine import EngineLoop
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
    def stream_outputs(self, conversation, params, limits=None, request_id=None):
        raise AssertionError("not called when only building the page")

    def abort(self, request_id: str) -> None:
        raise AssertionError("not called when only building the page")


def test_page_wiring() -> None:
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
    # Stop and Clear end the reply through the engine, not by cancelling its event (see
    # app.chat.ReplyControl).
    assert not any(d["cancels"] for d in config["dependencies"])
    by_trigger = {(t[1], f.name) for f in functions for t in f.targets}
    assert {("stop", "stop_reply"), ("clear", "clear_chat")} <= by_trigger
    assert config["title"] == "Test chat"

    # the bundled example images: small, and all present
    pngs = sorted(EXAMPLES_DIR.glob("*.png"))
    assert {p.name for p in pngs} == {n for _, names in EXAMPLES for n in names}
    assert sum(p.stat().st_size for p in pngs) < 100_000


@pytest.fixture
def slow_loop() -> Iterator[EngineLoop]:
    engine_loop = make_loop(step_delay=0.01, ignore_eos=True)
    yield engine_loop
    engine_loop.shutdown()


def page_functions(loop: EngineLoop) -> dict[str, Callable]:
    return {f.name: f.fn for f in build_app(loop).fns.values()}


def start_reply(
    fns: dict[str, Callable], text: str, session: str, files: list[str] = ()
) -> tuple[list, threading.Thread]:
    """Send a message as the page does (add the turn, then stream the reply on a worker thread);
    returns the list the reply's updates are appended to, and that thread."""
    request = gr.Request(session_hash=session)
    _, turns, _ = fns["add_turn"]({"text": text, "files": list(files)}, [], request)
    updates: list = []

    def run() -> None:
        for update in fns["respond"](turns, 400, 0.0, 1.0, "", request):
            updates.append(update)

    thread = threading.Thread(target=run)
    thread.start()
    return updates, thread


def test_stop_ends_only_its_own_sessions_reply(slow_loop: EngineLoop, tmp_path: Path) -> None:
    fns = page_functions(slow_loop)
    images = image_files(tmp_path)
    mine, my_thread = start_reply(fns, "Describe it at length.", "tab-1", [images["red"]])
    theirs, their_thread = start_reply(fns, "Tell me a long story.", "tab-2")
    wait_until(lambda: len(mine) > 2 and len(theirs) > 2)
    requests = list(slow_loop.engine.requests.values())

    fns["stop_reply"](gr.Request(session_hash="tab-1"))
    my_thread.join(timeout=10)
    assert not my_thread.is_alive()  # the reply ended by itself, as a finished one does
    history, turns = mine[-1]
    assert turns[-1].is_done and turns[-1].reply and not turns[-1].is_error
    assert history[-1] == {"role": "assistant", "content": turns[-1].reply}
    assert their_thread.is_alive() and len(slow_loop.engine.requests) == 1  # still answering

    fns["stop_reply"](gr.Request(session_hash="tab-2"))
    their_thread.join(timeout=10)
    wait_until(lambda: is_idle(slow_loop))
    assert [r.finish_reason for r in requests] == ["abort", "abort"]
    assert all(len(r.output_ids) < 400 and r.block_table == [] for r in requests)


def test_a_stop_before_the_reply_began_ends_it_at_once(slow_loop: EngineLoop) -> None:
    """Stop is shown as soon as the turn is added, before the reply's event runs."""
    fns = page_functions(slow_loop)
    request = gr.Request(session_hash="tab-1")
    _, turns, _ = fns["add_turn"]({"text": "Tell me a long story.", "files": []}, [], request)
    fns["stop_reply"](request)
    updates = list(fns["respond"](turns, 400, 0.0, 1.0, "", request))
    assert turns[-1].is_done and updates[-1][1] is turns
    assert slow_loop.engine.num_steps == 0


def test_clear_waits_for_the_reply_to_end_and_nothing_of_it_follows(
    slow_loop: EngineLoop,
) -> None:
    fns = page_functions(slow_loop)
    request = gr.Request(session_hash="tab-1")
    _, turns, _ = fns["add_turn"]({"text": "Tell me a long story.", "files": []}, [], request)
    replies = fns["respond"](turns, 400, 0.0, 1.0, "", request)
    for _ in range(3):  # Gradio's worker holds the reply at a yield while the page shows it
        next(replies)
    with ThreadPoolExecutor(max_workers=1) as pool:
        cleared = pool.submit(fns["clear_chat"], request)
        wait_until(lambda: not slow_loop.engine.requests)  # Clear has stopped the reply
        assert not cleared.done()  # and waits for it to end
        assert list(replies) == []  # the reply's worker resumes: not one more update
        # when the reply has ended, not at Clear's time limit
        assert cleared.result(timeout=CLEAR_WAIT_S / 2) == ([], [])
    wait_until(lambda: is_idle(slow_loop))
