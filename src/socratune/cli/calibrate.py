"""``socratune calibrate``: the style scorer's weights fitted to judge ratings."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "calibrate"
SUMMARY = "fit the style scorer's weights to judge ratings; writes a profile"
DESCRIPTION = (
    "Prints cross-validated agreement (Spearman, folds grouped by dialogue) beside the uncalibrated "
    "scorer's; the profile records what it was fitted on."
)
EXAMPLE = "socratune calibrate runs/gemma/evaluation/judged.jsonl --output my_profile.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help='JSONL lines {"id", "prompt", "text", "judge": {"tone": 0-4, ...}} '
                                     "(evaluate --judge writes RUN/evaluation/judged.jsonl)")
    parser.add_argument("--profile", default="socrates", help="profile to start from: name or YAML path")
    parser.add_argument("--output", required=True, help="the calibrated profile YAML to write (must not exist)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds, grouped by dialogue")


def run(args: argparse.Namespace) -> int:
    from ..style import load_profile
    from ..style.calibrate import calibrate_file, format_calibration

    result = calibrate_file(Path(args.file), load_profile(args.profile), Path(args.output), folds=args.folds)
    print(format_calibration(result, args.output))
    return 0
