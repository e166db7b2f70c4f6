"""ChatSession: the multi-round chat state (send, stream, undo, retry, reset) over any backend
that can stream a reply to a Conversation — the reference decoder or the serving engine."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol

from visualchat.images import ImageSource
from visualchat.messages import Conversation, Message
from visualchat.sampling import SamplingParams

logger = logging.getLogger(__name__)


class ReplyStreamer(Protocol):
    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        """Yield text deltas of the assistant's reply to the conversation's last user turn."""
        ...


class ChatSession:
    """A conversation with one model. Failed sends leave the history exactly as it was."""

    def __init__(
        self,
        backend: ReplyStreamer,
        system: str | None = None,
        params: SamplingParams | None = None,
    ) -> None:
        self.backend = backend
        self.system = system
        self.params = params or SamplingParams(max_tokens=512)
        self.conversation = Conversation()
        self.reset()

    @property
    def messages(self) -> list[Message]:
        return list(self.conversation.messages)

    def reset(self) -> None:
        self.conversation = Conversation()
        if self.system:
            self.conversation.add_system(self.system)

    def send(self, text: str, images: Sequence[ImageSource] = (), **params: Any) -> str:
        return "".join(self.stream(text, images, **params))

    def stream(self, text: str, images: Sequence[ImageSource] = (), **params: Any) -> Iterator[str]:
        """Add a user turn and stream the reply. Stopping early (closing the iterator) keeps the
        partial reply as the assistant's turn, as a chat UI's Stop button does; an error before
        any text leaves the history as it was."""
        if not text and not images:
            raise ValueError("send text, images or both")
        sampling = self._params(params)
        self.conversation.add_user(text, list(images))
        yield from self._reply(sampling, rollback_user=True)

    def retry(self, **params: Any) -> str:
        """Drop the last reply and generate it again (a new sample unless greedy/seeded)."""
        return "".join(self.retry_stream(**params))

    def retry_stream(self, **params: Any) -> Iterator[str]:
        if not self.conversation.messages or self.conversation.messages[-1].role != "assistant":
            raise ValueError("nothing to retry: the last message is not a reply")
        sampling = self._params(params)
        removed = self.conversation.messages.pop()
        yield from self._reply(sampling, restore=removed)

    def undo(self) -> list[Message]:
        """Remove the last exchange (reply and the user turn that asked it); return it."""
        messages = self.conversation.messages
        removed: list[Message] = []
        if messages and messages[-1].role == "assistant":
            removed.insert(0, messages.pop())
        if messages and messages[-1].role == "user":
            removed.insert(0, messages.pop())
        return removed

    def _params(self, overrides: dict[str, Any]) -> SamplingParams:
        return replace(self.params, **overrides) if overrides else self.params

    def _reply(
        self, params: SamplingParams, rollback_user: bool = False, restore: Message | None = None
    ) -> Iterator[str]:
        parts: list[str] = []
        keep = False
        deltas: Iterator[str] | None = None
        try:
            deltas = self.backend.stream(self.conversation.copy(), params)
            for delta in deltas:
                parts.append(delta)
                yield delta
            keep = True
        except GeneratorExit:
            keep = True  # the caller stopped reading: keep what was shown
            raise
        except BaseException:
            keep = bool(parts)  # a partial reply was already shown; keep it, report the error
            if not keep:
                self._rollback(rollback_user, restore)
            raise
        finally:
            close = getattr(deltas, "close", None) if deltas is not None else None
            if close is not None:
                close()  # lets an engine abort the request and free its cache blocks
            if keep:
                self.conversation.add_assistant("".join(parts))

    def _rollback(self, rollback_user: bool, restore: Message | None) -> None:
        if rollback_user and self.conversation.messages:
            self.conversation.messages.pop()
        if restore is not None:
            self.conversation.messages.append(restore)
