"""The pipeline around training stays out of the way: ``socratune --help`` start-up, and loading,
validating, templating and tokenizing the dialogue set at 1x, 4x and 16x its size.

Run from the repository root::

    python benchmarks/data_pipeline.py --output data.json

Data: ``../shared/data/socratic_dialogues_ja.json`` (2,662 dialogues) when present, else the
bundled sample; the JSON says which. The 4x and 16x sets repeat the dialogues with a copy number
added to every message, so no text repeats (the tokenizer caches words it has seen: plain copies
would flatter the larger sizes). Timed is ``socratune.training.examples.prepare_examples`` with the built-in
tiny tokenizer, which is what ``socratune train`` runs before anything else; the tokenizer is
built beforehand (its build time is reported apart). Every timing runs in a fresh process with
a fresh tokenizer, as a user's ``socratune train`` does: timing the same data twice in one
process would find the tokenizer's word cache already warm. Each timing is the best of
``--repeat`` runs, since the CPU may be shared; the load average is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "socratic_dialogues_ja.json"
SCALES = (1, 4, 16)
TARGET_S = 3.0
HELP_TARGET_S = 1.0


def help_seconds(repeat: int) -> float:
    """Wall time of ``socratune --help`` in a fresh interpreter: the start-up every command pays."""
    command = [shutil.which("socratune") or sys.executable, "--help"]
    if command[0] == sys.executable:
        command = [sys.executable, "-m", "socratune", "--help"]
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        best = min(best, time.perf_counter() - started)
    return best


def scaled_copy(records: list[dict], scale: int, directory: Path) -> Path:
    """The data repeated ``scale`` times; every copy after the first marks its messages with its number."""
    rows = []
    for copy in range(scale):
        for record in records:
            messages = [{**m, "content": m["content"] if copy == 0 else f"{m['content']}（{copy}）"}
                        for m in record["messages"]]
            rows.append({**record, "messages": messages})
    path = directory / f"dialogues_x{scale}.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def prepare_seconds(path: Path) -> dict:
    """One timing, in this (fresh) process: build the tiny tokenizer, then prepare the data."""
    from socratune.core.config import load_config
    from socratune.model.tiny import build_tokenizer, bundled_texts
    from socratune.training.examples import prepare_examples

    started = time.perf_counter()
    tokenizer = build_tokenizer(bundled_texts())
    tokenizer_s = time.perf_counter() - started
    config = load_config(overrides={"data.path": str(path), "data.max_seq_len": 100_000})
    started = time.perf_counter()
    _, examples = prepare_examples(config, tokenizer)
    return {"seconds": time.perf_counter() - started, "tokenizer_s": tokenizer_s, "kept": len(examples),
            "tokens": sum(len(e.input_ids) for e in examples)}


def best_in_fresh_processes(path: Path, repeat: int) -> dict:
    timings = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, __file__, "--worker", str(path)], check=True, capture_output=True,
                              text=True, cwd=REPO)
        timings.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return min(timings, key=lambda t: t["seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timings per measurement; the best is kept")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        print(json.dumps(prepare_seconds(args.worker)))
        return 0

    from socratune.training.examples import bundled_data_path

    data, note = ((SHARED_DATA, "shared real data") if SHARED_DATA.exists()
                  else (bundled_data_path(), "bundled sample (real data not present)"))
    help_s = help_seconds(args.repeat)

    records = json.loads(data.read_text(encoding="utf-8"))
    sizes = []
    with tempfile.TemporaryDirectory() as directory:
        for scale in SCALES:
            best = best_in_fresh_processes(scaled_copy(records, scale, Path(directory)), args.repeat)
            seconds, tokens = best["seconds"], best["tokens"]
            sizes.append({"scale": scale, "dialogues": len(records) * scale, "kept": best["kept"],
                          "tokens": tokens, "seconds": round(seconds, 3), "tokenizer_s": round(best["tokenizer_s"], 3),
                          "ms_per_1000_dialogues": round(1e6 * seconds / (len(records) * scale), 1),
                          "us_per_token": round(1e6 * seconds / tokens, 2)})

    base = sizes[0]["seconds"]
    tokenizer_s = sizes[0]["tokenizer_s"]
    result = {
        "data": f"{note}: {data.name}, {len(records)} dialogues",
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "help_s": round(help_s, 3),
        "help_target_met": help_s < HELP_TARGET_S,
        "tokenizer_build_s": round(tokenizer_s, 3),
        "prepare": sizes,
        "prepare_1x_target_met": base < TARGET_S,
        "growth_vs_1x": {f"{s['scale']}x": round(s["seconds"] / base, 2) for s in sizes},
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"data: {result['data']} · load avg {result['load_avg_1min']} on {result['cpu_count']} cores\n")
    print(f"`socratune --help`: {help_s:.2f} s (target < {HELP_TARGET_S:.0f} s)")
    print(f"tiny tokenizer build: {tokenizer_s:.2f} s (once per run, before the data)\n")
    print("| size | dialogues | tokens | validate + template + tokenize s | ms / 1000 dialogues | µs / token "
          "| x of 1x time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in sizes:
        print(f"| {s['scale']}x | {s['dialogues']} | {s['tokens']} | {s['seconds']:.2f} | "
              f"{s['ms_per_1000_dialogues']:.0f} | {s['us_per_token']:.2f} | {s['seconds'] / base:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
