"""Training throughput side by side: the reference recipe, TRL's ``SFTTrainer`` and socratune.

Run from the repository root (TRL comes with the ``bench`` extra: ``pip install -e .[bench]``)::

    python benchmarks/train_throughput.py --output bench.json
    python benchmarks/train_throughput.py --samples 512 --runs socratune,socratune@data.batching=packed
    python benchmarks/train_throughput.py --threads 1 --repeat 3 --wait-load 1.5   # on a shared machine

Every run trains the same model with the same LoRA adapter shape (the preset's rank, alpha and
target modules, less ``lm_head``, which TRL refuses), learning rate, schedule and seed on the same
dialogues (exactly ``--samples``) and then computes the same eval loss (bot tokens only, on the
same held-apart dialogues). What differs is how each tool forms and computes batches:

* ``reference``: the published notebook's recipe: every dialogue padded to 256 tokens, eager
  attention, batch 4 x gradient accumulation 8, gradient checkpointing, the notebook's LoRA
  dropout (taken from the ``gemma2-2b-jpn-qlora`` preset, which reproduces the notebook); fp16
  on a GPU.
* ``trl``: ``SFTTrainer`` with its own defaults (batch 8, padding to the longest in a random
  batch, gradient checkpointing on, bf16 autocast) given the same tokenized dialogues and labels.
  A name ``trl@key=value+key=value`` sets ``SFTConfig`` fields (``trl@bf16=false``: no bf16
  autocast, which a CPU without bf16 instructions emulates slowly).
* ``socratune``: the preset's defaults through ``socratune.training.hf_trainer.build_trainer``. A name
  ``socratune@key=value+key=value`` applies config overrides (to compare choices).

Model: ``tiny`` by default; ``--model gemma2-2b-random`` builds a model of gemma-2-2b's exact shape
(26 layers, hidden 2304, 8 heads, 4 KV heads, head dim 256, vocabulary 256,000, sliding window,
both soft-caps) with random weights, for a GPU: throughput does not depend on the weights. With
``--preset gemma2-2b-jpn-qlora`` every run is QLoRA as in the notebook::

    python benchmarks/train_throughput.py --model gemma2-2b-random --preset gemma2-2b-jpn-qlora \
        --runs reference,trl,socratune --output gpu.json

Data: ``../shared/data/socratic_dialogues_ja.json`` when present, else the bundled sample; the
JSON says which. Dialogues longer than the reference's 256 tokens are left out for every run, so
all runs see the same dialogues. Each run is a separate process, so peak RSS is its own.
Reported: non-padding tokens per second of ``trainer.train()``, its wall time, peak RSS, peak
GPU memory (null on a CPU), model FLOPs utilisation (4 x parameters per non-padding token
against the GPU's dense peak; null on a CPU), the eval loss afterwards and the load average
around the run (the CPU may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "socratic_dialogues_ja.json"
REFERENCE_MAX_LEN = 256
RUNS = ("reference", "trl", "socratune")
REFERENCE_PRESET = "gemma2-2b-jpn-qlora"  # the notebook's values

RANDOM_GEMMA2 = "gemma2-2b-random"
# google/gemma-2-2b's config.json (the jpn-it model has the same shape), spelled out so that a
# change of transformers' defaults cannot change the benchmark: layers alternate 4,096-token
# sliding-window and full attention, attention logits are soft-capped at 50, final logits at 30.
GEMMA2_2B_SHAPE = {
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "tie_word_embeddings": True,
}
# Gemma's own tokenizer cannot be fetched offline. A byte-level BPE of this size trained on the
# benchmark's dialogues gives 2.6 characters per token on the real set, a mean dialogue of ~105
# tokens: under half of the reference's 256, as the notebook's data had with Gemma's tokenizer.
RANDOM_TOKENIZER_VOCAB = 8000
# Dense bf16 tensor-core peak by GPU name, for model FLOPs utilisation (--peak-tflops overrides).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0}


def data_path() -> tuple[Path, str]:
    if SHARED_DATA.exists():
        return SHARED_DATA, "shared real data (../shared/data/socratic_dialogues_ja.json)"
    from socratune.training.examples import bundled_data_path

    return bundled_data_path(), "bundled sample (real data not present)"


def socratune_config(spec: dict, overrides: dict[str, str]):
    from socratune.core.config import load_config

    base = {"model.name_or_path": spec["model"], "train.epochs": 1, "train.eval_steps": 10**9,
            "train.save_steps": 10**9, "train.logging_steps": 10**9}
    return load_config(preset=spec["preset"], overrides={**base, **overrides})


def prepare(spec: dict, config):
    """Tokenizer, train examples (exactly ``samples``, cycling if the data is small) and eval examples."""
    from socratune.data.dialogues import load_dialogues
    from socratune.data.template import encode_dialogues
    from socratune.training.examples import load_tokenizer_for

    tokenizer = load_tokenizer_for(config)
    path = Path(spec["data"])
    examples, _ = encode_dialogues(tokenizer, load_dialogues(path).kept, str(path), REFERENCE_MAX_LEN)
    random.Random(spec["seed"]).shuffle(examples)
    eval_count = min(spec["eval_dialogues"], len(examples) // 5)
    pool = examples[eval_count:]
    train = [pool[i % len(pool)] for i in range(spec["samples"])]
    return tokenizer, train, examples[:eval_count]


def random_gemma2(directory: Path, data: Path, layers: int) -> Path:
    """Save (once) a gemma-2-2b-shaped model with random weights and a tokenizer trained on ``data``.

    Throughput does not depend on the weights, so no download is needed; the checkpoint goes
    through the same local-directory loading (and 4-bit quantization) a user's model does.
    ``layers`` below 26 makes a small model of the same kind for a quick check of this path.
    """
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from socratune.data.dialogues import load_dialogues
    from socratune.model.tiny import END_OF_TURN, build_tokenizer

    if (directory / "config.json").exists():
        return directory
    texts = [turn.content for d in load_dialogues(data).kept for turn in d.turns]
    tokenizer = build_tokenizer(texts, RANDOM_TOKENIZER_VOCAB)
    config = Gemma2Config(**{**GEMMA2_2B_SHAPE, "num_hidden_layers": layers}, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Gemma2ForCausalLM(config).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def parameter_count(source: str) -> int:
    """Parameters of the model at ``source`` (shared ones once), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    return sum(p.numel() for p in model.parameters())


