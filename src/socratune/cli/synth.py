"""``socratune synth``: training dialogues by self-play of two chat models, filtered (synth/)."""

from __future__ import annotations

import argparse
import sys

from ..core.errors import ConfigError

NAME = "synth"
SUMMARY = "generate Socratic training dialogues by self-play of two chat models, filtered"
DESCRIPTION = (
    "A student and Socrates talk through any OpenAI-compatible server; every Socrates reply is scored\n"
    "and near-duplicates are dropped. Keys come from environment variables only (docs/synth.md).\n"
    "Run the same command again to continue where it stopped."
)
EXAMPLE = "socratune synth --output data.jsonl --url http://127.0.0.1:8000/v1 --model tiny --dialogues 20"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="OUT",
                        help="JSONL file of kept dialogues (rejects go to OUT.rejected.jsonl beside it)")
    parser.add_argument("--status", metavar="OUT", help="show done / kept / rejected of a synth output and exit")
    parser.add_argument("--url", metavar="URL",
                        help="OpenAI-compatible server for both roles (e.g. http://127.0.0.1:8000/v1)")
    parser.add_argument("--model", metavar="M", help="model name for both roles")
    parser.add_argument("--student-url", metavar="URL", help="server for the student role (default --url)")
    parser.add_argument("--student-model", metavar="M", help="model for the student role (default --model)")
    parser.add_argument("--socrates-url", metavar="URL", help="server for the Socrates role (default --url)")
    parser.add_argument("--socrates-model", metavar="M", help="model for the Socrates role (default --model)")
    parser.add_argument("--config", metavar="FILE",
                        help="synth profile YAML: questions, personas, prompts, per-role temperature and "
                             "max_tokens, thresholds, prices (default: the bundled one)")
    parser.add_argument("--dialogues", type=int, default=100, metavar="N",
                        help="dialogues in all; a rerun continues to this count (default %(default)s)")
    parser.add_argument("--turns", type=int, default=3, metavar="K",
                        help="student/Socrates exchanges per dialogue (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, metavar="C",
                        help="dialogues in flight at once, and requests per endpoint (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="picks each dialogue's question, persona and sampling seeds (default %(default)s)")
    parser.add_argument("--min-score", type=float, metavar="S",
                        help="overall style score (0-4) a dialogue needs; 0 keeps every "
                             "completed one (default: the profile's filter.min_overall)")
    parser.add_argument("--dedupe-against", action="append", metavar="FILE",
                        help="drop near-duplicates of the dialogues in this data file too (repeatable)")
    parser.add_argument("--judge", metavar="URL", help="also rate every Socrates reply with this LLM judge")
    parser.add_argument("--judge-model", metavar="NAME", help="model name the judge server should use")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="per request (default %(default)s)")
    parser.add_argument("--retries", type=int, default=4, metavar="N",
                        help="retries of a failed request, with backoff and jitter (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..synth import synth_status

    if args.status:
        status = synth_status(args.status)
        planned = "?" if status["planned"] is None else status["planned"]
        print(f"{status['output']}: {status['done']} of {planned} dialogues done, {status['kept']} kept, "
              f"{status['rejected']} rejected" + (" (running now)" if status["running"] else ""))
        for reason, count in status["rejected_by_reason"].items():
            print(f"  rejected {reason}: {count}")
        return 0
    from ..synth import KEY_VARIABLES, SynthRequest, synth
    from ..synth.client import ChatClient
    from ..synth.run import check_counts

    if not args.output:
        raise ConfigError("synth needs --output FILE (or --status FILE)", key="--output")
    check_counts(args.dialogues, args.turns, args.concurrency)  # named one by one, before the clients check them
    if not 0 < args.timeout < float("inf"):
        raise ConfigError(f"--timeout must be a number of seconds above 0, not {args.timeout}", key="--timeout")
    if args.retries < 0:
        raise ConfigError(f"--retries must be 0 or more, not {args.retries}", key="--retries")
    clients = {}
    for role in ("student", "socrates"):
        url = getattr(args, f"{role}_url") or args.url
        model = getattr(args, f"{role}_model") or args.model
        if not url or not model:
            raise ConfigError(f"synth needs --url and --model (or --{role}-url and --{role}-model)",
                              key=f"--{role}-url")
        clients[role] = ChatClient(url, model, key_variables=KEY_VARIABLES[role], flag=f"--{role}-url",
                                   timeout=args.timeout, max_retries=args.retries, concurrency=args.concurrency,
                                   role=role)
    judge = None
    if args.judge or args.judge_model:
        from ..evaluation.judge import Judge
        from ..style import load_profile

        judge = Judge(args.judge or "", args.judge_model or "", load_profile(), timeout=args.timeout,
                      retries=args.retries, concurrency=args.concurrency)
    request = SynthRequest(output=args.output, dialogues=args.dialogues, turns=args.turns,
                           concurrency=args.concurrency, seed=args.seed, config=args.config,
                           min_score=args.min_score, dedupe_against=tuple(args.dedupe_against or ()))
    summary = synth(request, clients["student"], clients["socrates"], judge, on_progress=_synth_progress())
    print(f"{summary['output']}: {summary['kept']} kept, {summary['rejected']} rejected "
          f"({summary['done']} of {summary['planned']} dialogues done)")
    for reason, count in summary["rejected_by_reason"].items():
        print(f"  rejected {reason}: {count}")
    for name, scores in (("kept", summary["scores_kept"]), ("all", summary["scores_all"])):
        cells = "  ".join(f"{k} {v['mean']:.2f} [{v['p10']:.2f}-{v['p90']:.2f}]" for k, v in scores.items()
                          if v["mean"] is not None)
        print(f"  style scores, {name} (mean [p10-p90]): {cells or 'none'}")
    usage = summary["usage"]
    print(f"  tokens: {usage['prompt_tokens']} prompt, {usage['completion_tokens']} completion in "
          f"{usage['requests']} requests ({usage['attempts'] - usage['requests']} retried)"
          + ("" if summary["cost"] is None else f"; cost {summary['cost']:.4f}"))
    run = summary["this_run"]
    print(f"  this run: {run['requests_per_s']:.2f} requests/s, {run['tokens_per_s']:.1f} tokens/s")
    return 0


def _synth_progress():
    """A tqdm bar on a terminal, a plain line every 10 s (and at the end) otherwise."""
    import time

    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = None

        def show(progress) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=progress.planned, initial=progress.done - 1, unit="dialogue", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(kept=f"{progress.kept / max(1, progress.done):.0%}",
                            tok_s=f"{progress.tokens_per_s:.0f}", req_s=f"{progress.requests_per_s:.2f}")
            if progress.done >= progress.planned:
                bar.close()
        return show
    last = [0.0]

    def log_line(progress) -> None:
        now = time.monotonic()
        if now - last[0] >= 10 or progress.done >= progress.planned:
            last[0] = now
            print(f"synth: {progress.done}/{progress.planned} done, kept {progress.kept / max(1, progress.done):.0%}, "
                  f"{progress.tokens_per_s:.1f} tokens/s, {progress.requests_per_s:.2f} requests/s",
                  file=sys.stderr, flush=True)
    return log_line
