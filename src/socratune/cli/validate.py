"""``socratune validate``: a dialogue file checked as training would read it, without training."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_config_flags, config_from_args

NAME = "validate"
SUMMARY = "check a dialogue file without training"
DESCRIPTION = (
    "Templates and tokenizes every dialogue as training would, and reports what would be\n"
    "rejected and why."
)
EXAMPLE = "socratune validate dialogues.json --rejected rejected.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="JSON or JSONL dialogues to check")
    add_config_flags(parser)
    parser.add_argument("--rejected", help="also write the rejected rows with reasons to this JSONL file")


def run(args: argparse.Namespace) -> int:
    from ..data.dialogues import write_rejections
    from ..style import load_profile
    from ..training.examples import load_tokenizer_for, prepare_examples

    args.data = args.file
    config = config_from_args(args)
    load_profile(config.style.profile)  # what train refuses, validate refuses
    report, examples = prepare_examples(config, load_tokenizer_for(config))
    print(report.summary())
    if args.rejected:
        write_rejections(report.rejections, Path(args.rejected))
    trained = sum(e.trained_tokens for e in examples)
    print(f"{len(examples)} dialogues ready to train, {trained} trained tokens in all")
    return 0
