"""The command line a user types: ``--set``, ``socratune config``, help texts, ``--version``,
``-q``/``-v`` on either side of the subcommand, and ``status`` on a directory that is not a run."""

from __future__ import annotations

import argparse

import pytest
import yaml

from socratune import __version__
from socratune.cli import build_parser, main
from socratune.cli.common import config_from_args
from socratune.core.config import Config, load_config

COMMANDS = ["train", "validate", "config", "generate", "chat", "serve", "export", "status", "score", "evaluate"]


def _train_config(argv: list[str]) -> Config:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_set_reaches_nested_keys_with_yaml_types():
    c = _train_config(["--set", "train.epochs=5", "--set", "lora.target_modules=[q_proj, v_proj]",
                       "--set", "model.gradient_checkpointing=true", "--set", "train.empty_cache_steps=50",
                       "--set", "data.path=null"])
    assert c.train.epochs == 5.0 and c.lora.target_modules == ["q_proj", "v_proj"]
    assert c.model.gradient_checkpointing is True and c.train.empty_cache_steps == 50 and c.data.path is None


def test_set_overrides_the_file_and_preset_and_named_flags_override_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: gemma2-2b-jpn-qlora\ntrain:\n  epochs: 2\n  learning_rate: 1.0e-4\n", encoding="utf-8")
    c = _train_config(["--config", str(path), "--set", "train.epochs=7"])
    assert c.train.epochs == 7  # --set over the file
    assert c.train.learning_rate == 1e-4  # the file over the preset
    assert c.train.grad_accum == 8  # the preset underneath
    assert _train_config(["--config", str(path), "--set", "train.epochs=7", "--epochs", "9"]).train.epochs == 9
    assert _train_config(["--set", "preset=gemma2-2b-jpn-qlora"]).model.name_or_path == "google/gemma-2-2b-jpn-it"


@pytest.mark.parametrize(("assignment", "expected"), [
    ("train.epoch=3", ["--set train.epoch", "unknown key 'train.epoch'", "allowed: epochs, learning_rate"]),
    ("trainer.epochs=3", ["unknown key 'trainer'", "allowed: preset, model"]),
    ("train.epochs=many", ["--set train.epochs", "'train.epochs'", "valid number"]),
    ("train.scheduler=cosine_restarts", ["'train.scheduler'", "'cosine_with_restarts'"]),
    ("lora.r=0", ["'lora.r'", "greater than 0"]),
    ("train.epochs", ["expected KEY=VALUE"]),
    ("train.epochs=[1", ["not a valid YAML value"]),
])
def test_bad_set_is_refused_with_exit_2_naming_the_key(assignment, expected, capsys, tmp_path):
    assert main(["train", "--set", assignment, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in expected:
        assert fragment in err
    assert "''" not in err  # a key is quoted once
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_every_config_key_has_a_description():
    def undescribed(model: type, prefix: str = "") -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(prefix + name)
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                missing += undescribed(annotation, f"{prefix}{name}.")
        return missing

    assert undescribed(Config) == []


def test_config_prints_commented_yaml_that_round_trips_through_config(capsys, tmp_path):
    argv = ["config", "--preset", "gemma2-2b-jpn-qlora", "--set", "lora.r=8", "--set", "train.epochs=2.5",
            "--set", "lora.target_modules=[q_proj, o_proj]"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "# LoRA rank" in text and "# passes over the training dialogues" in text
    saved = tmp_path / "my.yaml"
    saved.write_text(text, encoding="utf-8")
    expected = load_config(preset="gemma2-2b-jpn-qlora",
                           assignments=["lora.r=8", "train.epochs=2.5", "lora.target_modules=[q_proj, o_proj]"])
    assert load_config(saved) == expected
    assert _train_config(["--config", str(saved)]) == expected
    assert main(["config", "--config", str(saved)]) == 0
    assert capsys.readouterr().out == text  # printing the saved file again changes nothing
    assert yaml.safe_load(text)["lora"]["r"] == 8


def test_version_and_program_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"socratune {__version__}"
    help_text = build_parser().format_help()
    assert "socratune train" in help_text and "Fine-tune" in help_text
    for command in COMMANDS:
        assert command in help_text


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_has_a_description_an_example_and_help_for_every_argument(command):
    parser = _subparser(command)
    text = parser.format_help()
    assert f"example:\n  socratune {command}" in text
    assert parser.description
    for action in parser._actions:
        assert action.help, f"{command}: {action.dest} has no help"


def test_help_shows_defaults_and_lists_the_style_profiles():
    assert "(default: 128)" in _subparser("generate").format_help()
    for command in ("score", "evaluate"):
        assert "one of socrates" in " ".join(_subparser(command).format_help().split())


@pytest.mark.parametrize("argv", [["-q", "status", "RUN"], ["status", "RUN", "-q"], ["status", "-q", "RUN"]])
def test_quiet_is_accepted_before_and_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet is True and not getattr(args, "verbose", False)


def test_verbose_after_the_subcommand_and_not_with_quiet(capsys):
    assert build_parser().parse_args(["config", "-v"]).verbose is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["config", "-q", "-v"])


def test_status_of_a_directory_that_is_not_a_run_is_an_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run", encoding="utf-8")
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory" in err and str(tmp_path) in err
    assert main(["status", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_validate_takes_set_too(capsys):
    from socratune.training.examples import bundled_data_path

    assert main(["validate", str(bundled_data_path()), "--set", "data.max_seq_len=64"]) == 0
    out = capsys.readouterr().out
    assert "data.max_seq_len is 64" in out and "160 dialogues ready" not in out
