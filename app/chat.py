"""The web chat's chat function, as plain Python (no Gradio import), testable without a browser.

Given the Gradio chat history (either shape `Conversation.from_gradio` reads), the new
multimodal-textbox message `{"text": ..., "files": [...]}` and the settings, build the
Conversation and stream the reply through an `EngineLoop`, yielding the growing reply text.

Bad input never escapes as an exception: a file that is not an image, an oversized image, too
many images, a conversation longer than the context or a malformed history becomes one readable
"⚠️ ..." reply, flagged `is_error` so the UI can keep that turn out of what the model sees next.

Stopping. Two ways end a reply early, and both abort the engine request, which frees its
KV-cache blocks at once instead of generating to max_tokens for nobody:
- closing the generator (Gradio's `cancels=`, used by the `/chat` API's clients): `stream_reply`
  closes the engine stream in its `finally`, and that stream's own `finally` aborts;
- `ReplyControl.stop()` from another thread (the web chat's Stop and Clear): it aborts the request
  by its id, so the engine stream ends with an "abort" output and the reply ends normally.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from visualchat.images import ImageLimits
from visualchat.messages import Conversation, Message, TextPart
from visualchat.sampling import SamplingParams

if TYPE_CHECKING:
    from serving.engine import RequestOutput

logger = logging.getLogger(__name__)

WARNING = "⚠️"
# The browser sends files from Gradio's upload folder (Gradio refuses any other path), so the UI
# may read local files; it never fetches URLs.
UI_LIMITS = ImageLimits(allow_remote=False, allow_local_files=True)
# from_gradio names a bad file of the new message by its index ("message.files[2]: ..."); the
# user knows it by its number in the conversation.
_NEW_FILE_ERROR = re.compile(r"^message\.files\[(\d+)\]: ")


class ReplyBackend(Protocol):
    """What the chat needs from the engine: `EngineLoop` satisfies it."""

    def stream_outputs(
        self,
        conversation: Conversation,
        params: SamplingParams,
        limits: ImageLimits | None = None,
        request_id: str | None = None,
    ) -> Iterator[RequestOutput]: ...  # closing it aborts the request

    def abort(self, request_id: str) -> None: ...  # from any thread; unknown ids are ignored


class ReplyControl:
    """Stops one streaming reply from another thread: the web chat's Stop and Clear buttons.

    Why not Gradio's `cancels=`: when the cancel's completion message reaches the page while the
    reply's own messages are still being read, Gradio 6's page marks the reply's event as failed,
    and the Chatbot then covers the whole conversation with an "Error" panel (seen about one Stop
    in ten). A reply stopped here ends like any other, so its event completes normally.
    """

    def __init__(self, backend: ReplyBackend) -> None:
        self.backend = backend
        self.request_id = f"chat-{uuid.uuid4().hex}"  # the engine request, named before it exists
        self.discarded = False  # Clear: the reply is not to be shown any more
        self._stopped = threading.Event()
        self._ended = threading.Event()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self, discard: bool = False) -> None:
        self.discarded = self.discarded or discard
        self._stopped.set()
        self.backend.abort(self.request_id)

    def end(self) -> None:
        """Called by the reply when it has yielded its last update."""
        self._ended.set()

    def wait_ended(self, timeout: float) -> bool:
        return self._ended.wait(timeout)


class SessionReplies:
    """The reply each browser session has under way, keyed by Gradio's session hash: at most one,
    since the textbox is a Stop button meanwhile. A control is made when the turn is added, so a
    Stop pressed before the reply's event has started still finds it."""

    def __init__(self, backend: ReplyBackend) -> None:
        self._backend = backend
        self._controls: dict[str, ReplyControl] = {}
        self._lock = threading.Lock()  # Gradio runs each session's events on worker threads

    def start(self, session: str) -> ReplyControl:
        control = ReplyControl(self._backend)
        with self._lock:
            earlier, self._controls[session] = self._controls.get(session), control
        if earlier is not None:  # not expected (see above); never leave a reply running unseen
            earlier.stop()
        return control

    def current(self, session: str) -> ReplyControl | None:
        with self._lock:
            return self._controls.get(session)

    def finish(self, session: str, control: ReplyControl) -> None:
        with self._lock:
            if self._controls.get(session) is control:
                del self._controls[session]
        control.end()

    def stop(self, session: str, discard: bool = False) -> ReplyControl | None:
        """Stop the session's reply, if any; discard: do not show it any more (Clear)."""
        control = self.current(session)
        if control is not None:
            control.stop(discard)
        return control


class BackendUnavailable(RuntimeError):
    """No engine can answer now (the model is still loading); shown to the user as is."""


