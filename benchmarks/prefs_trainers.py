"""DPO in socratune's Trainer (reference log-probs precomputed once) vs TRL's ``DPOTrainer``
(reference = the supervised adapter, which TRL copies into a second, frozen ``ref`` adapter), on
the tiny model: tokens/s, peak memory, and the result (DPO loss and reward accuracy of the
trained policy on all pairs, both measured by the same code against the same reference).

    python benchmarks/prefs_trainers.py SFT_RUN PAIRS.jsonl [--steps 24]

Each trainer runs in its own subprocess, so peak RSS is its own. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, LR, BETA = 4, 5e-4, 0.1


def _setup(sft_run: str, pairs_path: str):
    import torch
    from peft import PeftModel

    from socratune.model.modeling import detect_hardware, load_base, resolve_run_model
    from socratune.training.examples import load_tokenizer_for
    from socratune.training.preference import encode_pairs
    from socratune.training.prefs import read_pairs

    resolved = resolve_run_model(sft_run)
    tokenizer = load_tokenizer_for(resolved.config)
    pairs = read_pairs(pairs_path)
    features, _ = encode_pairs(tokenizer, pairs, resolved.config.data.max_seq_len)
    torch.manual_seed(0)
    base = load_base(resolved.source, hardware=detect_hardware(), dtype="float32", load_in_4bit=False,
                     quant_type="nf4", double_quant=True, compute_dtype="float32", attn_implementation=None,
                     trust_remote_code=False)
    model = PeftModel.from_pretrained(base, str(resolved.adapter_dir), is_trainable=True)
    return resolved, tokenizer, pairs, features, model


def _judge(model, features, reference, pad) -> dict:
    """DPO loss and reward accuracy of ``model`` on every pair against the stored reference."""
    import math

    from socratune.training.preference import reference_logps

    policy = reference_logps(model, features, pad, 16)
    losses, correct = [], 0
    for line, (pc, pr) in policy.items():
        rc, rr = reference[line]
        z = BETA * ((pc - rc) - (pr - rr))
        losses.append(math.log1p(math.exp(-z)))
        correct += z > 0
    return {"dpo_loss_all_pairs": round(sum(losses) / len(losses), 4),
            "reward_accuracy": round(correct / len(losses), 3)}


def run_own(sft_run: str, pairs_path: str, steps: int) -> dict:
    from transformers import TrainingArguments

    from socratune.training.preference import PairCollator, PreferenceTrainer, reference_logps

    _resolved, tokenizer, _pairs, features, model = _setup(sft_run, pairs_path)
    started = time.perf_counter()
    reference = reference_logps(model, features, tokenizer.pad_token_id, 16)
    reference_s = time.perf_counter() - started
    for f in features:
        f["ref_chosen"], f["ref_rejected"] = reference[f["line"]]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps,
                                 learning_rate=LR, lr_scheduler_type="constant", logging_steps=steps,
                                 save_strategy="no", report_to="none",
                                 use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0,
                                 train_sampling_strategy="random", include_num_input_tokens_seen="non_padding")
        trainer = PreferenceTrainer(model=model, args=args, data_collator=PairCollator(tokenizer.pad_token_id),
                                   train_dataset=features, processing_class=tokenizer, beta=BETA)
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
    tokens = trainer.state.num_input_tokens_seen
    return {"trainer": "socratune (precomputed reference)", "train_s": round(train_s, 2),
            "reference_pass_s": round(reference_s, 2), "tokens": int(tokens),
            "tokens_per_s": round(tokens / (train_s + reference_s), 1),
            **_judge(model, features, reference, tokenizer.pad_token_id)}


def run_trl(sft_run: str, pairs_path: str, steps: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from socratune.training.preference import reference_logps

    resolved, tokenizer, pairs, features, model = _setup(sft_run, pairs_path)
    reference = reference_logps(model, features, tokenizer.pad_token_id, 16)  # for judging only, not used in training
    # TRL 1.16 copies the trained adapter into a frozen "ref" adapter itself: the supervised policy.
    kept = {f["line"] for f in features}
    rows = [{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs if p.line in kept]
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
                         lr_scheduler_type="constant", logging_steps=steps, save_strategy="no", report_to="none",
                         use_cpu=True, beta=BETA, max_length=resolved.config.data.max_seq_len, seed=0,
                         disable_tqdm=True, include_num_input_tokens_seen="non_padding")
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
    model.set_adapter("default")
    tokens = trainer.state.num_input_tokens_seen
    return {"trainer": "TRL DPOTrainer (ref adapter)", "train_s": round(train_s, 2), "reference_pass_s": 0.0,
            "tokens": int(tokens), "tokens_per_s": round(tokens / train_s, 1) if tokens else None,
            **_judge(model, features, reference, tokenizer.pad_token_id)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sft_run")
    parser.add_argument("pairs")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--only", choices=["own", "trl"])
    args = parser.parse_args()
    if args.only:
        result = (run_own if args.only == "own" else run_trl)(args.sft_run, args.pairs, args.steps)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print("RESULT " + json.dumps(result))
        return
    for which in ("own", "trl"):
        done = subprocess.run([sys.executable, str(Path(__file__)), args.sft_run, args.pairs, "--steps",
                               str(args.steps), "--only", which], capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        print(lines[-1][7:] if lines else f"{which} failed:\n{done.stderr[-3000:]}")


if __name__ == "__main__":
    main()
