"""Faults and races around the run directory: the single-writer lock under many racing
processes, a kill -9 while the tiny base is materialized, ``--overwrite`` that fails to start,
and ``export`` targets that would land in the run itself. See docs/robustness.md."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from socratune.core.errors import RunDirError
from socratune.core.rundir import LOCK, RunDir, run_status

RACER = """
import sys, time
from pathlib import Path
from socratune.core.errors import RunDirError
from socratune.core.rundir import RunDir

run, go, release, result = RunDir(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
while not go.exists():
    time.sleep(0.001)
try:
    with run.lock():
        result.write_text("won")
        while not release.exists():
            time.sleep(0.01)
except RunDirError as exc:
    result.write_text("lost: " + str(exc))
"""


@pytest.mark.slow
def test_exactly_one_of_many_racing_processes_gets_the_lock(tmp_path):
    racers = 24
    run, go, release = tmp_path / "run", tmp_path / "go", tmp_path / "release"
    run.mkdir()
    results = [tmp_path / f"result-{i}" for i in range(racers)]
    processes = [subprocess.Popen([sys.executable, "-c", RACER, str(run), str(go), str(release), str(result)])
                 for result in results]
    try:
        time.sleep(1.0)  # most racers are past their imports and spinning on the start line
        go.touch()
        deadline = time.monotonic() + 120
        while not all(r.exists() and r.read_text() for r in results) and time.monotonic() < deadline:
            time.sleep(0.05)
        outcomes = [r.read_text() for r in results]
    finally:
        release.touch()
        for process in processes:
            process.wait(timeout=60)
    assert outcomes.count("won") == 1, outcomes
    losers = [o for o in outcomes if o != "won"]
    assert all("in use by" in o and str(run / LOCK) in o for o in losers), losers[:3]
    assert not (run / LOCK).exists()  # released and tidied


CYCLING_RACER = """
import sys, time
from pathlib import Path
from socratune.core.errors import RunDirError
from socratune.core.rundir import RunDir

run, go, result, seconds = RunDir(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
while not go.exists():
    time.sleep(0.001)
stop, held = time.monotonic() + seconds, []
while time.monotonic() < stop:
    try:
        with run.lock():
            start = time.monotonic()
            time.sleep(0.005)
            held.append((start, time.monotonic()))
    except RunDirError:
        time.sleep(0.0005)
result.write_text(repr(held))
"""


@pytest.mark.slow
def test_racing_processes_taking_and_releasing_the_lock_never_hold_it_together(tmp_path):
    """Every release starts a new race for the lock file. The lock this replaced (O_EXCL, then the
    pid written) let two holders overlap in most of ~2,000 acquisitions by 24 such processes: a
    racer that read the new file before its pid was in it took it for stale and removed it."""
    import ast
    import itertools

    racers, seconds = 24, 2.0
    run, go = tmp_path / "run", tmp_path / "go"
    run.mkdir()
    results = [tmp_path / f"held-{i}" for i in range(racers)]
    processes = [subprocess.Popen([sys.executable, "-c", CYCLING_RACER, str(run), str(go), str(result), str(seconds)])
                 for result in results]
    time.sleep(1.0)
    go.touch()
    for process in processes:
        process.wait(timeout=120)
    intervals = sorted(interval for result in results for interval in ast.literal_eval(result.read_text()))
    overlapping = [(a, b) for a, b in itertools.pairwise(intervals) if b[0] < a[1]]
    assert len(intervals) >= 20 and not overlapping, (len(intervals), overlapping[:3])


def test_a_lock_left_by_a_live_unrelated_process_that_holds_no_flock_is_taken_over(tmp_path):
    """The pid of a killed run can be reused by any process; only the flock tells who holds the run."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for record in (json.dumps({"pid": os.getppid(), "host": socket.gethostname()}), "", "{not json"):
        (run / LOCK).write_text(record)
        assert run.lock_holder() is None
        with run.lock():
            assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
            assert run.lock_holder() == os.getpid()
            with pytest.raises(RunDirError, match="in use by process"), run.lock():
                pass
        assert not (run / LOCK).exists()


def test_a_lock_recorded_by_another_host_is_respected_and_the_message_says_how_to_clear_it(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run / LOCK).write_text(json.dumps({"pid": 4242, "host": "other-machine.example"}))
    (run / "config.yaml").write_text("preset: tiny\n")
    with pytest.raises(RunDirError) as refused, run.lock():
        pass
    message = str(refused.value)
    assert "4242" in message and "other-machine.example" in message and f"delete {run / LOCK}" in message
    assert run_status(run)["state"] == "running"
    (run / LOCK).unlink()  # what the message tells the user to do
    assert run_status(run)["state"] == "interrupted"
    with run.lock():
        pass


@pytest.mark.parametrize(("texts", "settings", "expected"), [
    (["勇気とは？"], {}, "share their questions"),
    (["勇気とは？"] * 5, {}, "all 5 usable dialogue(s) share"),
    (["勇気とは？", "正義とは？", "友情とは？"], {"train_frac": 1.0}, "data.train_frac is 1.0"),
    (["勇気とは？", "正義とは？", "友情とは？"], {"eval_cap": 0}, "data.eval_cap is 0"),
])
def test_data_whose_split_leaves_nothing_to_evaluate_is_refused_with_the_reason(texts, settings, expected):
    from socratune.core.errors import DataError
    from socratune.data.dialogues import Dialogue, Turn
    from socratune.data.split import require_eval_dialogues

    dialogues = [Dialogue(str(i), (Turn("user", text), Turn("assistant", f"あなたは{i}をどう考えますか？")))
                 for i, text in enumerate(texts)]
    options = {"seed": 42, "train_frac": 0.8, "eval_cap": 100, **settings}
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        require_eval_dialogues(dialogues, source="d.json", **options)
    if not settings and len(texts) == 1:  # one more question is enough
        dialogues.append(Dialogue("9", (Turn("user", "正義とは？"), Turn("assistant", "どう思いますか？"))))
        require_eval_dialogues(dialogues, source="d.json", **options)


def test_a_full_disk_met_by_torch_save_is_named_too(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError without an errno: the free space tells."""
    import shutil

    from socratune.core.errors import StorageError
    from socratune.training.resume import start_guard

    run = RunDir(tmp_path / "run")
    (run.checkpoints_dir / "checkpoint-4").mkdir(parents=True)  # training had begun: the run is kept
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(StorageError, match=f"no space left on device writing {run.path}.*resumes"), \
            start_guard(run, None):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123 vs 456 "
                           "PytorchStreamWriter failed writing file data/3")
    assert (run.checkpoints_dir / "checkpoint-4").is_dir()


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(30, "Read-only file system")])
def test_an_output_directory_that_cannot_be_written_is_named_and_nothing_is_left(tmp_path, monkeypatch, error):
    from socratune.core.errors import StorageError
    from socratune.training.resume import start_guard

    run = RunDir(tmp_path / "out")
    with pytest.raises(StorageError, match=f"(permission denied|read-only file system) writing {run.path / 'x'}"), \
            start_guard(run, None):
        run.path.mkdir()
        error.filename = str(run.path / "x")
        raise error
    assert not run.path.exists()


def test_a_run_directory_under_a_file_is_refused_by_the_lock(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RunDirError, match="a file is in the way"), RunDir(tmp_path / "a-file" / "run").lock():
        pass


def test_a_metrics_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    from socratune.training.resume import _truncate_metrics

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,epoch,loss\r\n2,0.1,1.5\r\n4,0.2,1.4\r\n4,0.2\r\n6,0.3,1.3\r\n", encoding="utf-8")
    _truncate_metrics(metrics, 4)
    assert metrics.read_text(encoding="utf-8").splitlines() == ["step,epoch,loss", "2,0.1,1.5", "4,0.2,1.4"]


@pytest.mark.parametrize("content", ["[" * 50_000 + "]" * 50_000, "\udcff", '{"global_step": ' + "9" * 5000 + "}"])
def test_a_checkpoint_with_a_hostile_trainer_state_is_invalid_not_a_crash(tmp_path, content):
    from socratune.core.rundir import checkpoint_problem, write_manifest

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    for name in ("scheduler.pt", "rng_state.pth", "optimizer.pt", "adapter_model.safetensors", "adapter_config.json"):
        (checkpoint / name).write_bytes(b"x")
    (checkpoint / "trainer_state.json").write_text(content, encoding="utf-8", errors="surrogateescape")
    write_manifest(checkpoint)
    assert checkpoint_problem(checkpoint) == "trainer_state.json does not parse"
    assert RunDir(tmp_path).read_json("checkpoint-2/trainer_state.json") is None


def test_an_unreadable_data_or_config_file_is_named(tmp_path, monkeypatch):
    """Tests run as root, where chmod 000 stops nothing: the read itself is made to fail."""
    from pathlib import Path as RealPath

    from socratune.core.config import load_config
    from socratune.core.errors import ConfigError, DataError
    from socratune.data.dialogues import dataset_fingerprint, load_dialogues

    data, config = tmp_path / "d.json", tmp_path / "c.yaml"
    data.write_text("[]", encoding="utf-8")
    config.write_text("train: {}\n", encoding="utf-8")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(RealPath, "read_text", denied)
    monkeypatch.setattr(RealPath, "open", denied)
    for action in (lambda: load_dialogues(data), lambda: dataset_fingerprint(data)):
        with pytest.raises(DataError, match=f"permission denied reading data file {data}"):
            action()
    with pytest.raises(ConfigError, match=f"permission denied reading config file {config}"):
        load_config(config)
