"""Run management: exact resume after crashes and signals, corrupted checkpoints, the config guard,
finished runs, --overwrite, the writer lock and ``socratune status``.

A small run (40 bundled dialogues, 2 epochs, 16 steps, a checkpoint every 4) is trained once
uninterrupted as the reference; the fault tests train the same run in subprocesses killed at
different points (tests/fault_driver.py) and resume it, and must end with the same step count and
the same adapter weights. Run with ``python -m pytest -q tests/test_runs.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from socratune.cli import main
from socratune.core.rundir import RunDir, checkpoint_problem

SMALL_CONFIG = """\
train:
  epochs: 2
  batch_size: 4
  save_steps: 4
  eval_steps: 8
  logging_steps: 2
  save_total_limit: 10
style:
  eval_samples: 2
  max_new_tokens: 8
"""
TOTAL_STEPS = 16
DRIVER = Path(__file__).with_name("fault_driver.py")


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from socratune.training.examples import bundled_data_path

    folder = tmp_path_factory.mktemp("small")
    dialogues = json.loads(bundled_data_path().read_text(encoding="utf-8"))[:40]
    data = folder / "small.json"
    data.write_text(json.dumps(dialogues, ensure_ascii=False), encoding="utf-8")
    config = folder / "small.yaml"
    config.write_text(SMALL_CONFIG, encoding="utf-8")
    return config, data


def small_args(inputs: tuple[Path, Path], run: Path) -> list[str]:
    config, data = inputs
    return ["train", "--config", str(config), "--data", str(data), "--output", str(run)]


@pytest.fixture(scope="module")
def reference_run(small_inputs, tmp_path_factory) -> Path:
    """The small run left alone from start to finish."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(small_args(small_inputs, run)) == 0
    return run


def unfinished_copy(reference_run: Path, destination: Path, keep_up_to_step: int) -> Path:
    """The reference run as a crash after checkpoint ``keep_up_to_step`` would have left it."""
    run = Path(shutil.copytree(reference_run, destination))
    for name in ("training_summary.json", "training_config.json"):
        (run / name).unlink()
    shutil.rmtree(run / "adapter")
    for checkpoint in RunDir(run).checkpoints():
        if int(checkpoint.name.split("-")[1]) > keep_up_to_step:
            shutil.rmtree(checkpoint)
    return run


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(run: Path, reference: Path) -> None:
    got, expected = adapter_weights(run), adapter_weights(reference)
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, worst


def summary(run: Path) -> dict:
    return json.loads((run / "training_summary.json").read_text(encoding="utf-8"))


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_with_fault(fault: str, step: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(DRIVER), fault, str(step), *args], capture_output=True, text=True,
                          check=False, env=env, timeout=600)


