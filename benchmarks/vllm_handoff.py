"""The vLLM hand-off of docs/serve.md, checked: does ``vllm serve BASE --enable-lora
--lora-modules NAME=RUN/adapter`` load a run's adapter, and does it give the same greedy reply
as ``socratune serve RUN``?

Starts both servers as subprocesses (socratune first, then vLLM, each stopped before the next
starts so they never share the GPU), asks each the same prompts greedily through the official
``openai`` client, and prints one JSON object. Needs a CUDA GPU and vLLM; benchmarks/gpu_suite.sh
runs it as its ``vllm`` part when vLLM is installed.

    python benchmarks/vllm_handoff.py RUN [--max-tokens 32] [--startup-s 900]

Where the replies differ, the first differing character is reported: greedy decoding in two
engines agrees only while no two candidate tokens are within their float differences, and
socratune's whole-character guard may end a reply where vLLM would emit a broken character.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

PROMPTS = ["幸せとは何でしょうか？", "正義とは何だと思いますか？", "勇気とは恐れないことですか？"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(command: list[str], port: int, startup_s: float, log: Path):
    """A server subprocess, yielded once ``/v1/models`` answers; stopped with SIGINT, then killed."""
    from openai import OpenAI

    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=10)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited with {process.returncode}; see {log}")
                try:
                    client.models.list()
                    break
                except Exception:  # not listening yet
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{command[0]} did not answer within {startup_s:.0f} s; see {log}") from None
                    time.sleep(2)
            yield client
        finally:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def replies(client, model: str, max_tokens: int) -> list[str]:
    return [client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=max_tokens).choices[0].message.content
            for prompt in PROMPTS]


def first_difference(a: str, b: str) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--startup-s", type=float, default=900)
    parser.add_argument("--logs", type=Path, default=Path("."), help="folder for the two servers' logs")
    args = parser.parse_args()

    run = args.run.resolve()
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    base = str(run / "base") if config["model"]["name_or_path"] == "tiny" else config["model"]["name_or_path"]
    name = run.name
    result: dict = {"run": str(run), "base": base, "lora_modules": f"{name}={run / 'adapter'}", "prompts": PROMPTS}

    port = free_port()
    with server([sys.executable, "-m", "socratune", "serve", str(run), "--port", str(port)], port, args.startup_s,
                args.logs / "socratune_serve.log") as client:
        result["socratune"] = replies(client, name, args.max_tokens)

    port = free_port()
    vllm = ["vllm", "serve", base, "--tokenizer", str(run / "adapter"), "--enable-lora",
            "--max-lora-rank", str(max(16, config["lora"]["r"])), "--lora-modules", f"{name}={run / 'adapter'}",
            "--port", str(port), "--max-model-len", "2048", "--gpu-memory-utilization", "0.5"]
    result["vllm_command"] = " ".join(vllm)
    try:
        with server(vllm, port, args.startup_s, args.logs / "vllm_serve.log") as client:
            result["adapter_loaded"] = name in {m.id for m in client.models.list().data}
            result["vllm"] = replies(client, name, args.max_tokens)
    except (RuntimeError, OSError) as exc:  # OSError: no vllm command
        result.update(adapter_loaded=False, error=str(exc))
    if "vllm" in result:
        result["same_greedy_replies"] = result["vllm"] == result["socratune"]
        result["first_difference"] = [first_difference(a, b) for a, b in zip(result["socratune"], result["vllm"])]
    print(json.dumps(result, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
