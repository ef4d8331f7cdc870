"""Config: presets, YAML files and flags layer in order; bad keys and values are named."""

from __future__ import annotations

import pytest

from socratune.core.config import PrefsSection, available_presets, load_config
from socratune.core.errors import ConfigError


def test_presets_ship_tiny_and_the_reference_recipe():
    assert {"tiny", "gemma2-2b-jpn-qlora"} <= set(available_presets())
    assert load_config().model.name_or_path == "tiny"


def test_reference_preset_reproduces_the_notebook_recipe():
    c = load_config(preset="gemma2-2b-jpn-qlora")
    assert c.model.name_or_path == "google/gemma-2-2b-jpn-it"
    assert (c.quant.load_in_4bit, c.quant.quant_type, c.quant.double_quant, c.quant.compute_dtype) == (
        True, "nf4", True, "float16")
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.bias) == (16, 32, 0.1, "none")
    assert c.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert c.data.max_seq_len == 256 and c.data.train_frac == 0.8 and c.data.eval_cap == 100
    t = c.train
    assert (t.epochs, t.learning_rate, t.weight_decay, t.warmup_ratio, t.scheduler) == (
        30, 8e-5, 0.06, 0.25, "cosine_with_restarts")
    assert (t.batch_size, t.grad_accum, t.max_grad_norm, t.precision) == (4, 8, 0.5, "fp16")
    assert (t.eval_steps, t.save_steps, t.save_total_limit) == (20, 100, 20)
    assert c.model.gradient_checkpointing is True


def test_file_overrides_preset_and_flags_override_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: gemma2-2b-jpn-qlora\ntrain:\n  epochs: 2\nlora:\n  r: 8\n", encoding="utf-8")
    c = load_config(path, overrides={"lora.r": 4, "model.name_or_path": "/models/gemma"})
    assert c.preset == "gemma2-2b-jpn-qlora"
    assert c.train.epochs == 2 and c.train.learning_rate == 8e-5  # file value, preset value
    assert c.lora.r == 4 and c.model.name_or_path == "/models/gemma"  # flags win


def test_unknown_key_is_named_with_the_allowed_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.lr" in message and str(path) in message
    assert "learning_rate" in message and "epochs" in message
    assert info.value.key == "train.lr"


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  epochs: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'trainer'.*allowed: preset, model, quant, lora"):
        load_config(path)


def test_bad_value_names_the_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"train.scheduler": "triangle"})
    assert "train.scheduler" in str(info.value) and "cosine_with_restarts" in str(info.value)
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(overrides={"lora.r": 0})


def test_early_stopping_needs_a_metric_to_watch():
    assert load_config(overrides={"train.select": "best_eval_loss",
                                  "train.early_stopping_patience": 3}).train.early_stopping_patience == 3
    assert load_config(overrides={"train.select": "last", "train.early_stopping_patience": None}).train.select == "last"
    with pytest.raises(ConfigError, match="train.early_stopping_patience.*train.select is 'last'"):
        load_config(overrides={"train.select": "last", "train.early_stopping_patience": 2})
    with pytest.raises(ConfigError, match="train.early_stopping_patience"):
        load_config(overrides={"train.early_stopping_patience": 0})


def test_a_preference_method_brings_its_own_schedule_unless_the_user_sets_one(tmp_path):
    """`train --method dpo` does not inherit the supervised 20 epochs at 2e-3 (issue 27): the
    preference defaults lie over the supervised settings, and the user's YAML, --set and flags
    lie over them. A preference run's own recorded config is taken as it is."""
    supervised = load_config()
    dpo = load_config(overrides={"train.method": "dpo"})
    assert (dpo.train.epochs, dpo.train.learning_rate, dpo.train.batch_size, dpo.prefs.beta) == (2, 5e-4, 8, 0.3)
    assert (dpo.model, dpo.lora, dpo.data) == (supervised.model, supervised.lora, supervised.data)
    orpo = load_config(overrides={"train.method": "orpo"})
    assert orpo.train.epochs == 2 and orpo.prefs.beta == PrefsSection().beta
    assert load_config(assignments=["train.method=dpo", "prefs.beta=0.5"]).prefs.beta == 0.5
    path = tmp_path / "mine.yaml"
    path.write_text("train: {method: dpo, learning_rate: 1.0e-4}\n", encoding="utf-8")
    assert load_config(path).train.learning_rate == 1e-4 and load_config(path).train.epochs == 2
    assert load_config(path, overrides={"train.epochs": 4}).train.epochs == 4

    from_supervised_run = load_config(overrides={"train.method": "dpo"}, recorded=supervised.to_dict())
    assert from_supervised_run.train.epochs == 2
    recorded_preference_run = {**dpo.to_dict(), "train": {**dpo.to_dict()["train"], "epochs": 3}}
    assert load_config(recorded=recorded_preference_run).train.epochs == 3  # its own start, not re-defaulted


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*gemma2-2b-jpn-qlora.*tiny"):
        load_config(preset="gpt5")


def test_invalid_yaml_is_reported_with_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
