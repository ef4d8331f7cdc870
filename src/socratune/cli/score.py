"""``socratune score``: replies scored for Socratic style, JSONL in and out (style/)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..core.errors import ConfigError
from .common import profile_names

NAME = "score"
SUMMARY = "score replies for Socratic style (JSONL in, JSONL out)"
DESCRIPTION = "A summary table goes to stderr."
EXAMPLE = "socratune score replies.jsonl --output scores.jsonl"
MAX_SKIPPED_SHOWN = 10  # score's unusable lines named one by one; the rest counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    profiles = ", ".join(profile_names())
    parser.add_argument("file", help='JSONL lines {"id": ..., "text": ..., "prompt": ... (optional)}')
    parser.add_argument("--profile", default="socrates", help=f"style profile: one of {profiles}, or a YAML path")
    parser.add_argument("--output", help="write scores here instead of stdout")


def run(args: argparse.Namespace) -> int:
    from ..core.errors import check_readable_file
    from ..style import format_summary_table, load_profile, score_jsonl

    check_readable_file(Path(args.file), "replies file")  # a FIFO would block the reader
    if args.output and os.path.realpath(args.output) == os.path.realpath(args.file):
        raise ConfigError(f"--output {args.output} is the replies file itself; the scores would replace the replies",
                          key="--output")
    records, bad_lines, summary = score_jsonl(Path(args.file), Path(args.output) if args.output else None,
                                              load_profile(args.profile))
    if not args.output:
        import json

        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    for message in bad_lines[:MAX_SKIPPED_SHOWN]:
        print(f"skipped {message[:300]}", file=sys.stderr)
    if len(bad_lines) > MAX_SKIPPED_SHOWN:
        print(f"skipped {len(bad_lines) - MAX_SKIPPED_SHOWN} more lines", file=sys.stderr)
    print(format_summary_table(summary, len(records)), file=sys.stderr)
    return 0