def model_source(name: str) -> str:
    from socratune.model.modeling import resolve_model_source

    return resolve_model_source(name, Path(tempfile.gettempdir()) / "socratune-bench-tiny")


def base_model(config, hardware, attn_implementation):
    from socratune.model.modeling import load_base

    source = model_source(config.model.name_or_path)
    return load_base(source, hardware=hardware, dtype=config.model.dtype, load_in_4bit=config.quant.load_in_4bit,
                     quant_type=config.quant.quant_type, double_quant=config.quant.double_quant,
                     compute_dtype=config.quant.compute_dtype, attn_implementation=attn_implementation)


def lora(model, config, gradient_checkpointing: bool):
    from socratune.model.modeling import add_lora

    c = config.lora
    return add_lora(model, r=c.r, alpha=c.alpha, dropout=c.dropout, target_modules=c.target_modules, bias=c.bias,
                    quantized=config.quant.load_in_4bit, gradient_checkpointing=gradient_checkpointing)


def common_arguments(config, hardware, output_dir: str) -> dict:
    """Optimisation settings every run shares, so eval losses compare like with like."""
    t = config.train
    return {"output_dir": output_dir, "num_train_epochs": 1, "learning_rate": t.learning_rate,
            "weight_decay": t.weight_decay, "warmup_steps": t.warmup_ratio, "lr_scheduler_type": t.scheduler,
            "max_grad_norm": t.max_grad_norm, "seed": t.seed, "data_seed": t.seed, "save_strategy": "no",
            "eval_strategy": "no", "report_to": "none", "disable_tqdm": True, "use_cpu": hardware.device != "cuda",
            "remove_unused_columns": False}


