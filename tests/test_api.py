"""VisualChat: the Python API, its streaming backend and the image feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import BLUE, GREEN, RED, YELLOW, make_conversation, make_image, make_visualchat

from visualchat.api import ImageFeatureCache, VisualChat
from visualchat.sampling import SamplingParams
from visualchat.session import ChatSession

GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)


def test_stream_yields_the_non_empty_deltas_of_generate() -> None:
    vc = make_visualchat()
    conversation = make_conversation([make_image(RED), "héllo 中文 🙂?"])
    deltas = list(vc.stream(conversation, SamplingParams(max_tokens=12, ignore_eos=True)))
    output = vc.generate(conversation, SamplingParams(max_tokens=12, ignore_eos=True))
    assert all(deltas)
    assert "".join(deltas) == output.text
    assert len(output.token_ids) == 12


def test_process_uses_the_models_image_tokens() -> None:
    vc = make_visualchat(projector="perceiver")
    inputs = vc.process(make_conversation([make_image(RED), make_image(GREEN), "two"]))
    assert [(s.length, s.image_index) for s in inputs.image_spans] == [(4, 0), (4, 1)]
    assert inputs.pixel_values.shape == (2, 3, 32, 32)
    assert vc.processor.max_length == 512
    assert inputs.input_ids[inputs.image_spans[0].start].item() == vc.model.config.image_token_id


def test_chat_returns_a_session_over_this_model() -> None:
    vc = make_visualchat()
    session = vc.chat(system="Be brief.", params=GREEDY)
    assert isinstance(session, ChatSession)
    assert session.backend is vc
    assert session.params == GREEDY
    assert session.messages[0].text == "Be brief."


def test_an_image_already_sent_is_not_encoded_again() -> None:
    vc = make_visualchat()
    session = vc.chat(params=GREEDY)
    red, green = make_image(RED), make_image(GREEN)
    session.send("Compare these.", images=[red, green])
    assert vc.image_cache.num_encoded == 2
    # Round 2 re-sends the whole conversation, both images included: nothing new to encode.
    session.send("Which is brighter?")
    assert vc.image_cache.num_encoded == 2
    # The same pixels arriving as a new object are recognised by their digest.
    session.send("And this one?", images=[make_image(RED)])
    assert vc.image_cache.num_encoded == 2
    session.send("And this one?", images=[make_image(BLUE)])
    assert vc.image_cache.num_encoded == 3


def test_cached_features_give_the_same_reply_as_a_fresh_model() -> None:
    cached = make_visualchat()
    session = cached.chat(params=GREEDY)
    session.send("first", images=[make_image(RED)])
    reply = session.send("second", images=[make_image(GREEN)])
    fresh = make_visualchat()
    conversation = make_conversation(
        [make_image(RED), "first"], session.messages[1].text, [make_image(GREEN), "second"]
    )
    assert fresh.generate(conversation, GREEDY).text == reply


def test_an_image_twice_in_one_request_is_encoded_once() -> None:
    vc = make_visualchat()
    vc.generate(make_conversation([make_image(RED), make_image(RED), "twins?"]), GREEDY)
    assert vc.image_cache.num_encoded == 1


def test_the_cache_is_bounded() -> None:
    vc = make_visualchat()
    vc.image_cache = ImageFeatureCache(max_entries=2)
    colors = [RED, GREEN, BLUE, YELLOW]
    for color in colors:
        vc.generate(make_conversation([make_image(color), "one"]), GREEDY)
        assert len(vc.image_cache._entries) <= 2
    assert vc.image_cache.num_encoded == 4
    # Blue and yellow are the two most recent: cached. Red was evicted: encoded again.
    vc.generate(make_conversation([make_image(BLUE), make_image(YELLOW), "two"]), GREEDY)
    assert vc.image_cache.num_encoded == 4
    vc.generate(make_conversation([make_image(RED), "again"]), GREEDY)
    assert vc.image_cache.num_encoded == 5


def test_cache_features_match_encode_images() -> None:
    vc = make_visualchat()
    inputs = vc.process(make_conversation([make_image(RED), make_image(GREEN), "two"]))
    features = vc.image_cache.features(vc.model, inputs)
    with torch.no_grad():
        expected = vc.model.encode_images(inputs.pixel_values)
    assert features.shape == (2, 16, 32)
    assert torch.equal(features, expected)
    assert vc.image_cache.features(vc.model, vc.process(make_conversation("text"))) is None


def test_save_and_from_pretrained(tmp_path: Path) -> None:
    vc = make_visualchat()
    conversation = make_conversation([make_image(RED), "hi"])
    expected = vc.generate(conversation, GREEDY)
    vc.save_pretrained(tmp_path / "ckpt")
    loaded = VisualChat.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.model.config.attention == "mmca"
    assert loaded.generate(conversation, GREEDY).token_ids == expected.token_ids
    causal = VisualChat.from_pretrained(tmp_path / "ckpt", device="cpu", attention="causal")
    assert causal.model.config.attention == "causal"
    assert causal.model.language_model.config._attn_implementation == "sdpa"


def test_from_pretrained_of_a_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a VisualChat checkpoint"):
        VisualChat.from_pretrained(tmp_path / "missing")


def test_top_level_lazy_exports() -> None:
    import visualchat

    assert visualchat.VisualChat is VisualChat
    assert visualchat.ChatSession is ChatSession
    assert visualchat.SamplingParams is SamplingParams
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        visualchat.Nope  # noqa: B018
