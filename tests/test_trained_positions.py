"""Logits only where a trained token follows: the loss and every gradient are those of the full
logits, for padded and packed batches, for the tiny Llama with a LoRA on its head and for a tiny
Gemma-2 with its final soft-cap; a model that does not fit keeps full logits.

Run: ``python -m pytest -q tests/test_trained_positions.py`` (about 10 s on two cores).
"""

from __future__ import annotations

import pytest
import torch

from socratune.data.packing import make_collator
from socratune.data.template import IGNORE_INDEX, PaddingCollator, encode_dialogues
from socratune.model.modeling import add_lora
from socratune.training.hf_trainer import (
    as_features,
    head_fits_trained_positions,
    head_on_trained_positions,
)


@pytest.fixture(scope="module")
def tiny_with_lora():
    from socratune.model.tiny import build_tiny

    model, tokenizer = build_tiny(seed=0)
    torch.manual_seed(0)
    lora = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
                    bias="none", quantized=False, gradient_checkpointing=False)
    for name, parameter in lora.named_parameters():  # LoRA B starts at zero: give the head's adapter a say
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return lora, tokenizer


@pytest.fixture(scope="module")
def features(tiny_with_lora):
    from socratune.data.dialogues import load_dialogues
    from socratune.training.examples import bundled_data_path

    _, tokenizer = tiny_with_lora
    path = bundled_data_path()
    examples, _ = encode_dialogues(tokenizer, load_dialogues(path).kept[:6], str(path), max_seq_len=384)
    return as_features(examples)


def loss_and_gradients(model, batch, trained_only: bool):
    model.zero_grad()
    if trained_only:
        with head_on_trained_positions(model.get_output_embeddings(), batch["labels"]) as targets:
            loss = model(**batch, shift_labels=targets).loss
    else:
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_loss_and_gradients_equal_those_of_full_logits(tiny_with_lora, features, batching):
    model, tokenizer = tiny_with_lora
    batch = make_collator(batching, model, tokenizer.pad_token_id)(features)
    model.train()
    full_loss, full_grads = loss_and_gradients(model, batch, trained_only=False)
    loss, grads = loss_and_gradients(model, batch, trained_only=True)
    assert torch.allclose(loss, full_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(full_grads) and any("lm_head" in n for n in grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, full_grads[name], rtol=1e-4, atol=1e-7), name


def test_the_head_sees_only_positions_followed_by_a_trained_token(tiny_with_lora, features):
    model, tokenizer = tiny_with_lora
    batch = PaddingCollator(tokenizer.pad_token_id)(features)
    seen = []
    probe = model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        with torch.no_grad(), head_on_trained_positions(model.get_output_embeddings(), batch["labels"]) as targets:
            model(**batch, shift_labels=targets)
    finally:
        probe.remove()
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert seen[0][0] == trained == len(targets)
    assert trained < 0.8 * batch["input_ids"].numel()  # user turns, markers and padding are skipped


def test_gemma2_final_soft_cap_applies_to_the_kept_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, initializer_range=0.2,
                          final_logit_softcapping=3.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    assert head_fits_trained_positions(model)
    input_ids = torch.randint(0, 128, (2, 12))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX
    with torch.no_grad(), head_on_trained_positions(model.get_output_embeddings(), labels) as targets:
        kept = model(input_ids=input_ids, labels=labels, shift_labels=targets).logits
    assert kept.abs().max() <= 3.0 + 1e-5 and kept.abs().max() > 2.0  # capped, and the cap was reached
    with torch.no_grad():
        full = model(input_ids=input_ids).logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]
    assert torch.allclose(kept, full, atol=1e-5)


def test_a_model_that_reshapes_its_logits_keeps_full_logits(tiny_with_lora):
    """Remote code that assumes (batch, positions, vocabulary) logits fails the check, not a run."""
    model, _ = tiny_with_lora
    three_dimensional = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out[:, :, :])
    try:
        batch = torch.tensor([[5, 6, 7, 8]])
        assert model(input_ids=batch, labels=batch).loss.isfinite()  # full logits still work
        assert not head_fits_trained_positions(model)
    finally:
        three_dimensional.remove()
    assert head_fits_trained_positions(model)


@pytest.mark.slow
@pytest.mark.parametrize("trained_logits_only", [True, False])
def test_the_trainer_uses_trained_positions_as_configured_with_the_same_loss(tiny_with_lora, features, tmp_path,
                                                                             trained_logits_only):
    from socratune.core.config import load_config
    from socratune.data.template import Example
    from socratune.model.modeling import detect_hardware
    from socratune.training.hf_trainer import build_trainer

    model, tokenizer = tiny_with_lora
    config = load_config(overrides={"train.trained_logits_only": trained_logits_only})
    examples = [Example(str(i), f["input_ids"], f["labels"]) for i, f in enumerate(features)]
    trainer = build_trainer(config, detect_hardware(), model, tokenizer, tmp_path, examples, examples[:2],
                            callbacks=[], fresh=False)
    assert trainer.trained_logits_only is trained_logits_only
    batch = next(iter(trainer.get_train_dataloader()))
    rows = []
    probe = model.get_output_embeddings().register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    model.train()
    try:
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch)
    finally:
        probe.remove()
    with torch.no_grad():
        full = model(**batch).loss
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert rows[0] == (trained if trained_logits_only else batch["input_ids"].shape[0])
    assert torch.allclose(loss, full, rtol=1e-5, atol=1e-6)
