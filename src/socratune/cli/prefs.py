"""``socratune prefs``: preference pairs sampled from a run's own replies and ranked (training/prefs.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import ConfigError
from .common import quote

NAME = "prefs"
SUMMARY = "preference pairs from a run's own sampled replies, ranked by the style scorer or a judge"
DESCRIPTION = (
    "Samples several replies per training prompt, scores them and writes the best and worst as a\n"
    "chosen / rejected pair (docs/prefs.md); then train with --method dpo|orpo --pairs."
)
EXAMPLE = "socratune prefs runs/tiny --output pairs.jsonl --samples 6"
MAX_PREF_SAMPLES = 64  # replies per prompt in prefs: more is a typo that would fill memory, not a plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the supervised run directory whose model answers")
    parser.add_argument("--output", required=True, help="pairs JSONL to write")
    parser.add_argument("--prompts", help="JSONL prompts (as for generate --input); default: the run's training split")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--samples", type=int, help="replies sampled per prompt (default prefs.samples)")
    parser.add_argument("--temperature", type=float, help="default prefs.temperature")
    parser.add_argument("--top-p", type=float, help="default prefs.top_p")
    parser.add_argument("--max-new-tokens", type=int, help="default prefs.max_new_tokens")
    parser.add_argument("--min-margin", type=float,
                        help="drop pairs ranked closer than this (0-4; default prefs.min_margin)")
    parser.add_argument("--weights", metavar="AXIS=W,...",
                        help="ranking weight per style axis, e.g. approach=0.6,logic=0.2,tone=0.1,format=0.1 "
                             "(default: the run's prefs.weights, else the profile's overall weights)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    parser.add_argument("--profile", help="style profile (default: the run's style.profile)")
    parser.add_argument("--judge", metavar="URL", help="rank by an OpenAI-compatible judge instead of the scorer")
    parser.add_argument("--judge-model", metavar="NAME", help="model name the judge server should use")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")


def run(args: argparse.Namespace) -> int:
    import json

    from ..core.errors import DataError
    from ..core.rundir import write_text_atomic
    from ..data.dialogues import check_output_file
    from ..generation.generate import GenParams, read_prompts
    from ..model.modeling import load_for_inference
    from ..style import StyleScorer, load_profile
    from ..training.prefs import finished_run_config, make_pairs, parse_weights, ranking_weights, training_prompts

    recorded = finished_run_config(args.run_dir)  # not resolve_run_model: that builds a tiny run's base in RUN/base
    prefs = recorded.prefs
    samples = args.samples if args.samples is not None else prefs.samples
    if not 2 <= samples <= MAX_PREF_SAMPLES:
        raise ConfigError(f"--samples must be from 2 (a pair needs two replies) to {MAX_PREF_SAMPLES}, not {samples}",
                          key="--samples")
    _check_prefs_flags(args)
    chosen_weights = parse_weights(args.weights) if args.weights is not None else prefs.weights
    if bool(args.judge) != bool(args.judge_model):
        raise ConfigError("--judge URL and --judge-model NAME go together")
    output = Path(args.output)
    check_output_file(output, "--output")  # found now, not after every reply is sampled
    if (output.exists() or output.is_symlink()) and not args.force:
        raise ConfigError(f"{output} exists; choose another --output or add --force to replace it")
    prompts = ([i.messages for i in read_prompts(args.prompts)] if args.prompts
               else training_prompts(args.run_dir))
    if args.limit is not None:
        prompts = prompts[: args.limit]
    profile = load_profile(args.profile or recorded.style.profile)
    weights = ranking_weights(chosen_weights, profile)
    params = GenParams(max_new_tokens=args.max_new_tokens or prefs.max_new_tokens,
                       temperature=args.temperature if args.temperature is not None else prefs.temperature,
                       top_p=args.top_p if args.top_p is not None else prefs.top_p)
    judge = None
    if args.judge:
        from ..evaluation.judge import Judge

        judge = Judge(args.judge, args.judge_model, profile)
    model, tokenizer = load_for_inference(args.run_dir)
    result = make_pairs(model, tokenizer, prompts, samples=samples, params=params, seed=args.seed, weights=weights,
                        min_margin=args.min_margin if args.min_margin is not None else prefs.min_margin,
                        scorer=StyleScorer(profile), judge=judge, batch_size=args.batch_size)
    if not result.pairs:
        raise DataError(f"no pair reached the margin among {result.prompts} prompts; lower --min-margin or "
                        "raise --samples")
    write_text_atomic(output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.pairs))
    print(f"{len(result.pairs)} pairs from {result.prompts} prompts x {samples} replies written to {output} "
          f"({result.dropped_below_margin} prompts below the margin dropped; ranking weights {result.weights})")
    print(f"Train on them: socratune train --method dpo --pairs {quote(str(output))} --from {quote(args.run_dir)} "
          "--output RUN2")
    return 0


def _check_prefs_flags(args: argparse.Namespace) -> None:
    """prefs' sampling flags, each named, before the model loads: sampling divides by the
    temperature (a tiny or infinite one gives inf/nan probabilities), and a pair needs replies."""
    from ..generation.generate import MIN_DIVISOR

    checks = (("--temperature", args.temperature, lambda v: MIN_DIVISOR <= v < float("inf"),
               f"a number from {MIN_DIVISOR} (prefs samples, so not 0)"),
              ("--top-p", args.top_p, lambda v: 0 < v <= 1, "above 0 and at most 1"),
              ("--max-new-tokens", args.max_new_tokens, lambda v: v >= 1, "at least 1"),
              ("--min-margin", args.min_margin, lambda v: 0 <= v <= 4, "from 0 to 4"),
              ("--batch-size", args.batch_size, lambda v: v >= 1, "at least 1"),
              ("--limit", args.limit, lambda v: v >= 1, "at least 1"))
    for flag, value, good, wanted in checks:
        if value is not None and not good(value):
            raise ConfigError(f"{flag} must be {wanted}, not {value}", key=flag)
