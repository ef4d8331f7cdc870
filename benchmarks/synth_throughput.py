"""``socratune synth`` throughput against concurrency, on ``socratune serve`` of a tiny run on loopback.

Run from the repository root (a trained run is needed; ``socratune train --output runs/tiny``
makes the tiny one)::

    python benchmarks/synth_throughput.py runs/tiny --dialogues 12 --turns 2 --output synth_bench.json

It starts ``socratune serve RUN`` on a free loopback port, then runs ``synth`` (the library
call the command makes) into a fresh file at each concurrency (1, 4, 16 by default) and reports
dialogues/s, requests/s, completion tokens/s and retried requests. ``socratune serve``
generates one reply at a time (the rest wait, 8 at most, the others get 429 and retry), so
concurrency above 1 only hides the client's round trip and the scorer's work behind generation:
expect a small gain from 1 to 4 and none, or a loss to retries, at 16. A batching server (vLLM)
is the one that turns concurrency into throughput; see benchmarks/RESULTS.md for that arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def start_server(run: Path, max_new_tokens: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "socratune", "serve", str(run), "--port", str(port),
                               "--max-new-tokens", str(max_new_tokens)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(360):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as answer:
                return server, json.loads(answer.read())["data"][0]["id"]
        except OSError:
            if server.poll() is not None:
                raise SystemExit("socratune serve exited; is RUN a trained run?") from None
            time.sleep(0.5)
    server.kill()
    raise SystemExit("socratune serve did not answer within 180 s")


def measure(url: str, model: str, concurrency: int, dialogues: int, turns: int) -> dict:
    from socratune.synth import SynthRequest, synth
    from socratune.synth.client import ChatClient

    client = ChatClient(url, model, key_variables=(), timeout=300, max_retries=10, concurrency=concurrency)
    with tempfile.TemporaryDirectory() as directory:
        request = SynthRequest(output=str(Path(directory) / "bench.jsonl"), dialogues=dialogues, turns=turns,
                               concurrency=concurrency, seed=0, min_score=0.0)
        started = time.perf_counter()
        summary = synth(request, client, client)
        seconds = time.perf_counter() - started
    usage = summary["usage"]
    return {"concurrency": concurrency, "dialogues": summary["done"], "seconds": round(seconds, 2),
            "dialogues_per_s": round(summary["done"] / seconds, 3),
            "requests_per_s": round(usage["requests"] / seconds, 3),
            "completion_tokens_per_s": round(usage["completion_tokens"] / seconds, 1),
            "tokens_per_dialogue": round((usage["prompt_tokens"] + usage["completion_tokens"]) / summary["done"]),
            "retried_requests": usage["attempts"] - usage["requests"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a trained run directory to serve")
    parser.add_argument("--dialogues", type=int, default=12)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="the server's reply length")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server, model = start_server(args.run, args.max_new_tokens)
    try:
        url = f"http://127.0.0.1:{server.args[server.args.index('--port') + 1]}/v1"
        rows = [measure(url, model, int(c), args.dialogues, args.turns) for c in args.concurrency.split(",")]
    finally:
        server.kill()
        server.wait()
    result = {"cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 1),
              "max_new_tokens": args.max_new_tokens, "turns": args.turns, "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
