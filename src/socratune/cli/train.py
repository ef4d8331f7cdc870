"""``socratune train``: a new run, or a resumed or continued one (training/train.py does the work)."""

from __future__ import annotations

import argparse
import sys

from ..core.errors import ConfigError, TrainingInterrupted
from .common import add_config_flags, config_from_args, quote, resume_command

NAME = "train"
SUMMARY = "fine-tune a run, or resume or continue it"
DESCRIPTION = (
    "With no arguments: the built-in tiny model on the bundled sample dialogues, into runs/tiny.\n"
    "Run it again on the same --output to resume from the last valid checkpoint, with the\n"
    "settings the run started with; a finished run says so and does nothing."
)
EXAMPLE = (
    "socratune train --preset gemma2-2b-jpn-qlora --data dialogues.json --output runs/gemma "
    "--set train.learning_rate=1e-4"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    parser.add_argument("--data", help="JSON or JSONL dialogues (default: the bundled sample)")
    parser.add_argument("--output", help="run directory (default: the config's run.output_dir, runs/PRESET)")
    parser.add_argument("--epochs", type=float, help="train.epochs (a finished run given more continues from its end)")
    parser.add_argument("--resume-from", help="checkpoint to resume from (name under checkpoints/ or a path)")
    parser.add_argument("--show-example", action="store_true",
                        help="log one templated example with trained tokens marked")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over: move an existing run directory aside to RUN.old-TIMESTAMP first")
    parser.add_argument("--delete-old", action="store_true",
                        help="with --overwrite: delete the moved-aside run at the end")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="continue a run although data, model, LoRA, quantization or sequence settings changed")
    parser.add_argument("--method", choices=["sft", "dpo", "orpo"], help="sft (default): supervised on dialogues; "
                        "dpo / orpo: preference tuning on --pairs, from the supervised run --from (docs/prefs.md)")
    parser.add_argument("--pairs", help="preference pairs JSONL written by socratune prefs (prefs.pairs)")
    parser.add_argument("--from", dest="from_run", metavar="RUN",
                        help="supervised run whose adapter preference tuning continues (prefs.from_run)")


def run(args: argparse.Namespace) -> int:
    from ..training.selection import describe_end, describe_selection
    from ..training.train import train

    if args.delete_old and not args.overwrite:
        raise ConfigError("--delete-old only goes with --overwrite (it deletes the run that --overwrite moves aside)")
    config = config_from_args(args, continue_run=not args.overwrite)
    if config.train.method == "sft" and (args.pairs or args.from_run):
        raise ConfigError("--pairs and --from go with --method dpo or orpo (train.method); a supervised run "
                          "trains on --data", key="train.method", allowed=["dpo", "orpo"])
    try:
        result = train(config, resume_from=args.resume_from, show_example_first=args.show_example,
                       overwrite=args.overwrite, delete_old=args.delete_old,
                       allow_config_change=args.allow_config_change)
    except TrainingInterrupted as exc:
        print(f"error: {exc}\nresume with: {resume_command(exc.run_dir)}", file=sys.stderr)
        return exc.exit_code
    if not result.main_process:
        return 0
    run = str(result.run_dir)
    for note in result.notes:
        print(note)
    if result.already_finished:
        early = ", stopped early" if result.summary.get("stopped_early") else ""
        print(f"{run} is already finished ({result.summary.get('global_step')} of "
              f"{result.summary.get('total_steps')} steps{early}); nothing to do.")
    else:
        s = result.summary
        print(f"eval loss {s['eval_loss_initial']} -> {s['eval_loss_final']}; "
              f"style score {s['style_score_initial']} -> {s['style_score_final']} (0-4)")
        for line in filter(None, [describe_end(s), *describe_selection(s)]):
            print(line)
        if s.get("method") in ("dpo", "orpo"):
            print(f"{s['method']}: eval reward margin {s.get('reward_margin_final')}, "
                  f"reward accuracy {s.get('reward_accuracy_final')} (chosen above rejected)")
        if result.sample_prompt is not None:
            print(f"sample reply to 「{result.sample_prompt}」: {result.sample_reply}")
    print(f"Model saved in {result.run_dir / 'adapter'}. Talk to it: socratune chat {quote(run)}")
    return 0
