"""``socratune train`` under torchrun: two processes on the CPU with the gloo backend.

The small run of tests/test_runs.py, trained with 2 processes × batch 4, must follow the same
loss curve as one process × batch 8 (the same global batch), write exactly one set of outputs,
and survive ``kill -9`` by resuming under the same world size; another world size is refused.
Run with ``python -m pytest -q tests/test_distributed.py`` (about a minute on two cores).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from socratune.cli import main
from test_runs import DRIVER, SMALL_CONFIG, assert_same_adapter, small_inputs  # noqa: F401 - fixture

PER_PROCESS = SMALL_CONFIG.replace("epochs: 2", "epochs: 1").replace("save_steps: 4", "save_steps: 2")
ONE_PROCESS = PER_PROCESS.replace("batch_size: 4", "batch_size: 8")
STEPS = 4  # 32 training dialogues / global batch 8


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, env=env, timeout=600, check=False)


def config_file(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def losses(run: Path) -> dict[tuple[str, str], float]:
    with (run / "metrics.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {(r["step"], key): float(r[key]) for r in rows for key in ("loss", "eval_loss") if r[key]}


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "rng_state" not in p.name}


@pytest.fixture(scope="module")
def ddp_run(small_inputs, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:  # noqa: F811
    folder = tmp_path_factory.mktemp("ddp")
    _, data = small_inputs
    run = folder / "run"
    done = torchrun("-m", "socratune", "train", "--config", str(config_file(folder, PER_PROCESS)), "--data",
                    str(data), "--output", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done


def test_two_processes_follow_the_one_process_curve_and_write_one_set_of_outputs(small_inputs, ddp_run,  # noqa: F811
                                                                                  tmp_path):
    run, done = ddp_run
    _, data = small_inputs
    single = tmp_path / "single"
    assert main(["train", "--config", str(config_file(tmp_path, ONE_PROCESS)), "--data", str(data),
                 "--output", str(single)]) == 0

    expected, got = losses(single), losses(run)
    assert got.keys() == expected.keys() and len(got) >= 4
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-3), key  # dropout draws differ per process
    assert files(run) == files(single)
    assert sorted(p.name for p in (run / "checkpoints" / f"checkpoint-{STEPS}").glob("rng_state*")) == [
        "rng_state_0.pth", "rng_state_1.pth"]
    assert done.stdout.count("Model saved in") == 1  # only the main process reports
    assert "[rank 0]" in done.stderr and json.loads((run / "run.json").read_text())["starts"][0]["world_size"] == 2


def test_killed_two_process_run_resumes_to_the_same_model_and_refuses_one_process(small_inputs, ddp_run,  # noqa: F811
                                                                                 tmp_path, capsys):
    reference, _ = ddp_run
    _, data = small_inputs
    run = tmp_path / "run"
    args = ["train", "--config", str(config_file(tmp_path, PER_PROCESS)), "--data", str(data), "--output", str(run)]

    killed = torchrun(str(DRIVER), "kill-after-step", "3", *args)
    assert killed.returncode != 0 and not (run / "adapter").exists()
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["checkpoint-2"]

    capsys.readouterr()
    assert main(["train", "--output", str(run)]) == 2  # one process cannot continue a two-process run exactly
    assert "training processes (world size): 2 -> 1" in capsys.readouterr().err

    resumed = torchrun("-m", "socratune", "train", "--output", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["global_step"] == STEPS
    assert_same_adapter(run, reference)
