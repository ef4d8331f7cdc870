"""Throughput and latency of ``socratune serve`` under concurrent clients (issue 28).

Starts ``socratune serve RUN --port 0`` as a subprocess, then at each concurrency (default 1, 4,
8, 16) sends ``--rounds`` x concurrency streamed requests, ``concurrency`` at a time, greedy,
``--max-tokens`` (64) each, and reports completion tokens/s over the wall time of the round, p50
and p95 latency (request sent to last byte) and p50/p95 time to the first streamed token (the
first chunk with content, not the empty role chunk), and tokens per second of the server
process's own CPU time (Linux), which a busy shared machine disturbs less than wall time.
Every request must answer 200 (the exit status is 1 otherwise; 429s are counted as failed).

    python benchmarks/serve_throughput.py runs/tiny
    python benchmarks/serve_throughput.py runs/tiny --max-batch 16 --concurrency 1 8 --json out.json
    # the server of another checkout, e.g. before batching (same virtual environment):
    git archive 2499869 src | tar -x -C /tmp/old && \\
        python benchmarks/serve_throughput.py runs/tiny --pythonpath /tmp/old/src

The tiny model does little work per token, so on CPU its figures measure the server's overhead
as much as the model; they are noisy on a shared machine (the report prints the load average).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

QUESTIONS = ["幸福とは何でしょうか？", "正義とは何か。", "勇気とは何でしょう？", "友情について教えてください。",
             "美しいものとは何でしょう？", "知っているとはどういうことですか？", "徳は教えられるのでしょうか？",
             "死を恐れるべきでしょうか？"]


def start_server(run: str, max_batch: int | None, pythonpath: str | None) -> tuple[subprocess.Popen, str, int, str]:
    command = [sys.executable, "-m", "socratune", "serve", run, "--port", "0"]
    if max_batch:
        command += ["--max-batch", str(max_batch)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = process.stdout.readline()
    if not line.startswith("Serving "):
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    url = line.split("chat page ")[1].split("/ ,")[0]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    model = line.removeprefix("Serving ").split(":")[0]
    return process, host, int(port), model


def one_request(host: str, port: int, model: str, question: str, max_tokens: int) -> dict[str, float]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    connection = http.client.HTTPConnection(host, port, timeout=600)
    sent = time.perf_counter()
    first = None
    tokens = 0
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if first is None and choice["delta"].get("content"):
                    first = time.perf_counter()
    finally:
        connection.close()
    done = time.perf_counter()
    return {"latency_s": done - sent, "ttft_s": (first or done) - sent, "tokens": tokens}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its threads so far (Linux), or nan."""
    try:
        fields = open(f"/proc/{pid}/stat", encoding="ascii").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_round(host: str, port: int, model: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    failures: list[str] = []
    lock = threading.Lock()
    queue = list(range(requests))

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                index = queue.pop(0)
            try:
                result = one_request(host, port, model, QUESTIONS[index % len(QUESTIONS)], max_tokens)
                with lock:
                    results.append(result)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(str(exc))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    latencies, ttfts = [r["latency_s"] for r in results], [r["ttft_s"] for r in results]
    return {"concurrency": concurrency, "requests": requests, "failed": len(failures), "wall_s": round(wall, 3),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
            "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_p95_s": round(percentile(latencies, 0.95), 3) if latencies else None,
            "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
            "ttft_p95_s": round(percentile(ttfts, 0.95), 3) if ttfts else None,
            "errors": failures[:3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory to serve")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per round = rounds x concurrency (at least 8)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, help="passed to serve (default: serve's)")
    parser.add_argument("--pythonpath", help="serve the socratune found here (another checkout's src)")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()

    process, host, port, model = start_server(args.run, args.max_batch, args.pythonpath)
    rows = []
    try:
        one_request(host, port, model, QUESTIONS[0], args.max_tokens)  # warm-up
        for concurrency in args.concurrency:
            requests = max(8, args.rounds * concurrency)
            load = os.getloadavg()[0]
            cpu = cpu_seconds(process.pid)
            row = run_round(host, port, model, concurrency, requests, args.max_tokens)
            cpu = cpu_seconds(process.pid) - cpu
            # Tokens per second of the server's own CPU time: steadier than wall time on a shared machine.
            row["tokens_per_cpu_s"] = round(row["completion_tokens"] / cpu, 1) if cpu > 0 else None
            row["load_avg_1m"] = round(load, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        process.terminate()
        process.wait(30)
    print("\n| concurrency | requests | tokens/s | tokens/CPU-s | p50 latency s | p95 latency s | p50 TTFT s | "
          "p95 TTFT s | load |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} ({r['failed']} failed) | {r['tokens_per_s']} | "
              f"{r['tokens_per_cpu_s']} | "
              f"{r['latency_p50_s']} | {r['latency_p95_s']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} | "
              f"{r['load_avg_1m']} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"run": args.run, "max_batch": args.max_batch, "pythonpath": args.pythonpath, "rows": rows},
                      out, indent=1)
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
