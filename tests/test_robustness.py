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

from socratune.errors import RunDirError
from socratune.rundir import LOCK, RunDir, run_status

RACER = """
import sys, time
from pathlib import Path
from socratune.errors import RunDirError
from socratune.rundir import RunDir

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