def test_killed_and_resumed_run_ends_like_the_uninterrupted_one(small_inputs, reference_run, tmp_path, capsys):
    run = tmp_path / "run"
    args = small_args(small_inputs, run)

    killed = run_with_fault("kill-after-step", 6, args)  # between steps: checkpoint-4 is the last one
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [c.name for c in RunDir(run).checkpoints()] == ["checkpoint-4"]

    killed = run_with_fault("kill-in-checkpoint", 8, args)  # resumes from 4, dies writing checkpoint-8
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "resuming from" in killed.stderr
    assert "no manifest.json" in checkpoint_problem(run / "checkpoints" / "checkpoint-8")

    stopped = run_with_fault("term-after-step", 10, args)  # skips the broken 8, resumes from 4
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "skipping checkpoint" in stopped.stderr and "checkpoint-8" in stopped.stderr
    assert f"resume with: socratune train --output {run}" in stopped.stderr
    assert checkpoint_problem(run / "checkpoints" / "checkpoint-10") is None  # saved at the step SIGTERM came
    assert (run / "checkpoints-set-aside" / "checkpoint-8").is_dir()  # the broken one is kept, not deleted

    killed = run_with_fault("kill-in-final", 0, ["train", "--output", str(run)])  # recorded config, no flags
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "adapter").exists() and not (run / "training_summary.json").exists()

    assert main(["train", "--output", str(run)]) == 0
    assert summary(run)["global_step"] == summary(reference_run)["global_step"] == TOTAL_STEPS
    assert_same_adapter(run, reference_run)

    steps = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    expected = [line.split(",")[0] for line in (reference_run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == expected  # rows after each resume point were cut, not doubled
    starts = json.loads((run / "run.json").read_text())["starts"]
    assert [s["from_checkpoint"] for s in starts] == [None, "checkpoint-4", "checkpoint-4", "checkpoint-10",
                                                      "checkpoint-16"]


@pytest.mark.parametrize("damage", ["truncated adapter", "empty trainer state", "missing trainer state",
                                    "missing optimizer"])
def test_damaged_latest_checkpoint_is_skipped_for_the_previous_one(reference_run, tmp_path, damage):
    run = unfinished_copy(reference_run, tmp_path / "run", keep_up_to_step=16)
    latest = run / "checkpoints" / "checkpoint-16"
    if damage == "truncated adapter":
        weights = latest / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "empty trainer state":
        (latest / "trainer_state.json").write_text("")
    elif damage == "missing trainer state":
        (latest / "trainer_state.json").unlink()
    else:
        (latest / "optimizer.pt").unlink()

    status = RunDir(run)
    checkpoint, invalid = status.latest_valid_checkpoint()
    assert checkpoint == run / "checkpoints" / "checkpoint-12"
    assert [path for path, _ in invalid] == [latest]
    assert main(["status", str(run), "--json"]) == 0


def test_resume_after_a_damaged_checkpoint_matches_the_reference(reference_run, tmp_path):
    run = unfinished_copy(reference_run, tmp_path / "run", keep_up_to_step=16)
    (run / "checkpoints" / "checkpoint-16" / "optimizer.pt").unlink()
    assert main(["train", "--output", str(run)]) == 0
    assert_same_adapter(run, reference_run)
    assert (run / "checkpoints-set-aside" / "checkpoint-16").is_dir()


def test_status_json_names_state_step_and_checkpoints(reference_run, tmp_path, capsys):
    run = unfinished_copy(reference_run, tmp_path / "run", keep_up_to_step=12)
    (run / "checkpoints" / "checkpoint-12" / "trainer_state.json").write_text("{")
    capsys.readouterr()
    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "interrupted"
    assert status["step"] == 8 and status["total_steps"] == TOTAL_STEPS
    assert status["last_valid_checkpoint"].endswith("checkpoint-8")
    assert status["invalid_checkpoints"][0]["path"].endswith("checkpoint-12")
    assert "trainer_state.json" in status["invalid_checkpoints"][0]["reason"]

    assert main(["status", str(reference_run), "--json"]) == 0
    finished = json.loads(capsys.readouterr().out)
    assert (finished["state"], finished["step"], finished["total_steps"]) == ("finished", TOTAL_STEPS, TOTAL_STEPS)


def test_changed_data_or_lora_is_refused_listing_each_difference(small_inputs, reference_run, tmp_path, capsys):
    run = unfinished_copy(reference_run, tmp_path / "run", keep_up_to_step=8)
    config, data = small_inputs
    changed_data = tmp_path / "changed.json"
    dialogues = json.loads(data.read_text(encoding="utf-8"))
    dialogues[0]["messages"][-1]["content"] += "　では、君はどう思うかね？"
    changed_data.write_text(json.dumps(dialogues, ensure_ascii=False), encoding="utf-8")
    changed_config = tmp_path / "changed.yaml"
    changed_config.write_text(config.read_text() + "lora:\n  r: 8\ndata:\n  max_seq_len: 200\n", encoding="utf-8")
    before = tree_digest(run)
    capsys.readouterr()

    code = main(["train", "--config", str(changed_config), "--data", str(changed_data), "--output", str(run)])

    assert code == 2
    message = capsys.readouterr().err
    for difference in ("lora.r: 16 -> 8", "data.max_seq_len: 384 -> 200", "data content: sha256"):
        assert difference in message
    assert "--allow-config-change" in message
    assert tree_digest(run) == before


def test_harmless_changes_are_allowed_and_recorded(small_inputs, reference_run, tmp_path):
    run = unfinished_copy(reference_run, tmp_path / "run", keep_up_to_step=12)
    _, data = small_inputs
    cadence = tmp_path / "cadence.yaml"
    cadence.write_text(SMALL_CONFIG.replace("logging_steps: 2", "logging_steps: 1"), encoding="utf-8")
    assert main(["train", "--config", str(cadence), "--data", str(data), "--output", str(run)]) == 0
    last_start = json.loads((run / "run.json").read_text())["starts"][-1]
    assert "train.logging_steps: 2 -> 1" in last_start["harmless_changes"]
    assert [c.split(":")[0] for c in last_start["harmless_changes"]] == ["run.output_dir", "train.logging_steps"]
    assert last_start["allowed_guarded_changes"] == []
    assert summary(run)["global_step"] == TOTAL_STEPS


def test_finished_run_asked_for_more_epochs_continues_from_its_final_state(reference_run, tmp_path, capsys):
    run = Path(shutil.copytree(reference_run, tmp_path / "run"))
    assert main(["train", "--output", str(run), "--epochs", "3"]) == 0
    assert summary(run)["global_step"] == 24 and summary(run)["epochs"] == 3
    last_start = json.loads((run / "run.json").read_text())["starts"][-1]
    assert (last_start["kind"], last_start["from_checkpoint"]) == ("continue", "checkpoint-16")
    capsys.readouterr()
    assert main(["train", "--output", str(run), "--epochs", "3"]) == 0
    assert "already finished" in capsys.readouterr().out


EARLY_STOP_CONFIG = """\
train:
  epochs: 4
  batch_size: 4
  learning_rate: 1.0e-2            # high on purpose: the eval loss turns up well before the end
  save_steps: 4
  eval_steps: 2
  logging_steps: 2
  save_total_limit: 10
  select: best_eval_loss
  early_stopping_patience: 2
style:
  eval_samples: 0                  # no generation: the eval loss alone decides, and fast
  max_new_tokens: 8
"""


def eval_losses(run: Path) -> dict[str, str]:
    rows = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    column = rows[0].split(",").index("eval_loss")
    return {r.split(",")[0]: r.split(",")[column] for r in rows[1:] if r.split(",")[column]}


@pytest.mark.slow
def test_an_early_stopped_run_killed_and_resumed_stops_at_the_same_step(small_inputs, tmp_path, capsys):
    """Early stopping on: the reference run stops before its last step and keeps its best one; a
    copy killed between the best and the stop, then again while saving the final adapter, resumes
    to the same stopping step, the same eval losses and the same adapter."""
    config = tmp_path / "early.yaml"
    config.write_text(EARLY_STOP_CONFIG, encoding="utf-8")
    args = lambda run: small_args((config, small_inputs[1]), run)  # noqa: E731
    reference = tmp_path / "reference"
    assert main(args(reference)) == 0
    out = capsys.readouterr().out
    stopped = summary(reference)["stopped_early"]
    assert stopped is not None and summary(reference)["finished"]
    assert summary(reference)["global_step"] == stopped["step"] < summary(reference)["total_steps"]
    assert stopped["step"] - stopped["best_step"] == 2 * 2  # two evaluations, two steps apart, without a new best
    assert summary(reference)["selected"]["step"] == stopped["best_step"]
    assert f"stopped early at step {stopped['step']} of {summary(reference)['total_steps']}" in out
    assert not (reference / "checkpoints" / f"checkpoint-{stopped['step']}").exists()

    run = tmp_path / "run"
    killed = run_with_fault("kill-after-step", stopped["step"] - 1, args(run))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    killed = run_with_fault("kill-in-final", 0, ["train", "--output", str(run)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "resuming from" in killed.stderr
    assert main(["train", "--output", str(run)]) == 0
    assert summary(run)["stopped_early"] == stopped
    resumed, expected = eval_losses(run), eval_losses(reference)
    assert resumed.keys() == expected.keys()
    assert all(math.isclose(float(resumed[k]), float(expected[k]), rel_tol=1e-6) for k in expected)
    assert_same_adapter(run, reference)

    capsys.readouterr()
    assert main(["train", "--output", str(run)]) == 0
    total = summary(run)["total_steps"]
    assert f"already finished ({stopped['step']} of {total} steps, stopped early)" in capsys.readouterr().out
    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "finished" and status["stopped_early"] == stopped


def test_a_kill_while_the_tiny_base_is_saved_leaves_a_run_that_starts_again(small_inputs, reference_run, tmp_path):
    run = tmp_path / "run"
    killed = run_with_fault("kill-in-base", 0, small_args(small_inputs, run))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "base").exists()  # the half-written model never took the base's place
    assert main(small_args(small_inputs, run)) == 0
    assert summary(run)["global_step"] == TOTAL_STEPS
    assert_same_adapter(run, reference_run)


def test_a_half_written_base_left_by_an_older_version_is_rebuilt(tmp_path):
    from socratune.model.modeling import resolve_model_source
    from socratune.model.tiny import save_tiny

    whole = save_tiny(tmp_path / "whole")
    for broken in ("config.json", "model.safetensors", "tokenizer.json"):
        base = Path(shutil.copytree(whole, tmp_path / f"base-{broken}"))
        (base / broken).write_bytes((base / broken).read_bytes()[:20] if broken == "config.json" else b"")
        if broken != "config.json":
            (base / broken).unlink()
        assert resolve_model_source("tiny", base) == str(base)
        assert tree_digest(base) == tree_digest(whole)


def test_a_failed_overwrite_puts_the_finished_run_back_and_a_failed_new_run_leaves_nothing(
        small_inputs, reference_run, tmp_path, capsys):
    config, data = small_inputs
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text(encoding="utf-8") + "lora:\n  target_modules: [no_such_proj]\n", encoding="utf-8")
    run = Path(shutil.copytree(reference_run, tmp_path / "run"))
    before = tree_digest(run)
    capsys.readouterr()
    assert main(["train", "--config", str(bad), "--data", str(data), "--output", str(run), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "no_such_proj" in err and "Traceback" not in err
    assert tree_digest(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "run"]
    assert main(["train", "--config", str(bad), "--data", str(data), "--output", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_a_full_disk_is_named_in_one_line_and_the_run_resumes_once_space_is_freed(
        small_inputs, reference_run, tmp_path, capsys, monkeypatch):
    import errno

    import socratune.training.callbacks

    run = tmp_path / "run"
    real_write_manifest = socratune.training.callbacks.write_manifest

    def disk_fills_at_step_8(checkpoint, *args, **kwargs):
        if checkpoint.name == "checkpoint-8":
            raise OSError(errno.ENOSPC, "No space left on device", str(checkpoint / "manifest.json"))
        return real_write_manifest(checkpoint, *args, **kwargs)

    monkeypatch.setattr(socratune.training.callbacks, "write_manifest", disk_fills_at_step_8)
    capsys.readouterr()
    assert main(small_args(small_inputs, run)) == 2
    err = capsys.readouterr().err
    assert f"no space left on device writing {run / 'checkpoints' / 'checkpoint-8' / 'manifest.json'}" in err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.strip().splitlines()[-1].startswith("error: no space left on device writing")
    monkeypatch.setattr(socratune.training.callbacks, "write_manifest", real_write_manifest)  # space freed
    assert main(small_args(small_inputs, run)) == 0
    assert "resuming from" in capsys.readouterr().err
    assert summary(run)["global_step"] == TOTAL_STEPS
    assert_same_adapter(run, reference_run)


def test_overwrite_moves_the_old_run_aside_untouched(small_inputs, reference_run, tmp_path, capsys):
    run = Path(shutil.copytree(reference_run, tmp_path / "run"))
    before = tree_digest(run)
    assert main([*small_args(small_inputs, run), "--epochs", "1", "--overwrite"]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and tree_digest(moved[0]) == before
    assert summary(run)["global_step"] == 8
    assert f"the previous run is kept in {moved[0]}" in capsys.readouterr().out


def test_overwrite_with_delete_old_removes_the_old_run_after_success(small_inputs, reference_run, tmp_path):
    run = Path(shutil.copytree(reference_run, tmp_path / "run"))
    assert main([*small_args(small_inputs, run), "--epochs", "1", "--overwrite", "--delete-old"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert main([*small_args(small_inputs, run), "--delete-old"]) == 2  # only with --overwrite


def test_second_writer_is_refused_with_the_holders_pid(reference_run, tmp_path, capsys):
    run = unfinished_copy(reference_run, tmp_path / "run", keep_up_to_step=8)
    hold = ("import sys, time; from socratune.core.rundir import RunDir\n"
            "with RunDir(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_digest(run)
        capsys.readouterr()
        assert main(["train", "--output", str(run)]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        assert tree_digest(run) == before
        assert main(["status", str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "running"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with run.lock():
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert not (run / ".lock").exists()


def test_metrics_of_a_run_started_by_an_earlier_version_stay_one_table(tmp_path):
    """A resumed run whose metrics.csv predates newer columns keeps appending in its own columns."""
    import csv
    from types import SimpleNamespace

    from socratune.training.callbacks import METRIC_COLUMNS, TrainingMonitorCallback

    old_columns = [c for c in METRIC_COLUMNS if "runtime" not in c]
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(",".join(old_columns) + "\n", encoding="utf-8")
    monitor = TrainingMonitorCallback(metrics, tmp_path / "plots")
    state = SimpleNamespace(global_step=10, epoch=0.5, num_input_tokens_seen=100, is_world_process_zero=True,
                            max_steps=20)
    monitor.on_train_begin(None, state, None)
    monitor.on_log(None, state, None, logs={"loss": 1.5, "learning_rate": 1e-3})
    with metrics.open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == old_columns and len(rows) == 2 and len(rows[1]) == len(old_columns)
    assert dict(zip(rows[0], rows[1]))["loss"] == "1.5"
