"""ChatSession: send / stream / undo / retry / reset and failure semantics, over a fake backend
and over a real tiny VisualChat."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import BLUE, GREEN, RED, make_image, make_model, make_visualchat, png_bytes

from visualchat.images import ImageError
from visualchat.messages import Conversation, ImagePart, Message
from visualchat.processor import ContextLengthError
from visualchat.sampling import SamplingParams
from visualchat.session import ChatSession


def summary(conversation: Conversation | list[Message]) -> list[tuple[str, str, int]]:
    messages = conversation.messages if isinstance(conversation, Conversation) else conversation
    return [(m.role, m.text, len(m.images)) for m in messages]


class FakeBackend:
    """Streams fixed deltas; records the conversations and params it was given. `fail_after`
    raises RuntimeError after that many deltas (0: before any text)."""

    def __init__(self, *replies: list[str], fail_after: int | None = None) -> None:
        self.replies = list(replies) or [["Hel", "lo", "!"]]
        self.fail_after = fail_after
        self.calls: list[tuple[list[tuple[str, str, int]], SamplingParams]] = []
        self.num_closed = 0

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        self.calls.append((summary(conversation), params))
        deltas = self.replies[min(len(self.calls), len(self.replies)) - 1]
        try:
            for i, delta in enumerate(deltas):
                if self.fail_after == i:
                    raise RuntimeError("backend exploded")
                yield delta
            if self.fail_after == len(deltas):
                raise RuntimeError("backend exploded")
        finally:
            self.num_closed += 1


class EagerFailingBackend:
    """A backend whose stream() validates eagerly and raises before returning an iterator
    (e.g. an engine refusing a request up front); the protocol only asks for an iterator."""

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        raise ValueError("request refused")


# --- over a fake backend ----------------------------------------------------------------------


def test_send_adds_the_exchange_and_passes_the_conversation() -> None:
    backend = FakeBackend()
    session = ChatSession(backend, system="Be brief.", params=SamplingParams(max_tokens=9))
    assert session.send("hi") == "Hello!"
    assert summary(session.messages) == [
        ("system", "Be brief.", 0),
        ("user", "hi", 0),
        ("assistant", "Hello!", 0),
    ]
    assert backend.calls == [
        ([("system", "Be brief.", 0), ("user", "hi", 0)], SamplingParams(max_tokens=9))
    ]


def test_messages_is_a_copy() -> None:
    session = ChatSession(FakeBackend())
    session.send("hi")
    session.messages.clear()
    assert len(session.messages) == 2


def test_stream_yields_the_deltas_then_records_the_reply() -> None:
    backend = FakeBackend(["a", "b", "c"])
    session = ChatSession(backend)
    stream = session.stream("hi")
    assert session.messages == []  # nothing happens until the stream is read
    assert list(stream) == ["a", "b", "c"]
    assert summary(session.messages) == [("user", "hi", 0), ("assistant", "abc", 0)]
    assert backend.num_closed == 1


def test_second_round_sees_the_first() -> None:
    backend = FakeBackend(["one"], ["two"])
    session = ChatSession(backend)
    session.send("first")
    assert session.send("second") == "two"
    assert backend.calls[1][0] == [
        ("user", "first", 0),
        ("assistant", "one", 0),
        ("user", "second", 0),
    ]


def test_per_call_params_override_the_session_params() -> None:
    backend = FakeBackend()
    session = ChatSession(backend, params=SamplingParams(max_tokens=50, temperature=0.5))
    session.send("hi", max_tokens=3, stop=("x",))
    assert backend.calls[0][1] == SamplingParams(max_tokens=3, temperature=0.5, stop=("x",))
    assert session.params == SamplingParams(max_tokens=50, temperature=0.5)
    assert ChatSession(backend).params == SamplingParams(max_tokens=512)


def test_invalid_params_leave_the_history_unchanged() -> None:
    session = ChatSession(FakeBackend())
    session.send("hi")
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        session.send("again", max_tokens=0)
    assert summary(session.messages) == [("user", "hi", 0), ("assistant", "Hello!", 0)]


def test_empty_send_is_refused() -> None:
    session = ChatSession(FakeBackend())
    with pytest.raises(ValueError, match="send text, images or both"):
        session.send("")
    assert session.messages == []


def test_undo_removes_the_last_exchange() -> None:
    session = ChatSession(FakeBackend(["one"], ["two"]), system="sys")
    session.send("first")
    session.send("second")
    removed = session.undo()
    assert summary(removed) == [("user", "second", 0), ("assistant", "two", 0)]
    assert summary(session.messages) == [
        ("system", "sys", 0),
        ("user", "first", 0),
        ("assistant", "one", 0),
    ]
    session.undo()
    assert summary(session.messages) == [("system", "sys", 0)]
    assert session.undo() == []  # the system prompt stays
    assert summary(session.messages) == [("system", "sys", 0)]


def test_reset_keeps_only_the_system_prompt() -> None:
    session = ChatSession(FakeBackend(), system="sys")
    session.send("hi")
    session.reset()
    assert summary(session.messages) == [("system", "sys", 0)]
    bare = ChatSession(FakeBackend())
    bare.send("hi")
    bare.reset()
    assert bare.messages == []


def test_retry_regenerates_the_last_reply() -> None:
    backend = FakeBackend(["one"], ["again"])
    session = ChatSession(backend)
    session.send("hi")
    assert session.retry(temperature=0.9) == "again"
    assert summary(session.messages) == [("user", "hi", 0), ("assistant", "again", 0)]
    # The backend saw the conversation without the old reply.
    assert backend.calls[1][0] == [("user", "hi", 0)]
    assert backend.calls[1][1].temperature == 0.9


def test_retry_needs_a_reply() -> None:
    session = ChatSession(FakeBackend())
    with pytest.raises(ValueError, match="nothing to retry: the last message is not a reply"):
        session.retry()


def test_error_before_any_text_leaves_the_history_unchanged() -> None:
    backend = FakeBackend(["one"], ["never"], fail_after=None)
    session = ChatSession(backend)
    session.send("first")
    backend.fail_after = 0
    with pytest.raises(RuntimeError, match="backend exploded"):
        session.send("second", images=[make_image(RED)])
    assert summary(session.messages) == [("user", "first", 0), ("assistant", "one", 0)]


def test_eager_backend_error_leaves_the_history_unchanged() -> None:
    session = ChatSession(EagerFailingBackend())
    with pytest.raises(ValueError, match="request refused"):
        session.send("hi")
    assert session.messages == []


def test_eager_backend_error_on_retry_restores_the_old_reply() -> None:
    session = ChatSession(FakeBackend(["one"]))
    session.send("hi")
    session.backend = EagerFailingBackend()
    with pytest.raises(ValueError, match="request refused"):
        session.retry()
    assert summary(session.messages) == [("user", "hi", 0), ("assistant", "one", 0)]


def test_error_after_some_text_keeps_the_partial_reply() -> None:
    session = ChatSession(FakeBackend(["par", "tial", "!"], fail_after=2))
    shown = []
    with pytest.raises(RuntimeError, match="backend exploded"):
        for delta in session.stream("hi"):
            shown.append(delta)
    assert shown == ["par", "tial"]
    assert summary(session.messages) == [("user", "hi", 0), ("assistant", "partial", 0)]


def test_closing_the_stream_early_keeps_the_partial_reply() -> None:
    backend = FakeBackend(["a", "b", "c", "d"])
    session = ChatSession(backend)
    stream = session.stream("hi")
    assert next(stream) == "a"
    assert next(stream) == "b"
    stream.close()
    assert summary(session.messages) == [("user", "hi", 0), ("assistant", "ab", 0)]
    assert backend.num_closed == 1  # the backend's stream was closed too (engine abort)
    assert session.send("more") == "abcd"


def test_retry_restores_the_old_reply_when_it_fails() -> None:
    backend = FakeBackend(["one"])
    session = ChatSession(backend)
    session.send("hi")
    backend.fail_after = 0
    with pytest.raises(RuntimeError, match="backend exploded"):
        session.retry()
    assert summary(session.messages) == [("user", "hi", 0), ("assistant", "one", 0)]


def test_images_reach_the_backend_in_order(tmp_path: Path) -> None:
    backend = FakeBackend()
    session = ChatSession(backend)
    red, green = make_image(RED), make_image(GREEN)
    session.send("compare", images=[red, png_bytes(green)])
    user = session.messages[0]
    assert [p.image for p in user.parts if isinstance(p, ImagePart)] == [red, png_bytes(green)]
    assert backend.calls[0][0] == [("user", "compare", 2)]


# --- over a real tiny VisualChat ------------------------------------------------------------------


@pytest.fixture(scope="module")
def vc():
    return make_visualchat()


def test_real_session_send_equals_generate(vc, tmp_path: Path) -> None:
    path = tmp_path / "blue.png"
    make_image(BLUE).save(path)
    params = SamplingParams(max_tokens=6)
    session = vc.chat(system="Be brief.", params=params)
    # Images as PIL, bytes and path all work.
    reply = session.send("Compare.", images=[make_image(RED), png_bytes(make_image(GREEN)), path])
    conversation = Conversation()
    conversation.add_system("Be brief.")
    conversation.add_user("Compare.", [make_image(RED), make_image(GREEN), make_image(BLUE)])
    expected = vc.generate(conversation, params)
    assert reply == expected.text
    assert reply  # the tiny model says something
    assert summary(session.messages) == [
        ("system", "Be brief.", 0),
        ("user", "Compare.", 3),
        ("assistant", reply, 0),
    ]
    second = session.send("And now?")
    conversation.add_assistant(reply)
    conversation.add_user("And now?")
    assert second == vc.generate(conversation, params).text


def test_real_session_stream_close_undo_retry(vc) -> None:
    session = vc.chat(params=SamplingParams(max_tokens=8, ignore_eos=True))
    full = session.send("Hello world!", images=[make_image(RED)])
    session.undo()
    assert session.messages == []
    stream = session.stream("Hello world!", images=[make_image(RED)])
    first = next(stream)
    stream.close()
    assert full.startswith(first)
    assert summary(session.messages) == [("user", "Hello world!", 1), ("assistant", first, 0)]
    assert session.retry() == full  # greedy: the same reply again
    assert summary(session.messages)[-1] == ("assistant", full, 0)


def test_real_session_errors_leave_the_history_unchanged(vc, tmp_path: Path) -> None:
    session = vc.chat(params=SamplingParams(max_tokens=3))
    session.send("hi")
    before = summary(session.messages)
    with pytest.raises(ImageError, match=r"^Image 1 \(.*missing\.png\): image file not found"):
        session.send("look", images=[tmp_path / "missing.png"])
    assert summary(session.messages) == before
    too_many = [make_image((i, 0, 0)) for i in range(17)]
    with pytest.raises(ImageError, match=r"^too many images: 17 \(max 16 per conversation"):
        session.send("all of these", images=too_many)
    assert summary(session.messages) == before


def test_real_session_context_overflow_leaves_the_history_unchanged() -> None:
    from visualchat.api import VisualChat

    model, tokenizer = make_model()
    model.language_model.config.max_position_embeddings = 60
    session = VisualChat(model, tokenizer).chat(params=SamplingParams(max_tokens=3))
    session.send("hi", images=[make_image(RED)])  # ~30 tokens
    before = summary(session.messages)
    with pytest.raises(ContextLengthError, match=r"but the model's context is 60; start a new"):
        session.send("and these", images=[make_image(GREEN), make_image(BLUE)])
    assert summary(session.messages) == before
