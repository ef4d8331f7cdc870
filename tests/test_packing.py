"""Padding-free packing: packed batches compute what padded ones do, labels stay inside their
dialogue, padding stays small, and Gemma-2's soft-capping survives packing.

Run: ``python -m pytest -q tests/test_packing.py`` (about 15 s on two cores).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from socratune.core.config import load_config
from socratune.core.errors import ConfigError, ModelError
from socratune.data.packing import PackingCollator, break_even_context, make_collator
from socratune.data.template import IGNORE_INDEX, PaddingCollator, encode_dialogues
from socratune.training.hf_trainer import as_features


@pytest.fixture(scope="module")
def tiny():
    from socratune.model.tiny import build_tiny

    model, tokenizer = build_tiny(seed=0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def bundled_features(tiny):
    from socratune.data.dialogues import load_dialogues
    from socratune.training.examples import bundled_data_path

    _, tokenizer = tiny
    path = bundled_data_path()
    examples, _ = encode_dialogues(tokenizer, load_dialogues(path).kept, str(path), max_seq_len=384)
    return as_features(examples)


def segments(batch: dict) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of every segment of a packed batch: a run of positions counting up from 0."""
    found = []
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        found += [(row, a, b) for a, b in itertools.pairwise(starts)]
    return found


def test_packed_batch_gives_the_same_loss_as_the_padded_batch(tiny, bundled_features):
    model, tokenizer = tiny
    features = bundled_features[:8]
    padded = PaddingCollator(tokenizer.pad_token_id)(features)
    packed = make_collator("packed", model, tokenizer.pad_token_id)(features)
    one_row = PackingCollator(tokenizer.pad_token_id, break_even=float("inf"))(features)
    assert packed["input_ids"].shape[0] < len(features)  # really packed: some row holds several dialogues
    assert one_row["input_ids"].shape[0] == 1

    with torch.no_grad():
        expected = model(**padded).loss
        for batch in (packed, one_row):
            assert torch.allclose(model(**batch).loss, expected, rtol=1e-5, atol=1e-6)


def test_labels_never_cross_a_dialogue_boundary(bundled_features, tiny):
    _, tokenizer = tiny
    # Train on all text, so every dialogue's first label is a real token that packing must drop.
    features = [{"input_ids": f["input_ids"], "labels": list(f["input_ids"])} for f in bundled_features[:13]]
    batch = PackingCollator(tokenizer.pad_token_id, break_even=300.0)(features)
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()

    dialogues, pads = [], []
    for row, start, end in segments(batch):
        assert labels[row][start] == IGNORE_INDEX  # the previous token never learns to predict this one
        if ids[row][start] == tokenizer.pad_token_id:
            pads.append(labels[row][start:end])
        else:
            dialogues.append((ids[row][start:end], labels[row][start:end]))
    assert sorted(dialogues) == sorted((f["input_ids"], [IGNORE_INDEX] + f["labels"][1:]) for f in features)
    assert all(label == IGNORE_INDEX for pad in pads for label in pad)
    assert batch["input_ids"].shape[0] > 1 and "attention_mask" not in batch and batch["use_cache"] is False


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_padding_is_below_ten_percent_of_processed_positions_on_the_bundled_sample(tiny, tmp_path, batching):
    from socratune.model.modeling import add_lora, detect_hardware
    from socratune.model.tiny import build_tiny
    from socratune.training.hf_trainer import build_trainer

    _, tokenizer = tiny
    config = load_config(overrides={"data.batching": batching})  # the shipped defaults otherwise
    model, _ = build_tiny(seed=0)
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], bias="none", quantized=False,
                     gradient_checkpointing=False)
    from socratune.data.dialogues import load_dialogues
    from socratune.training.examples import bundled_data_path

    examples, _ = encode_dialogues(tokenizer, load_dialogues(bundled_data_path()).kept, "sample", 384)
    trainer = build_trainer(config, detect_hardware(), model, tokenizer, tmp_path, examples, examples[:8],
                            callbacks=[], fresh=False)

    processed = real = 0
    for batch in trainer.get_train_dataloader():
        processed += batch["input_ids"].numel()
        real += int((batch["input_ids"] != tokenizer.pad_token_id).sum())
    assert real == sum(len(e.input_ids) for e in examples)  # every dialogue once per epoch
    assert 1 - real / processed < 0.10


