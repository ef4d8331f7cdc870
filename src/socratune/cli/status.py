"""``socratune status``: where a run stands: step, checkpoints, best scores."""

from __future__ import annotations

import argparse
from typing import Any

NAME = "status"
SUMMARY = "state of a run: step, checkpoints, best scores"
DESCRIPTION = "A directory that is not a run is an error (exit 2)."
EXAMPLE = "socratune status runs/tiny --json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    import json

    from ..core.errors import RunDirError
    from ..core.rundir import CONFIG_YAML, RunDir, run_status

    run = RunDir(args.run_dir)
    if run.exists() and not _looks_like_run(run):
        raise RunDirError(f"{run.path} is not a run directory (no {CONFIG_YAML}, no checkpoints/); "
                          "a run directory is what `socratune train --output DIR` creates")
    if (run.base_dir / "config.json").exists():  # a tiny-base run: re-point its adapters if it was moved
        from ..model.modeling import point_adapters_at_base

        point_adapters_at_base(run, str(run.base_dir.resolve()))
    status = run_status(run)
    if args.json:
        print(json.dumps(status, ensure_ascii=False, indent=2))
        return 0
    early = f" (stopped early at step {status['stopped_early']['step']})" if status["stopped_early"] else ""
    print(f"{status['run_dir']}: {status['state']}, step {status['step']} of {status['total_steps'] or '?'}{early}")
    print(f"last valid checkpoint: {status['last_valid_checkpoint'] or 'none'}")
    for bad in status["invalid_checkpoints"]:
        print(f"invalid checkpoint {bad['path']}: {bad['reason']}")
    for label, key in (("best eval loss", "best_eval_loss"), ("best style score", "best_style_score")):
        if status[key]:
            print(f"{label}: {status[key]['value']:.4f} at step {status[key]['step']}")
    return 0


def _looks_like_run(run: Any) -> bool:
    """A run directory: the config a run records first, a checkpoint, or a live writer's lock."""
    from ..core.rundir import CONFIG_YAML

    return (run / CONFIG_YAML).exists() or bool(run.checkpoints()) or run.lock_holder() is not None
