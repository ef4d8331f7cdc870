"""Replies with and without the whole-character guard, on the same weights.

For each checkpoint of a run (and its final adapter), answer prompts greedily twice, with the
guard and without it, and report the replies that hold U+FFFD, the style means and the replies/s.
The weights are the same in both columns, so the difference is the guard's alone; training loss is
untouched by it (the guard acts on generation only).

    python benchmarks/whole_chars.py runs/tiny                      # the 40 bundled eval prompts
    python benchmarks/whole_chars.py runs/tiny --checkpoints checkpoint-120   # one checkpoint and the final adapter
    python benchmarks/whole_chars.py runs/tiny --prompts ../shared/data/socratic_dialogues_ja.json --limit 200
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def real_openers(path: Path, limit: int, seed: int) -> list[str]:
    """The first user turn of ``limit`` dialogues drawn with ``seed``: turns nobody here wrote."""
    dialogues = json.loads(path.read_text(encoding="utf-8"))
    openers = [next(m["content"] for m in d["messages"] if m["role"] == "user") for d in dialogues]
    return random.Random(seed).sample(openers, min(limit, len(openers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--prompts", type=Path, help="a dialogues JSON file: answer its first user turns")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--checkpoints", help="comma-separated checkpoint names to compare (default: all of them)")
    args = parser.parse_args()

    from socratune.evaluation.evaluate import load_prompts
    from socratune.generation import generate
    from socratune.generation.whole_chars import REPLACEMENT
    from socratune.model.modeling import load_for_inference
    from socratune.style import StyleScorer, summarize

    prompts = (real_openers(args.prompts, args.limit, args.seed) if args.prompts
               else [p.prompt for p in load_prompts()])
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    scorer = StyleScorer()
    guard, trim = generate.whole_character_kwargs, generate.drop_partial_character
    run = Path(args.run)
    names = sorted((p.name for p in (run / "checkpoints").glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))
    if args.checkpoints:
        names = [n for n in names if n in args.checkpoints.split(",")]
    print(f"{len(prompts)} prompts, greedy, {args.max_new_tokens} new tokens")
    print("| weights | guard | replies with U+FFFD | overall | tone | format | replies/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in [*names, None]:
        model, tokenizer = load_for_inference(run, name)
        for guarded in (False, True):
            # off: what generate did before the guard (no mask, no trimming of a cut character)
            generate.whole_character_kwargs = guard if guarded else (lambda tokenizer: {})
            generate.drop_partial_character = trim if guarded else (lambda text: text)
            started = time.perf_counter()
            replies = generate.generate_replies(model, tokenizer, conversations,
                                                generate.GenParams(max_new_tokens=args.max_new_tokens), 16)
            seconds = time.perf_counter() - started
            means = summarize([scorer.score(r, p) for r, p in zip(replies, prompts)])
            broken = sum(REPLACEMENT in r for r in replies)
            print(f"| {name or 'final adapter'} | {'on' if guarded else 'off'} | {broken} | {means['overall']:.3f} "
                  f"| {means['tone']:.3f} | {means['format']:.3f} | {len(replies) / seconds:.1f} |")
    generate.whole_character_kwargs, generate.drop_partial_character = guard, trim


if __name__ == "__main__":
    main()
