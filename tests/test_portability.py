"""A run and what it exports can be handed on: files follow the user's umask, and the adapter
loads with plain PEFT from any directory, also after the run directory was moved or copied."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from socratune.cli import main
from socratune.core.rundir import (
    RunDir,
    checkpoint_problem,
    write_manifest,
    write_text_atomic,
)
from socratune.model.modeling import point_adapters_at_base, resolve_model_source


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the umask for one test, then put the previous one back."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_saved_models_and_checkpoints_follow_the_umask(umask, tmp_path, mask, file_mode, dir_mode):
    from socratune.model.export import save_merged, write_gguf
    from socratune.model.tiny import build_tiny

    umask(mask)
    write_text_atomic(tmp_path / "report.md", "# report\n")
    assert _mode(tmp_path / "report.md") == file_mode

    model, tokenizer = build_tiny()
    save_merged(model, tokenizer, tmp_path / "merged")  # safetensors alone would write 0600
    assert _mode(tmp_path / "merged") == dir_mode
    assert {p.name: _mode(p) for p in (tmp_path / "merged").iterdir()} == {
        p.name: file_mode for p in (tmp_path / "merged").iterdir()}
    assert (tmp_path / "merged" / "model.safetensors").exists()

    write_gguf(model, tokenizer, tmp_path / "tiny.gguf", "tiny")
    assert _mode(tmp_path / "tiny.gguf") == file_mode

    checkpoint = tmp_path / "checkpoint-3"
    model.save_pretrained(checkpoint)
    write_manifest(checkpoint)
    assert {_mode(p) for p in checkpoint.iterdir()} == {file_mode} and _mode(checkpoint) == dir_mode

    base = Path(resolve_model_source("tiny", tmp_path / "run" / "base"))
    assert {_mode(p) for p in base.iterdir()} == {file_mode}


def test_the_tiny_base_is_recorded_absolute_even_for_a_relative_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = resolve_model_source("tiny", Path("runs/x/base"))
    assert Path(source).is_absolute() and Path(source) == tmp_path / "runs" / "x" / "base"


def _fake_run(root: Path, recorded_base: str) -> RunDir:
    """A run's adapter layout without weights: the final adapter and one checkpoint with a manifest."""
    run = RunDir(root)
    for adapter in (run.adapter_dir, run.checkpoints_dir / "checkpoint-5"):
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(
            json.dumps({"base_model_name_or_path": recorded_base, "r": 4}), encoding="utf-8")
    return run


def test_moved_run_is_re_pointed_and_its_checkpoint_manifest_stays_true(tmp_path):
    run = _fake_run(tmp_path / "moved", "/old/place/run/base")
    checkpoint = run.checkpoints_dir / "checkpoint-5"
    write_manifest(checkpoint)
    base = str((run.base_dir).resolve())
    assert point_adapters_at_base(run, base) == [run.adapter_dir, checkpoint]
    for adapter in (run.adapter_dir, checkpoint):
        recorded = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        assert recorded == {"base_model_name_or_path": base, "r": 4}
    manifest = json.loads((checkpoint / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["files"]["adapter_config.json"]["size"] == (checkpoint / "adapter_config.json").stat().st_size
    assert point_adapters_at_base(run, base) == []  # already right: nothing written


def test_a_checkpoint_whose_manifest_disagrees_is_left_damaged(tmp_path):
    run = _fake_run(tmp_path / "run", "/old/run/base")
    checkpoint = run.checkpoints_dir / "checkpoint-5"
    write_manifest(checkpoint)
    (checkpoint / "adapter_config.json").write_text('{"base_model_name_or_path": "/elsewhere"}', encoding="utf-8")
    before = (checkpoint / "manifest.json").read_bytes()
    assert point_adapters_at_base(run, "/new/run/base") == [run.adapter_dir]
    assert (checkpoint / "manifest.json").read_bytes() == before
    assert "/elsewhere" in (checkpoint / "adapter_config.json").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("relocate", [shutil.move, shutil.copytree])
def test_plain_peft_and_socratune_use_a_moved_or_copied_run_from_any_directory(
        default_run_copy, tmp_path, monkeypatch, capsys, relocate):
    import torch
    from peft import AutoPeftModelForCausalLM

    from socratune.model.modeling import load_for_inference

    recorded = json.loads((default_run_copy / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert Path(recorded["base_model_name_or_path"]).is_absolute()
    elsewhere = tmp_path / "other" / "place"
    elsewhere.parent.mkdir()
    relocate(str(default_run_copy), str(elsewhere))
    if relocate is shutil.copytree:
        shutil.rmtree(default_run_copy)  # the copy must not lean on the original
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    assert main(["generate", str(elsewhere), "幸福とは何でしょうか？", "--max-new-tokens", "8"]) == 0
    checkpoint = RunDir(elsewhere).checkpoints()[-1]
    assert main(["generate", str(elsewhere), "幸福とは？", "--checkpoint", checkpoint.name,
                 "--max-new-tokens", "4"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("こんにちは\n/quit\n"))
    assert main(["chat", str(elsewhere), "--max-new-tokens", "4"]) == 0
    assert "bot>" in capsys.readouterr().out
    assert main(["evaluate", str(elsewhere), "--limit", "1", "--checkpoints", checkpoint.name,
                 "--max-new-tokens", "4"]) == 0
    assert (elsewhere / "evaluation" / "report.md").exists()
    capsys.readouterr()
    assert checkpoint_problem(checkpoint) is None  # the re-pointed checkpoint still validates

    ids = torch.tensor([[1, 5, 9, 12]])
    for adapter, name in ((elsewhere / "adapter", None), (checkpoint, checkpoint.name)):
        recorded = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        assert recorded["base_model_name_or_path"] == str(elsewhere.resolve() / "base")  # not the original's
        plain = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
        ours, _ = load_for_inference(elsewhere, name)
        with torch.no_grad():
            assert torch.allclose(plain(ids).logits, ours(ids).logits, atol=1e-5)
