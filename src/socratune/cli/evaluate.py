"""``socratune evaluate``: base vs tuned vs checkpoints on held-out prompts (evaluation/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import profile_names

NAME = "evaluate"
SUMMARY = "base vs tuned model vs checkpoints on held-out prompts"
DESCRIPTION = "Writes a report (Markdown, JSON, plots) into RUN/evaluation; the previous report is kept."
EXAMPLE = "socratune evaluate runs/tiny --limit 20 --checkpoints none"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    profiles = ", ".join(profile_names())
    parser.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    parser.add_argument("--prompts", help='JSONL {"id": ..., "prompt": ..., "followups": [...] (optional)}; '
                                          "default: 40 bundled held-out questions")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--checkpoints", default="all", help="all, none, or names: checkpoint-80,160")
    parser.add_argument("--turns", type=int, default=0,
                        help="continue each dialogue N more exchanges with a scripted user")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--seed", type=int, default=0, help="generation and bootstrap seed")
    parser.add_argument("--profile", default="socrates", help=f"style profile: one of {profiles}, or a YAML path")
    parser.add_argument("--judge", metavar="URL",
                        help="OpenAI-compatible server (e.g. http://localhost:8080/v1) to rate "
                             "replies too; key from SOCRATUNE_JUDGE_API_KEY or OPENAI_API_KEY")
    parser.add_argument("--judge-model", metavar="NAME", help="model name the judge server should use")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    parser.add_argument("--judge-retries", type=int, default=3, help="retries of a failed judge request (with backoff)")
    parser.add_argument("--judge-workers", type=int, default=4, help="judge requests in flight at once")


def run(args: argparse.Namespace) -> int:
    from ..core.errors import check_readable_file
    from ..core.scores import SCORE_KEYS as KEYS
    from ..evaluation.evaluate import evaluate
    from ..evaluation.report import REPORT_MD, repeated_reply_warnings
    from ..style import load_profile

    if args.prompts:
        check_readable_file(Path(args.prompts), "prompts file")  # a FIFO would block the reader
    profile = load_profile(args.profile)
    judge = None
    if args.judge or args.judge_model:
        from ..evaluation.judge import Judge

        judge = Judge(args.judge or "", args.judge_model or "", profile, timeout=args.judge_timeout,
                      retries=args.judge_retries, concurrency=args.judge_workers)
        judge.check()  # a judge that is down fails now, not after every reply is generated
    result = evaluate(args.run_dir, prompts_path=args.prompts, limit=args.limit, checkpoints=args.checkpoints,
                      turns=args.turns, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      seed=args.seed, profile=profile, judge=judge, judge_workers=args.judge_workers)
    stats = result.data["statistics"]
    print(f"{'model':<18}" + "".join(f"{k:>10}" for k in KEYS))
    for name, means in stats["summary"].items():
        print(f"{name:<18}" + "".join(f"{means[k]['mean']:>10.2f}" for k in KEYS))
    for key, c in stats["tuned_vs_base"].items():
        verdict = "tuned beats base" if c["tuned_beats_base"] else "no significant gain"
        print(f"{key}: {verdict} (Wilcoxon p={c['p_greater']:.3g}, rank-biserial {c['rank_biserial']:+.2f})")
    for key, c in stats.get("tuned_vs_supervised", {}).items():
        verdict = "beats supervised" if c["tuned_beats_base"] else "no significant gain over supervised"
        print(f"{key}: {verdict} (Wilcoxon p={c['p_greater']:.3g}, rank-biserial {c['rank_biserial']:+.2f})")
    for axis, agreement in stats.get("agreement", {}).items():
        rho = agreement["spearman"]
        shown = "n/a" if rho is None else f"{rho:.2f}"
        print(f"judge agreement {axis}: Spearman {shown} over {agreement['n']} replies")
    for warning in repeated_reply_warnings(stats):
        print(f"warning: {warning}")
    print(f"Report: {result.folder / REPORT_MD}")
    if result.previous:
        print(f"The previous report was kept in {result.previous}")
    return 0
