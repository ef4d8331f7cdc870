"""What generation-based style evaluation costs against training, at default settings.

Run from the repository root::

    python benchmarks/style_eval_cost.py --output style_cost.json
    python benchmarks/style_eval_cost.py \
        --args "--preset gemma2-2b-jpn-qlora --data ../shared/data/socratic_dialogues_ja.json"

It runs ``socratune train`` exactly as a user would (the embedded default unless ``--args`` says
otherwise) into a temporary run directory and reads back ``training_summary.json``: the
command's wall time, the seconds the Trainer's eval-loss passes took (``eval_runtime``) and the
seconds the style callback spent generating and scoring replies (``eval_style_runtime``), summed
over every evaluation of the run. Target: style evaluation at most 10% of the training wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_SHARE = 0.10


def measure(train_args: list[str]) -> dict:
    from socratune.core.rundir import METRICS
    from socratune.training.plots import read_metrics

    with tempfile.TemporaryDirectory() as directory:
        run = Path(directory) / "run"
        command = [sys.executable, "-m", "socratune", "train", *train_args, "--output", str(run)]
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=REPO)
        wall = time.perf_counter() - started
        summary = json.loads((run / "training_summary.json").read_text(encoding="utf-8"))
        evaluations = sum(1 for row in read_metrics(run / METRICS) if row.get("eval_loss"))
    duration = summary["duration_s"]
    return {
        "command": " ".join(["socratune", "train", *train_args]),
        "wall_s": round(wall, 2),
        "training_s": duration,
        "steps": summary["global_step"],
        "evaluations": evaluations,
        "eval_loss_s": summary["eval_loss_runtime_s"],
        "style_s": summary["style_runtime_s"],
        "style_share": round(summary["style_runtime_s"] / duration, 4),
        "eval_share": round((summary["style_runtime_s"] + summary["eval_loss_runtime_s"]) / duration, 4),
        "target_share": TARGET_SHARE,
        "met": summary["style_runtime_s"] / duration <= TARGET_SHARE,
        "hardware": summary["hardware"],
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--args", default="", help="extra arguments for socratune train (quoted as one string)")
    parser.add_argument("--output", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(shlex.split(args.args))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{result['command']}: {result['training_s']:.1f} s, {result['evaluations']} evaluations; "
          f"style generation {result['style_s']:.1f} s = {100 * result['style_share']:.1f}% "
          f"(target <= {100 * TARGET_SHARE:.0f}%: {'met' if result['met'] else 'not met'}); "
          f"eval loss passes {result['eval_loss_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
