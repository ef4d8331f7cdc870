"""``socratune generate``: replies to one prompt or to a JSONL file of prompts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import ConfigError
from .common import add_generation_flags, gen_params, quote

NAME = "generate"
SUMMARY = "the tuned model's reply to a prompt, or replies to a JSONL file of prompts"
DESCRIPTION = (
    "One PROMPT: its reply is printed. --input: one reply per line, as JSONL that\n"
    "`socratune score` reads."
)
EXAMPLE = 'socratune generate runs/tiny "幸福とは何でしょうか？"'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    parser.add_argument("prompt", nargs="?", help="one prompt; its reply is printed")
    parser.add_argument("--input", help='JSONL prompts: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}')
    parser.add_argument("--output", help='write {"id", "text", "prompt"} lines here (socratune score input); '
                                         "default stdout")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    add_generation_flags(parser)


def run(args: argparse.Namespace) -> int:
    import json

    from ..core.errors import check_readable_file
    from ..core.rundir import write_text_atomic
    from ..generation.generate import generate_replies, read_prompts, reply_records
    from ..model.modeling import load_for_inference

    if (args.prompt is None) == (args.input is None):
        raise ConfigError("give either a PROMPT or --input prompts.jsonl")
    if args.output and not args.input:
        raise ConfigError("--output goes with --input; a single PROMPT's reply is printed")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.input:
        check_readable_file(Path(args.input), "prompts file")  # a FIFO would block the reader
    items = read_prompts(args.input) if args.input else None  # bad lines fail before the model loads
    params = gen_params(args)
    model, tokenizer = load_for_inference(args.run_dir, args.checkpoint, base_only=args.base)
    if items is None:
        print(generate_replies(model, tokenizer, [[{"role": "user", "content": args.prompt}]], params)[0])
        return 0
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                    for r in reply_records(model, tokenizer, items, params, args.batch_size))
    if args.output:
        write_text_atomic(Path(args.output), lines)
        print(f"{len(items)} replies written to {args.output}; score them: socratune score {quote(args.output)}",
              file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0