@dataclass(frozen=True)
class ChatSettings:
    """The settings accordion of the web chat."""

    max_tokens: int = 512  # new tokens at most
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    system_prompt: str = ""  # empty: no system message

    def sampling_params(self) -> SamplingParams:
        """Raises ValueError (shown as a chat message) for values out of range."""
        # Sliders may deliver 512.0; SamplingParams wants an int.
        max_tokens = self.max_tokens
        if isinstance(max_tokens, float) and max_tokens.is_integer():
            max_tokens = int(max_tokens)
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(self.temperature), top_p=float(self.top_p)
        )


@dataclass(frozen=True)
class Reply:
    """One streamed state of the assistant's reply."""

    text: str  # the whole reply so far (or the warning, when is_error)
    is_error: bool = False  # text is a warning; the turn never reached the model or failed
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last update


def build_conversation(
    history: Sequence[Any] | None,
    message: str | Mapping[str, Any] | None,
    system_prompt: str = "",
) -> Conversation:
    """The Conversation for history + message; a non-empty system prompt replaces the history's
    own system message, if any. Raises ValueError for malformed input."""
    conversation = Conversation.from_gradio(history, message)
    if system_prompt.strip():
        if conversation.system is not None:
            conversation.messages.pop(0)
        conversation.messages.insert(0, Message("system", [TextPart(system_prompt)]))
    return conversation


def stream_reply(
    backend: ReplyBackend,
    history: Sequence[Any] | None,
    message: str | Mapping[str, Any] | None,
    settings: ChatSettings | None = None,
    limits: ImageLimits = UI_LIMITS,
    control: ReplyControl | None = None,
) -> Iterator[Reply]:
    """Stream the reply to `message` after `history`, one `Reply` per new piece of text.

    `message` is the multimodal textbox value or a string; None when the history already ends
    with the user turn to answer (Retry). Errors end the stream with one `is_error` Reply.
    control: lets another thread stop the reply; it then ends with finish_reason "abort".
    """
    settings = settings or ChatSettings()
    try:
        conversation = build_conversation(history, message, settings.system_prompt)
        params = settings.sampling_params()
    except ValueError as err:
        yield Reply(_warning(err, history), is_error=True)
        return
    if not conversation.messages or conversation.messages[-1].role != "user":
        yield Reply(f"{WARNING} Type a question or attach an image first.", is_error=True)
        return
    if control is not None and control.stopped:  # stopped before it began: ask the engine nothing
        yield Reply("", finish_reason="abort")
        return
    text = ""
    outputs: Iterator[RequestOutput] | None = None
    try:
        request_id = control.request_id if control is not None else None
        outputs = backend.stream_outputs(conversation, params, limits, request_id)
        for out in outputs:
            text += out.delta
            if control is not None and control.stopped and not out.finished:
                # A stop whose abort reached the engine before the request did (while its images
                # were decoded) was lost there: end here, at the first output, instead.
                yield Reply(text, finish_reason="abort")
                return
            if out.delta or out.finished:
                yield Reply(text, finish_reason=out.finish_reason)
    except ValueError as err:  # ImageError, ContextLengthError: raised before any text
        yield Reply(_warning(err, history), is_error=True)
    except BackendUnavailable as err:
        yield Reply(f"{WARNING} {err}", is_error=True)
    except Exception as err:  # an engine failure: report it, keep the app running
        logger.exception("generating a reply failed")
        yield Reply(
            f"{text}\n\n{WARNING} The reply failed ({type(err).__name__}: {err}).".lstrip(),
            is_error=not text,
        )
    finally:
        # However this generator ends (finished, failed, or closed by a Stop), close the engine
        # stream: its own `finally` aborts the request if it is still running.
        close = getattr(outputs, "close", None)
        if close is not None:
            close()


def make_chat_fn(
    backend: ReplyBackend, limits: ImageLimits = UI_LIMITS
) -> Callable[..., Iterator[str]]:
    """A `gr.ChatInterface`-style function `(message, history, max_tokens, temperature, top_p,
    system_prompt)` yielding the growing reply text (warnings included)."""

    def chat(
        message: str | Mapping[str, Any] | None,
        history: Sequence[Any] | None,
        max_tokens: int = ChatSettings.max_tokens,
        temperature: float = ChatSettings.temperature,
        top_p: float = ChatSettings.top_p,
        system_prompt: str = ChatSettings.system_prompt,
    ) -> Iterator[str]:
        settings = ChatSettings(max_tokens, temperature, top_p, system_prompt or "")
        with closing(stream_reply(backend, history, message, settings, limits)) as replies:
            for reply in replies:
                yield reply.text

    return chat


def _warning(err: Exception, history: Sequence[Any] | None) -> str:
    text = str(err)
    match = _NEW_FILE_ERROR.match(text)
    if match is not None:
        try:
            num_earlier = Conversation.from_gradio(history).num_images
        except ValueError:
            num_earlier = 0
        text = f"Image {num_earlier + int(match.group(1)) + 1}: {text[match.end() :]}"
    return f"{WARNING} {text}"
