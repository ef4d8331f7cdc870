"""The preference-tuning proof on the tiny model and the bundled sample (numbers: benchmarks/RESULTS.md).

    socratune train --output /tmp/p/sft                                   # the supervised run (tiny preset)
    socratune prefs /tmp/p/sft --output /tmp/p/pairs.jsonl               # 6 samples, T 0.7, 128 tokens
    socratune train --method dpo --pairs /tmp/p/pairs.jsonl --from /tmp/p/sft --output /tmp/p/dpo   # its defaults
    socratune evaluate /tmp/p/dpo --checkpoints none                      # base, supervised, dpo on 40 held-out prompts
    python benchmarks/prefs_proof.py check /tmp/p/sft /tmp/p/dpo
    python benchmarks/prefs_proof.py power /tmp/p/dpo                     # prompts needed for p < 0.01
    python benchmarks/prefs_proof.py prompts --data ../shared/data --n 160 /tmp/p/heldout.jsonl
    socratune evaluate /tmp/p/dpo --checkpoints none --prompts /tmp/p/heldout.jsonl
    python benchmarks/prefs_proof.py check /tmp/p/sft /tmp/p/dpo

``check`` prints what the proof asks for from those runs: preference-tuned vs supervised per axis
(paired Wilcoxon from ``evaluation.json``, and whether any axis fell by more than its 95%
interval), and the eval loss of both adapters on the *supervised* run's eval split.

``power`` estimates, from one evaluation's paired overall differences (preference-tuned minus
supervised, resampled with replacement), how often a paired Wilcoxon test on n prompts would reach
p < 0.01. It resamples the observed gain, so it is optimistic when that gain was lucky.

``prompts`` writes more held-out prompts than the 40 bundled ones, for a paired test with the
power to see a real gain (RESULTS.md: power 0.34 at 40 prompts and 0.95 at 160 for the gain seen
at β 0.3): the opening user turns of the shared real dialogues, which nobody on the team wrote
and none of which is in the bundled sample, drawn by a seeded shuffle with no other filter.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "src" / "socratune" / "assets"


def supervised_eval_loss(sft_run: Path, adapter_dir: Path) -> float:
    """Mean token cross-entropy of ``adapter_dir`` on the supervised run's eval dialogues."""
    import torch
    from peft import PeftModel

    from socratune.core.rundir import RunDir
    from socratune.data.split import apply_split, load_split
    from socratune.data.template import PaddingCollator
    from socratune.model.modeling import load_for_inference
    from socratune.training.examples import prepare_examples

    base, tokenizer = load_for_inference(sft_run, base_only=True)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    from socratune.model.modeling import resolve_run_model

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


def write_heldout_prompts(data_dir: Path, count: int, seed: int, output: Path) -> int:
    """Write ``count`` opening user turns of the shared dialogues, unseen by the tiny run, as evaluate prompts."""
    dialogues = json.loads((data_dir / "socratic_dialogues_ja.json").read_text(encoding="utf-8"))
    sample = json.loads((ASSETS / "sample_dialogues_ja.json").read_text(encoding="utf-8"))
    seen = {m["content"] for d in sample for m in d["messages"]}
    with (ASSETS / "eval_prompts_ja.jsonl").open(encoding="utf-8") as bundled:
        seen |= {json.loads(line)["prompt"] for line in bundled}
    openers = sorted({d["messages"][0]["content"] for d in dialogues if d["messages"][0]["role"] == "user"} - seen)
    random.Random(seed).shuffle(openers)
    chosen = openers[:count]
    with output.open("w", encoding="utf-8") as out:
        for i, prompt in enumerate(chosen):
            out.write(json.dumps({"id": f"s{i:03d}", "prompt": prompt}, ensure_ascii=False) + "\n")
    return len(chosen)


def paired_overall_differences(dpo_run: Path) -> list[float]:
    """Preference-tuned minus supervised overall score, one per evaluated prompt and turn."""
    data = json.loads((dpo_run / "evaluation" / "evaluation.json").read_text(encoding="utf-8"))
    scores: dict[str, dict[tuple[str, int], float]] = {}
    for reply in data["replies"]:
        scores.setdefault(reply["model"], {})[(reply["prompt_id"], reply["turn"])] = reply["scores"]["overall"]
    return [scores["tuned"][key] - scores["supervised"][key] for key in sorted(scores["tuned"])]


def power(dpo_run: Path, sizes: list[int], draws: int = 2000, seed: int = 0) -> None:
    import numpy as np
    from scipy.stats import wilcoxon

    differences = np.array(paired_overall_differences(dpo_run))
    print(f"{len(differences)} paired differences: mean {differences.mean():+.3f}, sd {differences.std(ddof=1):.3f}")
    rng = np.random.default_rng(seed)
    for size in sizes:
        hits = 0
        for _ in range(draws):
            drawn = rng.choice(differences, size, replace=True)
            hits += bool(drawn.any()) and wilcoxon(drawn, alternative="greater").pvalue < 0.01
        print(f"n {size:>4}: power at p < 0.01 {hits / draws:.2f}")


def check(sft_run: Path, dpo_run: Path) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_cmd = commands.add_parser("check", help="the proof's figures from a supervised and a preference run")
    check_cmd.add_argument("sft_run", type=Path)
    check_cmd.add_argument("dpo_run", type=Path)
    power_cmd = commands.add_parser("power", help="prompts a paired test needs, from one evaluation")
    power_cmd.add_argument("dpo_run", type=Path)
    power_cmd.add_argument("--sizes", type=int, nargs="+", default=[40, 80, 120, 160, 240])
    prompts_cmd = commands.add_parser("prompts", help="held-out prompts from the shared real dialogues")
    prompts_cmd.add_argument("output", type=Path)
    prompts_cmd.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    prompts_cmd.add_argument("--n", type=int, default=160)
    prompts_cmd.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "check":
        check(args.sft_run, args.dpo_run)
    elif args.command == "power":
        power(args.dpo_run, args.sizes)
    else:
        written = write_heldout_prompts(args.data, args.n, args.seed, args.output)
        print(f"{written} held-out prompts written to {args.output}")


if __name__ == "__main__":
    main()