def build_reference(config, hardware, tokenizer, train, output_dir):
    from transformers import Trainer, TrainingArguments

    from socratune.core.config import load_config
    from socratune.data.template import PaddingCollator
    from socratune.training.hf_trainer import as_features

    config = config.model_copy(deep=True)
    config.lora.dropout = load_config(preset=REFERENCE_PRESET).lora.dropout
    model = lora(base_model(config, hardware, "eager"), config, gradient_checkpointing=True)
    args = TrainingArguments(per_device_train_batch_size=4, gradient_accumulation_steps=8,
                             fp16=hardware.device == "cuda", logging_steps=10**9,
                             **common_arguments(config, hardware, output_dir))
    collator = PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=REFERENCE_MAX_LEN)
    return Trainer(model=model, args=args, data_collator=collator, train_dataset=as_features(train))


def build_trl(config, hardware, tokenizer, train, output_dir, overrides: dict[str, str]):
    import yaml
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from socratune.training.hf_trainer import as_features

    c = config.lora
    peft_config = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules,
                             bias=c.bias, task_type="CAUSAL_LM")
    settings = {key: yaml.safe_load(value) for key, value in overrides.items()}
    args = SFTConfig(**{**common_arguments(config, hardware, output_dir), **settings})
    return SFTTrainer(model=base_model(config, hardware, None), args=args,
                      train_dataset=Dataset.from_list(as_features(train)), processing_class=tokenizer,
                      peft_config=peft_config)


def build_socratune(config, hardware, tokenizer, train, eval_examples, output_dir):
    from socratune.training.hf_trainer import build_trainer

    model = lora(base_model(config, hardware, config.model.attn_implementation), config,
                 config.model.gradient_checkpointing)
    trainer = build_trainer(config, hardware, model, tokenizer, Path(output_dir), train, eval_examples,
                            callbacks=[], fresh=False)
    # With a per-step strategy transformers evaluates and saves at the last step, which a user's
    # run wants; the other rows do neither inside train(), so neither does this one.
    trainer.args.eval_strategy = trainer.args.save_strategy = "no"
    return trainer


