"""The ``socratune`` command: parses arguments and calls the library, nothing more.

This is the only module that prints for the user or chooses exit codes: a ``SocratuneError``
becomes its message on stderr and its exit code (2 for bad input). Heavy libraries (torch,
transformers) are imported inside the handlers, so ``socratune --help`` answers at once.

    socratune train                       # tiny model on the bundled sample, offline
    socratune train --preset gemma2-2b-jpn-qlora --data dialogues.json --output runs/gemma
    socratune validate dialogues.json
    socratune generate runs/tiny "幸福とは何でしょうか？"
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from .errors import SocratuneError

EXIT_BAD_INPUT = 2


def _config_from_args(args: argparse.Namespace):
    from .config import load_config

    overrides: dict[str, Any] = {}
    if args.model:
        overrides["model.name_or_path"] = args.model
    if args.data:
        overrides["data.path"] = args.data
    if getattr(args, "output", None):
        overrides["run.output_dir"] = args.output
    if getattr(args, "epochs", None) is not None:
        overrides["train.epochs"] = args.epochs
    return load_config(args.config, args.preset, overrides)


def _quote(text: str) -> str:
    return shlex.quote(text)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    config = _config_from_args(args)
    result = train(config, resume_from=args.resume_from, show_example_first=args.show_example)
    run = str(result.run_dir)
    if result.already_finished:
        print(f"{run} is already finished ({result.summary.get('global_step')} of "
              f"{result.summary.get('total_steps')} steps); nothing to do.")
    else:
        s = result.summary
        print(f"eval loss {s['eval_loss_initial']} -> {s['eval_loss_final']}; "
              f"style score {s['style_score_initial']} -> {s['style_score_final']} (0-4)")
        print(f"sample reply to 「{result.sample_prompt}」: {result.sample_reply}")
    print(f"Model saved in {result.run_dir / 'adapter'}. Talk to it: "
          f"socratune generate {_quote(run)} {_quote('幸福とは何でしょうか？')}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .data import write_rejections
    from .train import load_tokenizer_for, prepare_examples

    args.data = args.file
    config = _config_from_args(args)
    report, examples = prepare_examples(config, load_tokenizer_for(config))
    print(report.summary())
    if args.rejected:
        write_rejections(report.rejections, Path(args.rejected))
    trained = sum(e.trained_tokens for e in examples)
    print(f"{len(examples)} dialogues ready to train, {trained} trained tokens in all")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import GenParams, generate_replies
    from .modeling import load_for_inference

    model, tokenizer = load_for_inference(args.run_dir, args.checkpoint, base_only=args.base)
    params = GenParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    reply = generate_replies(model, tokenizer, [[{"role": "user", "content": args.prompt}]], params)[0]
    print(reply)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from .rundir import RunDir, run_status

    status = run_status(RunDir(args.run_dir))
    if args.json:
        print(json.dumps(status, ensure_ascii=False, indent=2))
        return 0
    print(f"{status['run_dir']}: {status['state']}, step {status['step']} of {status['total_steps'] or '?'}")
    print(f"last valid checkpoint: {status['last_valid_checkpoint'] or 'none'}")
    for bad in status["invalid_checkpoints"]:
        print(f"invalid checkpoint {bad['path']}: {bad['reason']}")
    for label, key in (("best eval loss", "best_eval_loss"), ("best style score", "best_style_score")):
        if status[key]:
            print(f"{label}: {status[key]['value']:.4f} at step {status[key]['step']}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .style import format_summary_table, load_profile, score_jsonl

    records, bad_lines, summary = score_jsonl(Path(args.file), Path(args.output) if args.output else None,
                                              load_profile(args.profile))
    if not args.output:
        import json

        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    for message in bad_lines:
        print(f"skipped {message}", file=sys.stderr)
    print(format_summary_table(summary, len(records)), file=sys.stderr)
    return EXIT_BAD_INPUT if bad_lines and not records else 0


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file for the run")
    parser.add_argument("--preset", help="preset to start from: tiny (default) or gemma2-2b-jpn-qlora")
    parser.add_argument("--model", help='"tiny", a local model directory, or a hub id')


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="use checkpoints/NAME (or a path) instead of the final adapter")
    parser.add_argument("--base", action="store_true", help="the untuned base model, for comparison")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="socratune", description=__doc__.split("\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune (or resume) a run; no arguments = tiny model, bundled data")
    _add_config_flags(p)
    p.add_argument("--data", help="JSON or JSONL dialogues (default: bundled sample)")
    p.add_argument("--output", help="run directory (default: runs/PRESET)")
    p.add_argument("--epochs", type=float, help="override train.epochs")
    p.add_argument("--resume-from", help="checkpoint to resume from (name under checkpoints/ or a path)")
    p.add_argument("--show-example", action="store_true", help="log one templated example with trained tokens marked")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("validate", help="check a dialogue file without training")
    p.add_argument("file")
    _add_config_flags(p)
    p.add_argument("--rejected", help="also write the rejected rows with reasons to this JSONL file")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("generate", help="print the tuned model's reply to a prompt")
    p.add_argument("run_dir")
    p.add_argument("prompt")
    _add_generation_flags(p)
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("status", help="state of a run: step, checkpoints, best scores")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("score", help="score replies for Socratic style (JSONL in, JSONL out)")
    p.add_argument("file", help='JSONL lines {"id": ..., "text": ..., "prompt": ... (optional)}')
    p.add_argument("--profile", default="socrates", help="style profile name or YAML path")
    p.add_argument("--output", help="write scores here instead of stdout")
    p.set_defaults(handler=cmd_score)
    return parser


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    log = logging.getLogger("socratune")
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # train.log always gets everything


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    if args.command in ("train", "generate", "validate"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars would drown the training log
    try:
        return args.handler(args)
    except SocratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
