"""The preference-tuning proof on the tiny model and the bundled sample (numbers: benchmarks/RESULTS.md).

    socratune train --output /tmp/p/sft                                   # the supervised run (tiny preset)
    socratune prefs /tmp/p/sft --output /tmp/p/pairs.jsonl               # 6 samples, T 0.7, 128 tokens
    socratune train --config benchmarks/prefs_proof.yaml --method dpo --pairs /tmp/p/pairs.jsonl \\
        --from /tmp/p/sft --output /tmp/p/dpo
    socratune evaluate /tmp/p/dpo --checkpoints none                      # base, supervised, dpo on 40 held-out prompts
    python benchmarks/prefs_proof.py /tmp/p/sft /tmp/p/dpo

This script prints what the proof asks for from those runs: preference-tuned vs supervised per axis
(paired Wilcoxon from ``evaluation.json``, and whether any axis fell by more than its 95%
interval), and the eval loss of both adapters on the *supervised* run's eval split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def supervised_eval_loss(sft_run: Path, adapter_dir: Path) -> float:
    """Mean token cross-entropy of ``adapter_dir`` on the supervised run's eval dialogues."""
    import torch
    from peft import PeftModel

    from socratune.examples import prepare_examples
    from socratune.modeling import load_for_inference
    from socratune.rundir import RunDir
    from socratune.split import apply_split, load_split
    from socratune.template import PaddingCollator

    base, tokenizer = load_for_inference(sft_run, base_only=True)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    from socratune.modeling import resolve_run_model

    config = resolve_run_model(sft_run).config
    report, examples = prepare_examples(config, tokenizer)
    _, eval_dialogues = apply_split(load_split(RunDir(sft_run) / "split.json"), report.kept)
    by_id = {e.dialogue_id: e for e in examples}
    features = [{"input_ids": by_id[d.id].input_ids, "labels": by_id[d.id].labels} for d in eval_dialogues]
    collate = PaddingCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features), 16):
            batch = collate(features[start : start + 16])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none",
                                                       ignore_index=-100)
            total += float(losses.sum())
            count += int((targets != -100).sum())
    return total / count


def main() -> None:
    sft_run, dpo_run = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads((dpo_run / "evaluation" / "evaluation.json").read_text(encoding="utf-8"))
    stats = data["statistics"]
    print("axis      supervised  dpo      diff     p(dpo>sup)  rank-biserial  sup 95% CI       fell beyond CI")
    for key, c in stats["tuned_vs_supervised"].items():
        low, high = stats["summary"]["supervised"][key]["ci_low"], stats["summary"]["supervised"][key]["ci_high"]
        fell = c["mean_difference"] < -(high - low) / 2
        print(f"{key:<9} {c['base_mean']:>9.3f} {c['tuned_mean']:>8.3f} {c['mean_difference']:>+8.3f} "
              f"{c['p_greater']:>10.3g} {c['rank_biserial']:>+13.2f}  [{low:.2f}, {high:.2f}]  {fell}")
    sft_loss = supervised_eval_loss(sft_run, sft_run / "adapter")
    dpo_loss = supervised_eval_loss(sft_run, dpo_run / "adapter")
    print(f"eval loss on the supervised eval split: supervised {sft_loss:.4f}, dpo {dpo_loss:.4f} "
          f"({100 * (dpo_loss / sft_loss - 1):+.1f}%)")


if __name__ == "__main__":
    main()
