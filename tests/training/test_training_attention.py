"""Causal attention trains with the eager kernel on CPU (faster than SDPA's backward there) and
the trained model goes back to SDPA; both kernels give the same loss and gradients."""

from __future__ import annotations

import pytest
import torch
from factories import make_model
from training_fixtures import make_record, recipe_dict

from training.collator import Collator
from training.config import TrainConfig
from training.stages import lm_loss
from training.trainer import run_training, use_training_attention
from visualchat.model.modeling import VisualChatModel
from visualchat.processor import VisualChatProcessor


def _kernel(model: VisualChatModel) -> str:
    return model.language_model.config._attn_implementation


def test_only_causal_attention_on_cpu_switches_to_eager() -> None:
    causal, _ = make_model(attention="causal")
    use_training_attention(causal, torch.device("cpu"))
    assert _kernel(causal) == "eager"
    on_gpu, _ = make_model(attention="causal")
    use_training_attention(on_gpu, torch.device("cuda"))  # nothing moves: only the choice
    assert _kernel(on_gpu) == "sdpa"
    mmca, _ = make_model(attention="mmca")
    before = _kernel(mmca)
    use_training_attention(mmca, torch.device("cpu"))
    assert _kernel(mmca) == before != "eager"


def test_eager_and_sdpa_give_the_same_loss_and_gradients() -> None:
    """A padded batch of two conversations of different lengths, several images each."""
    model, tokenizer = make_model(attention="causal")
    processor = VisualChatProcessor(
        tokenizer, model.vision.image_transform(), model.num_image_tokens
    )
    batch = Collator(processor, 1000)([make_record(1, multi=True), make_record(2)])
    assert (batch.attention_mask == 0).any()  # the shorter one is padded

    def loss_and_grads(kernel: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.language_model.set_attn_implementation(kernel)
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    sdpa_loss, sdpa_grads = loss_and_grads("sdpa")
    eager_loss, eager_grads = loss_and_grads("eager")
    torch.testing.assert_close(eager_loss, sdpa_loss, rtol=1e-5, atol=1e-5)
    assert eager_grads.keys() == sdpa_grads.keys() and len(sdpa_grads) > 10
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(eager_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_causal_run_trains_with_eager_and_hands_back_sdpa(
    tmp_path, backbone_dir, train_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    forward = VisualChatModel.forward

    def recording_forward(self, *args, **kwargs):
        if self.training:
            seen.append(_kernel(self))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VisualChatModel, "forward", recording_forward)
    recipe = recipe_dict(backbone_dir, train_dir, tmp_path / "run")
    recipe["model"]["attention"] = "causal"
    result = run_training(TrainConfig.from_dict(recipe))
    assert seen and set(seen) == {"eager"}
    assert result.model.config.attention == "causal"
    assert _kernel(result.model) == "sdpa"