@pytest.mark.slow
def test_packed_evaluation_in_the_trainer_equals_padded_evaluation(tiny, tmp_path):
    from socratune.model.modeling import add_lora, detect_hardware
    from socratune.model.tiny import build_tiny
    from socratune.training.hf_trainer import build_trainer

    _, tokenizer = tiny
    model, _ = build_tiny(seed=0)
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], bias="none", quantized=False,
                     gradient_checkpointing=False)
    from socratune.data.dialogues import load_dialogues
    from socratune.training.examples import bundled_data_path

    examples, _ = encode_dialogues(tokenizer, load_dialogues(bundled_data_path()).kept, "sample", 384)
    results = {}
    for batching in ("padded", "packed"):
        config = load_config(overrides={"data.batching": batching})
        trainer = build_trainer(config, detect_hardware(), model, tokenizer, tmp_path / batching, examples[:40],
                                examples[40:72], callbacks=[], fresh=False)
        results[batching] = trainer.evaluate()
    assert results["packed"]["eval_loss"] == pytest.approx(results["padded"]["eval_loss"], rel=1e-5)
    assert results["packed"]["eval_bot_token_accuracy"] == pytest.approx(results["padded"]["eval_bot_token_accuracy"])


def tiny_gemma2(**caps):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Caps lowered from Gemma-2's 50 / 30 and weights drawn wider, so that random weights reach the
    # caps: the test must fail if a path dropped either of them. Sliding window 4 is shorter than
    # the dialogues, so the sliding layers must measure it inside each dialogue.
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                          initializer_range=0.2, **{"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                                                   **caps})
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).eval()


def test_tiny_gemma2_packed_logits_equal_eager_unpacked_logits_with_both_soft_caps():
    model = tiny_gemma2()
    dialogues = [[2, 5, 9, 13, 17, 21, 25], [2, 7, 11, 3, 4], [2, 30, 31, 32, 33, 34, 35, 36, 37]]
    collate = make_collator("packed", model, pad_token_id=0)
    batch = PackingCollator(0, break_even=float("inf"))([{"input_ids": d, "labels": d} for d in dialogues])

    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        model.set_attn_implementation("eager")
        eager = torch.cat([model(torch.tensor([d])).logits[0] for d in dialogues])
        uncapped = {name: torch.cat([tiny_gemma2(**{name: None})(torch.tensor([d])).logits[0] for d in dialogues])
                    for name in ("attn_logit_softcapping", "final_logit_softcapping")}

    assert isinstance(collate, PackingCollator)
    assert torch.allclose(packed, eager, atol=1e-4)
    for name, logits in uncapped.items():  # both caps change these logits, so the comparison above sees them
        assert (logits - eager).abs().max() > 0.05, name


def test_packing_is_refused_for_attention_that_ignores_dialogue_boundaries(tiny):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from socratune.model.tiny import build_tiny

    def causal_only(module, query, key, value, attention_mask, **kwargs):  # a kernel with no mask support
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("socratune_test_causal_only", causal_only)
    model, tokenizer = build_tiny(seed=0)
    model.set_attn_implementation("socratune_test_causal_only")
    with pytest.raises(ModelError, match="data.batching: padded"):
        make_collator("packed", model, tokenizer.pad_token_id)
    assert isinstance(make_collator("padded", model, tokenizer.pad_token_id), PaddingCollator)


def test_batching_typo_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="padded"):
        load_config(overrides={"data.batching": "packing"})


def test_row_length_follows_what_attention_costs_relative_to_the_model(tiny):
    from socratune.data.packing import pack_rows

    model, _ = tiny
    assert 1000 < break_even_context(model) < 1600  # tiny: attention outweighs the layers beyond ~1,300 positions
    lengths = [200, 190, 120, 100, 90, 60, 40, 20]
    longest_row = {}
    for break_even in (0.0, 1300.0, 1e9):
        rows = pack_rows(lengths, break_even)
        longest_row[break_even] = max(sum(lengths[i] for i in row) for row in rows)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each dialogue exactly once
        assert len(rows) * longest_row[break_even] <= 1.1 * sum(lengths)  # padding under 10%
    # Where attention is dear (small model), rows stay near the longest dialogue; where it is cheap they grow.
    assert longest_row[0.0] < 1.2 * max(lengths) and longest_row[0.0] < longest_row[1300.0] < longest_row[1e9]
