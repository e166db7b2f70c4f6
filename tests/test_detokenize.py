"""IncrementalDecoder: whole characters only, stop strings never leak, held text comes back."""

from __future__ import annotations

import random

from factories import make_tokenizer

from visualchat.detokenize import REPLACEMENT_CHAR, IncrementalDecoder

FOX = "The quick brown fox jumps over the lazy dog."


def ids_of(text: str) -> list[int]:
    return make_tokenizer()(text, add_special_tokens=False)["input_ids"]


def stream(text: str, stop: tuple[str, ...] = ()) -> tuple[IncrementalDecoder, list[str]]:
    decoder = IncrementalDecoder(make_tokenizer(), stop)
    return decoder, [decoder.add(token_id) for token_id in ids_of(text)]


def test_multibyte_characters_are_never_split() -> None:
    text = "héllo 中文 🙂"
    tokenizer = make_tokenizer()
    ids = ids_of(text)
    # The fixture really splits characters across tokens.
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)
    decoder, deltas = stream(text)
    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)
    assert "".join(deltas) == text == tokenizer.decode(ids)
    assert "" in deltas  # some tokens completed no character
    assert decoder.flush() == ""
    assert decoder.text == text
    assert not decoder.is_stopped


def test_every_prefix_of_the_stream_is_a_prefix_of_the_text() -> None:
    text = "中文 🙂 héllo 中文"
    _, deltas = stream(text)
    shown = ""
    for delta in deltas:
        shown += delta
        assert text.startswith(shown)
    assert shown == text


def test_special_tokens_are_not_shown() -> None:
    tokenizer = make_tokenizer()
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.add(i) for i in [*ids_of("Hello"), tokenizer.eos_token_id]]
    assert "".join(deltas) == "Hello"
    assert deltas[-1] == ""


def test_stop_string_straddling_tokens_is_never_emitted() -> None:
    stop = "n fox"  # tokens ..."w", "n", " f", "o", "x"...: spans four tokens
    tokens = [make_tokenizer().decode([i]) for i in ids_of(FOX)]
    assert not any(stop in token for token in tokens)
    decoder, deltas = stream(FOX, (stop,))
    expected = FOX[: FOX.index(stop)]  # "The quick brow"
    assert "".join(deltas) == expected
    assert decoder.is_stopped
    assert decoder.text == expected
    # After the stop, nothing more comes out, not even from flush.
    assert decoder.add(ids_of(" more")[0]) == ""
    assert decoder.flush() == ""
    shown = ""
    for delta in deltas:
        shown += delta
        assert expected.startswith(shown)


def test_text_that_might_start_a_stop_is_held_then_released() -> None:
    decoder = IncrementalDecoder(make_tokenizer(), ("fox!",))
    shown = []
    for token_id in ids_of(FOX):
        shown.append(decoder.add(token_id))
        so_far = "".join(shown)
        if decoder.text.endswith(" fo"):
            assert so_far == decoder.text[: -len("fo")]  # "fo" could begin "fox!"
        if decoder.text.endswith(" fox"):
            assert so_far == decoder.text[: -len("fox")]
    # "fox" was followed by " ", not "!": it came out, and the whole text with it.
    assert "".join(shown) == FOX
    assert not decoder.is_stopped


def test_flush_releases_a_held_partial_stop() -> None:
    decoder, deltas = stream("The quick brown fo", ("fox!",))
    assert "".join(deltas) == "The quick brown "
    assert decoder.flush() == "fo"
    assert decoder.flush() == ""


def test_earliest_of_several_stop_strings_wins() -> None:
    decoder, deltas = stream(FOX, ("lazy", "jumps", "dog"))
    assert "".join(deltas) == "The quick brown fox "
    assert decoder.text == "The quick brown fox "


def test_stop_string_with_multibyte_characters() -> None:
    # The stop's last character (🙂) arrives in three byte-level tokens: while it is incomplete
    # the text ends in U+FFFD, and "文 " (the start of the stop) must still be held back.
    decoder, deltas = stream("héllo 中文 🙂 more", ("文 🙂",))
    assert "".join(deltas) == "héllo 中"
    assert decoder.text == "héllo 中"
    assert decoder.is_stopped


def test_stop_string_at_the_very_start() -> None:
    decoder = IncrementalDecoder(make_tokenizer(), ("Hel",))
    first, *rest = ids_of("Hello world!")
    assert decoder.add(first) == ""  # the first token is "Hel"
    assert decoder.is_stopped
    assert [decoder.add(i) for i in rest] == [""] * len(rest)
    assert decoder.text == ""
    assert decoder.flush() == ""


def test_random_token_streams_equal_the_full_decode_and_flush_keeps_a_cut_character() -> None:
    # The windowed decode must agree with decoding the whole reply, whatever the ids.
    tokenizer = make_tokenizer()
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        decoder = IncrementalDecoder(tokenizer)
        streamed = "".join(decoder.add(i) for i in ids) + decoder.flush()
        assert streamed == decoder.text == tokenizer.decode(ids, skip_special_tokens=True)
    ids = ids_of("🙂")  # one character, several byte tokens
    assert len(ids) > 1 and REPLACEMENT_CHAR in tokenizer.decode(ids[:1])
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.add(ids[0]) == "" and decoder.flush() == tokenizer.decode(ids[:1])
