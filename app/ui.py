"""build_app(loop): the Gradio 6 web chat page over a running engine loop.

Layout: a Chatbot (copy buttons, and Gradio's own retry / undo / clear hooks), a multimodal
textbox that takes several images per message (and turns into a Stop button while a reply
streams), example prompts with bundled images in the empty chat, and an accordion with the
generation settings and an optional system prompt.

State. Each browser session keeps its own `list[Turn]` in `gr.State`; the Chatbot only shows a
view of it (`app.turns.display_history`), with every image captioned by the number the model
knows it by. Turns whose input was refused stay visible with their warning but are left out of
what the model reads next.

Concurrency. Every reply streams from the one batched engine, which interleaves all sessions in
each forward pass, so the reply events have no concurrency limit: sessions never wait for each
other in Gradio's queue, only in the engine's scheduler.

Stopping. Stop and Clear do not cancel the reply's event (Gradio's `cancels=`; see
`app.chat.ReplyControl` for why): they abort the session's engine request, and the reply ends
like any other. Clear also discards the reply, and waits for it to end before it empties the
chat, so that no late update of the reply brings the conversation back. (Closing the page needs
nothing here: Gradio then closes the reply's generator, which aborts the request.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import gradio as gr

from app.chat import (
    UI_LIMITS,
    ChatSettings,
    ReplyBackend,
    ReplyControl,
    SessionReplies,
    stream_reply,
)
from app.turns import Turn, display_history, model_history, pop_last_turn
from visualchat.images import ImageLimits

logger = logging.getLogger(__name__)

DEFAULT_TITLE = "VisualChat"
EXAMPLES_DIR = Path(__file__).parent / "examples"
# (question, image files in the examples folder); made by app/examples/make_examples.py.
EXAMPLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What word is written in image 2?", ("scene_shapes.png", "scene_word.png")),
    ("Which image has a yellow star?", ("scene_shapes.png", "scene_star.png", "scene_word.png")),
    ("How many circles are there?", ("scene_shapes.png",)),
)
# Other queued events are light; replies are unlimited (see the module docstring).
QUEUE_CONCURRENCY = 64
MAX_TOKENS_LIMIT = 4096  # the slider's top; the engine also stops at the model's context
CLEAR_WAIT_S = 10.0  # Clear waits this long at most for the stopped reply to end (one step)
DESCRIPTION = (
    "Attach one or more images (the paperclip, or drop them on the box), ask about them, and keep "
    "going: later messages can add more images. Images are numbered across the whole chat, so "
    "you can ask *“compare image 1 and image 3”*."
)


def build_app(
    loop: ReplyBackend,
    title: str = DEFAULT_TITLE,
    examples_dir: str | os.PathLike | None = None,
    settings: ChatSettings | None = None,
    limits: ImageLimits = UI_LIMITS,
) -> gr.Blocks:
    """The web chat over `loop` (an `EngineLoop`, or anything with its `stream_outputs`).

    examples_dir: folder of the example images (default: the bundled `app/examples`); examples
    whose images are missing there are left out. settings: the initial generation settings.
    Serve the result with `.launch()` or `gr.mount_gradio_app` (see app/launch.py); pass the
    examples folder in `allowed_paths`.
    """
    defaults = settings or ChatSettings()
    examples = example_messages(Path(examples_dir) if examples_dir is not None else EXAMPLES_DIR)

    running = SessionReplies(loop)

    def stream_turn(
        turns: list[Turn], settings: ChatSettings, control: ReplyControl | None = None
    ) -> Iterator[None]:
        """Answer the last turn in place, yielding after each piece of text."""
        turn = turns[-1]
        history = model_history(turns[:-1])
        replies = stream_reply(loop, history, turn.message, settings, limits, control)
        try:
            with closing(replies):  # a cancel (the /chat API's) closes this, and the engine stream
                for reply in replies:
                    turn.reply, turn.is_error = reply.text, reply.is_error
                    yield
        finally:
            turn.is_done = True  # finished or stopped: what was shown is the reply

    def respond(
        turns: list[Turn],
        max_tokens: float,
        temperature: float,
        top_p: float,
        system: str,
        request: gr.Request,
    ) -> Iterator[tuple[list[dict[str, Any]], list[Turn]]]:
        session = request.session_hash or ""
        control = running.current(session) or running.start(session)
        try:
            if turns and not turns[-1].is_done:
                settings = ChatSettings(max_tokens, temperature, top_p, system or "")
                with closing(stream_turn(turns, settings, control)) as updates:
                    for _ in updates:
                        if control.discarded:  # cleared: show nothing more of it
                            break
                        yield display_history(turns), turns
            if not control.discarded:
                yield display_history(turns), turns
        finally:
            running.finish(session, control)

    def stop_reply(request: gr.Request) -> None:
        running.stop(request.session_hash or "")

    def clear_chat(request: gr.Request) -> tuple[list[Turn], list[dict[str, Any]]]:
        control = running.stop(request.session_hash or "", discard=True)
        if control is not None and not control.wait_ended(CLEAR_WAIT_S):
            logger.warning("a cleared reply did not end within %.0f s", CLEAR_WAIT_S)
        return [], []

    def add_turn(
        message: dict[str, Any] | None, turns: list[Turn], request: gr.Request
    ) -> tuple[Any, list[Turn], list[dict[str, Any]]]:
        turns = [*turns, _turn_of(message)]
        running.start(request.session_hash or "")  # from now on Stop has a reply to stop
        return _busy_textbox(), turns, display_history(turns)

    def add_example_turn(
        turns: list[Turn], event: gr.SelectData, request: gr.Request
    ) -> tuple[Any, list[Turn], list[dict[str, Any]]]:
        turns = [*turns, _turn_of(event.value)]
        running.start(request.session_hash or "")
        return _busy_textbox(), turns, display_history(turns)

    def forget_last_reply(
        turns: list[Turn], request: gr.Request
    ) -> tuple[Any, list[Turn], list[dict[str, Any]]]:
        if not turns:
            raise gr.Error("There is no reply to retry.")
        last = turns[-1]
        turns = [*turns[:-1], Turn(list(last.files), last.text)]
        running.start(request.session_hash or "")
        return _busy_textbox(), turns, display_history(turns)

    def undo(turns: list[Turn]) -> tuple[Any, list[Turn], list[dict[str, Any]]]:
        turns, message = pop_last_turn(turns)
        textbox_value = gr.update(value=message) if message is not None else gr.update()
        return textbox_value, turns, display_history(turns)

    def api_chat(
        message: dict[str, Any] | str | None,
        max_tokens: float,
        temperature: float,
        top_p: float,
        system: str,
        turns: list[Turn],
    ) -> Iterator[tuple[str, list[Turn]]]:
        """The reply to `message` in this client session's conversation, streamed as text."""
        turns = [*turns, _turn_of(message)]
        settings = ChatSettings(max_tokens, temperature, top_p, system or "")
        with closing(stream_turn(turns, settings)) as updates:
            for _ in updates:
                yield turns[-1].reply, turns

    with gr.Blocks(title=title, fill_height=True, analytics_enabled=False) as demo:
        turns = gr.State([])  # list[Turn]; Gradio gives every browser session its own copy
        gr.Markdown(f"## {title}\n{DESCRIPTION}")
        chatbot = gr.Chatbot(
            label=title,
            show_label=False,
            scale=1,
            height="60vh",
            min_height=360,
            buttons=["copy", "copy_all"],
            placeholder="Ask about your images, or start from an example:",
            examples=examples or None,
            feedback_options=None,
        )
        textbox = gr.MultimodalTextbox(
            file_count="multiple",
            file_types=["image"],
            sources=["upload"],
            placeholder="Ask about the images… (the paperclip attaches several)",
            show_label=False,
            autofocus=True,
            submit_btn=True,
            stop_btn=False,  # shown while a reply streams
        )
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                max_tokens = gr.Slider(
                    1, MAX_TOKENS_LIMIT, value=defaults.max_tokens, step=1, label="Max new tokens"
                )
                temperature = gr.Slider(
                    0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0: greedy)"
                )
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
            system = gr.Textbox(
                value=defaults.system_prompt,
                label="System prompt (optional)",
                lines=2,
                placeholder="e.g. You are a concise assistant.",
            )
        api_reply = gr.Textbox(visible=False, label="reply")  # the output of the /chat API
        settings_inputs = [max_tokens, temperature, top_p, system]
        chat_view = [textbox, turns, chatbot]
        reply_kwargs: dict[str, Any] = {
            "fn": respond,
            "inputs": [turns, *settings_inputs],
            "outputs": [chatbot, turns],
            "concurrency_limit": None,  # the engine batches every session's reply
            "show_progress": "minimal",
            "api_visibility": "undocumented",
        }
        # Instant state changes; no progress overlay (it would cover the textbox's Stop button).
        quick: dict[str, Any] = {
            "queue": False,
            "api_visibility": "undocumented",
            "show_progress": "hidden",
        }

        submitted = textbox.submit(add_turn, [textbox, turns], chat_view, **quick)
        example_picked = chatbot.example_select(add_example_turn, [turns], chat_view, **quick)
        retried = chatbot.retry(forget_last_reply, [turns], chat_view, **quick)
        replies = [event.success(**reply_kwargs) for event in (submitted, example_picked, retried)]
        for reply in replies:
            reply.then(_idle_textbox, None, textbox, **quick)

        textbox.stop(stop_reply, None, None, **quick)
        chatbot.undo(undo, [turns], chat_view, **quick)
        chatbot.clear(clear_chat, None, [turns, chatbot], **quick)

        gr.Button("api", visible=False).click(
            api_chat,
            [textbox, *settings_inputs, turns],
            [api_reply, turns],
            api_name="chat",
            concurrency_limit=None,
        )
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY)
    return demo


def example_messages(examples_dir: Path) -> list[dict[str, Any]]:
    """Chatbot examples (text + image files) whose images are all present in examples_dir."""
    messages = []
    for text, names in EXAMPLES:
        paths = [examples_dir / name for name in names]
        if all(path.is_file() for path in paths):
            messages.append({"text": text, "files": [str(path) for path in paths]})
    return messages


def _turn_of(message: dict[str, Any] | str | None) -> Turn:
    """A new turn from a multimodal-textbox value (or an example: its files are FileData dicts)."""
    if isinstance(message, str):
        return Turn([], message.strip())
    message = message or {}
    files = [f["path"] if isinstance(f, dict) else str(f) for f in message.get("files") or []]
    text = (message.get("text") or "").strip()
    if not files and not text:
        raise gr.Error("Type a question or attach an image first.")
    return Turn(files, text)


def _busy_textbox() -> Any:
    return gr.update(value=None, interactive=False, submit_btn=False, stop_btn=True)


def _idle_textbox() -> Any:
    return gr.update(interactive=True, submit_btn=True, stop_btn=False)
