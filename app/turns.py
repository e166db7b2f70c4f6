"""Turn: one round of the web chat (the user's images and text, and the reply), and the two views
of a list of turns — the history the model reads and the messages the Chatbot shows.

The UI keeps `list[Turn]` in per-session Gradio state rather than reading the Chatbot's value
back, because the two views differ: the Chatbot labels every image with the number the model
knows it by ("Image 3"), and shows failed turns (with their warning) that the model never sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

EMPTY_REPLY = "_(no reply)_"  # shown for a reply that ended before any text


@dataclass
class Turn:
    files: list[str] = field(default_factory=list)  # uploaded file paths, in upload order
    text: str = ""  # the question typed with them
    reply: str = ""  # the assistant's reply so far
    is_error: bool = False  # reply is a warning: this turn is left out of the model's history
    is_done: bool = False  # the reply finished or was stopped

    @property
    def message(self) -> dict[str, Any]:
        """The multimodal-textbox value that asked this turn."""
        return {"text": self.text, "files": list(self.files)}


def model_history(turns: list[Turn]) -> list[dict[str, Any]]:
    """The Gradio client-shape history of the turns the model saw (failed turns left out)."""
    history: list[dict[str, Any]] = []
    for turn in turns:
        if turn.is_error:
            continue
        history += [{"role": "user", "content": {"path": path}} for path in turn.files]
        if turn.text:
            history.append({"role": "user", "content": turn.text})
        history.append({"role": "assistant", "content": turn.reply})
    return history


def image_label(number: int) -> str:
    return f"Image {number}"


def display_history(turns: list[Turn]) -> list[dict[str, Any]]:
    """Chatbot messages: each image under a caption with its conversation-wide number (the
    numbering of `visualchat.processor`, counting only turns the model saw), then the text."""
    messages: list[dict[str, Any]] = []
    num_images = 0
    for turn in turns:
        content: list[Any] = []
        for path in turn.files:
            if turn.is_error:
                label = f"{os.path.basename(path)} (not sent)"
            else:
                num_images += 1
                label = image_label(num_images)
            content += [f"**{label}**", {"path": path, "alt_text": label}]
        if turn.text:
            content.append(turn.text)
        if content:
            messages.append({"role": "user", "content": content})
        if turn.reply or turn.is_done:
            messages.append({"role": "assistant", "content": turn.reply or EMPTY_REPLY})
    return messages


def pop_last_turn(turns: list[Turn]) -> tuple[list[Turn], dict[str, Any] | None]:
    """Undo: the turns without the last one, and that turn's message (to edit and resend)."""
    if not turns:
        return [], None
    return turns[:-1], turns[-1].message