def eval_loss(model, tokenizer, examples, device: str) -> float:
    """Mean loss per trained (bot) token over the eval dialogues, computed the same way for every run."""
    import torch

    from socratune.data.template import IGNORE_INDEX, PaddingCollator
    from socratune.training.hf_trainer import as_features

    collate, features = PaddingCollator(tokenizer.pad_token_id), as_features(examples)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features), 16):
            batch = {k: v.to(device) for k, v in collate(features[start:start + 16]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                       ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(losses)
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


def worker(name: str, spec: dict) -> dict:
    """One run, in its own process: build, train, measure, evaluate."""
    import torch
    from transformers import set_seed

    from socratune.model.modeling import detect_hardware

    torch.set_num_threads(spec["threads"])
    set_seed(spec["seed"])  # the LoRA initialisation draws from the global RNG: the same start for every run
    tool, _, override_text = name.partition("@")
    overrides = dict(pair.split("=", 1) for pair in override_text.split("+") if pair)
    config = socratune_config(spec, overrides if tool == "socratune" else {})
    # TRL computes its loss from lm_head.weight directly and refuses an adapter there; every run
    # trains the same adapter, so none gets one.
    config.lora.target_modules = [m for m in config.lora.target_modules if m != "lm_head"]
    hardware = detect_hardware()
    tokenizer, train, eval_examples = prepare(spec, config)
    with tempfile.TemporaryDirectory() as output_dir:
        if tool == "reference":
            trainer = build_reference(config, hardware, tokenizer, train, output_dir)
        elif tool == "trl":
            trainer = build_trl(config, hardware, tokenizer, train, output_dir, overrides)
        else:
            trainer = build_socratune(config, hardware, tokenizer, train, eval_examples, output_dir)
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        load_after = os.getloadavg()[0]
        loss = eval_loss(trainer.model, tokenizer, eval_examples, hardware.device)
    tokens = sum(len(e.input_ids) for e in train)
    parameters = parameter_count(model_source(spec["model"]))
    peak_flops = spec["peak_tflops"] * 1e12 if spec["peak_tflops"] else None
    # LoRA's model FLOPs per real token: forward 2 x parameters, backward through the frozen
    # weights (activation gradients only) another 2 x; the adapters' own share is negligible.
    mfu = 4 * parameters * tokens / wall / peak_flops if peak_flops else None
    return {
        "name": name,
        "tokens_per_s": round(tokens / wall, 1),
        "mfu": round(mfu, 4) if mfu is not None else None,
        "parameters": parameters,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if hardware.device == "cuda" else None,
        "eval_loss": round(loss, 4),
        "samples": len(train),
        "eval_dialogues": len(eval_examples),
        "tokens": tokens,
        "optimizer_steps": trainer.state.global_step,
        "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
    }


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"CPU {names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def known_peak_tflops(device: str) -> float | None:
    """The peak of the GPU named in ``device``, matched as a whole word ("L4" is not an "L40S")."""
    return next((tflops for name, tflops in PEAK_TFLOPS.items() if re.search(rf"\b{name}\b", device)), None)


def markdown(result: dict) -> str:
    header = (f"device: {result['device']} ({result['threads']} torch threads) · model: {result['model']} · "
              f"data: {result['data']} "
              f"({result['samples']} samples, {result['eval_dialogues']} eval dialogues)")
    lines = [header, "",
             ("| run | tokens/s (fastest) | every attempt | MFU | wall s | peak RSS MB | peak GPU MB | eval loss "
              "| load avg (before, after) |"),
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in result["runs"]:
        gpu = "—" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        attempts = ", ".join(f"{x:.0f}" for x in r["tokens_per_s_all"])
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {attempts} | {mfu} | {r['wall_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {gpu} | {r['eval_loss']:.4f} | "
                     f"{r['load_avg_1min'][0]}, {r['load_avg_1min'][1]} |")
    for run in result.get("failed", []):
        lines.append(f"\n{run['name']} failed: {' '.join(run['error'])}")
    for name, target in result.get("targets", {}).items():
        lines.append(f"\nsocratune vs {name}: {target['speedup']:.2f}x tokens/s (target {target['speedup_target']}x: "
                     f"{'met' if target['speedup_met'] else 'not met'}), "
                     f"eval loss {target['eval_loss_change_pct']:+.2f}% "
                     f"(target within +2%: {'met' if target['eval_loss_met'] else 'not met'})")
    return "\n".join(lines)


def targets(runs: list[dict]) -> dict:
    """Issue 6's CPU targets: socratune >= 3x the reference and >= 1.5x TRL in tokens/s, eval loss
    no more than 2% worse than either."""
    by_name = {r["name"]: r for r in runs}
    if "socratune" not in by_name:
        return {}
    ours = by_name["socratune"]
    found = {}
    for name, speedup_target in (("reference", 3.0), ("trl", 1.5)):
        if name in by_name:
            speedup = ours["tokens_per_s"] / by_name[name]["tokens_per_s"]
            change = 100 * (ours["eval_loss"] / by_name[name]["eval_loss"] - 1)
            found[name] = {"speedup": round(speedup, 2), "speedup_target": speedup_target,
                           "speedup_met": speedup >= speedup_target, "eval_loss_change_pct": round(change, 2),
                           "eval_loss_met": change <= 2.0}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny",
                        help=f'"tiny" (default), "{RANDOM_GEMMA2}" (gemma-2-2b\'s shape, random weights), '
                             'a model directory or a hub id')
    parser.add_argument("--layers", type=int, default=GEMMA2_2B_SHAPE["num_hidden_layers"],
                        help=f"decoder layers of {RANDOM_GEMMA2} (default 26, the real model; fewer for a quick check)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the accelerator's dense peak for model FLOPs utilisation "
                             f"(default: known GPUs {', '.join(PEAK_TFLOPS)}; none on a CPU)")
    parser.add_argument("--preset", default="tiny", help="socratune preset giving LoRA and optimiser settings")
    parser.add_argument("--samples", type=int, default=1024, help="dialogues trained by every run (default 1024)")
    parser.add_argument("--eval-dialogues", type=int, default=100,
                        help="held-apart dialogues for the eval loss (default 100, the notebook's cap)")
    parser.add_argument("--runs", default=",".join(RUNS),
                        help="comma-separated: reference, trl[@k=v+k=v], socratune[@k=v+k=v]")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per run (default: torch's choice, one per core)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every configuration this many times, interleaved; the fastest is reported")
    parser.add_argument("--wait-load", type=float, default=None, metavar="LOAD",
                        help="before each run, wait (up to 15 min) until the 1-minute load average is below LOAD")
    parser.add_argument("--output", type=Path, help="write the results as JSON here (rewritten after every run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec))))
        return 0

    path, data_note = data_path()
    threads = args.threads or os.cpu_count() or 1
    args.peak_tflops = args.peak_tflops or known_peak_tflops(device_name())
    model = args.model
    if model == RANDOM_GEMMA2:
        cache = Path(tempfile.gettempdir()) / f"socratune-bench-{RANDOM_GEMMA2}-{args.layers}-layers"
        model = str(random_gemma2(cache, path, args.layers))
        args.model = f"{RANDOM_GEMMA2} ({args.layers} layers, random weights, {RANDOM_TOKENIZER_VOCAB}-token BPE)"
    spec = {"model": model, "preset": args.preset, "samples": args.samples, "data": str(path), "seed": 42,
            "eval_dialogues": args.eval_dialogues, "threads": threads, "peak_tflops": args.peak_tflops}
    names = list(filter(None, args.runs.split(",")))
    attempts: dict[str, list[dict]] = {name: [] for name in names}
    failed: list[dict] = []
    result = summarize(attempts, data_note, threads, args)
    for _ in range(args.repeat):
        for name in names:
            if args.wait_load is not None:
                wait_for_load(args.wait_load)
            done = subprocess.run([sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)],
                                  check=False, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                # One tool missing or failing on this machine must not cost the other rows.
                print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                failed.append({"name": name, "error": done.stderr.strip().splitlines()[-1:]})
            else:
                attempts[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"{name}: {attempts[name][-1]['tokens_per_s']:.0f} tokens/s, eval loss "
                      f"{attempts[name][-1]['eval_loss']}", file=sys.stderr)
            result = {**summarize(attempts, data_note, threads, args), "failed": failed}
            if args.output:
                args.output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(markdown(result))
    return 1 if failed else 0


def wait_for_load(below: float, patience_s: float = 900) -> None:
    """The CPU may be shared: start a run only once the others have quietened down (or give up waiting)."""
    deadline = time.monotonic() + patience_s
    while os.getloadavg()[0] >= below and time.monotonic() < deadline:
        time.sleep(10)


def summarize(attempts: dict[str, list[dict]], data_note: str, threads: int, args: argparse.Namespace) -> dict:
    """The fastest attempt of every configuration run so far, with every attempt's speed.

    The fastest, not the median: on a shared machine other work only ever slows a run down, so the
    fastest attempt is the closest to what the code itself costs (the rule ``timeit`` follows).
    """
    runs = []
    for tried in attempts.values():
        if tried:
            fastest = max(tried, key=lambda r: r["tokens_per_s"])
            runs.append({**fastest, "tokens_per_s_all": [r["tokens_per_s"] for r in tried]})
    return {"device": device_name(), "threads": threads, "model": args.model, "data": data_note,
            "peak_tflops": args.peak_tflops,
            "samples": args.samples, "eval_dialogues": runs[0]["eval_dialogues"] if runs else 0,
            "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs, "targets": targets(runs)}


if __name__ == "__main__":
    sys.exit(main())
