"""Style scorer v3: held-out judge agreement, what calibrate learns, and generality on real text.

Run from the repository root (needs ``../shared/data``; says so and stops when it is missing)::

    python benchmarks/style_v3.py [--data ../shared/data] [--seeds 4] [--output style_v3.json]

Each figure is labelled with the data it stands on:

1. **Judged dev half, held-out folds** (``judged_dev_ja.jsonl``, 72 replies rated by the
   reference project's external LLM judge): folds grouped by dialogue, 5 folds, several fold
   seeds. ``default``: the shipped profile scored on each held-out fold. ``calibrated``:
   ``calibrate``'s fit on the other k-1 folds, applied to the held-out fold. Mean rho over
   folds and seeds.
2. **What calibrate learnt on the whole dev half**: the fitted weight of ``wrapped`` and
   ``odd_space``, and the mean format/tone of wrapped vs unwrapped replies, default vs fitted.
3. **Shared dialogues** (2,662 Socrates turns and their 2,662 student turns; text nobody on the
   team wrote): mean scores of the Socrates turns, and the AUC of tone and approach separating
   Socrates turns from student turns.
4. **Speed**: replies/s scoring every Socrates turn with its user turn, one process.
5. With ``--breakers``: how many real turns (both roles) each class-3 format breaker fires on,
   and the share of 400 real Socrates turns whose format falls to 2 or below once one is put in.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from socratune.style import AXES, StyleScorer, load_profile  # noqa: E402 (after the sys.path line)
from socratune.style.calibrate import calibrate, read_judged  # noqa: E402


def auc(positive: list[float], negative: list[float]) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(positive, negative).statistic
    return round(float(u) / (len(positive) * len(negative)), 4)


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 3) if values else float("nan")


def dev_half(path: Path, seeds: int) -> dict:
    rows = read_judged(path)
    profile = load_profile()
    runs = [calibrate(rows, profile, seed=seed) for seed in range(seeds)]
    out: dict = {"rows": len(rows)}
    for key, attr in (("held_out_default", "uncalibrated_cv_spearman"), ("held_out_calibrated", "cv_spearman")):
        out[key] = {a: round(sum(getattr(r, attr)[a] or 0.0 for r in runs) / len(runs), 3) for a in AXES}
    fitted = runs[0].profile
    out["kept_axes_seed0"] = runs[0].kept_axes
    out["fitted_weights"] = {
        "format.wrapped": (profile.combine.format.weights.get("wrapped"), fitted.combine.format.weights.get("wrapped")),
        "format.odd_space": (profile.combine.format.weights.get("odd_space"),
                             fitted.combine.format.weights.get("odd_space")),
    }
    for label, prof in (("default", profile), ("fitted_all_rows", fitted)):
        scorer = StyleScorer(prof)
        scored = [(scorer.score(r.text, r.prompt), r) for r in rows]
        wrapped = [(s, r) for s, r in scored if s.features.get("format", {}).get("wrapped")]
        plain = [(s, r) for s, r in scored if not s.features.get("format", {}).get("wrapped")]
        out[f"wrapped_vs_not_{label}"] = {
            axis: (_mean([getattr(s, axis) for s, _ in wrapped]), _mean([getattr(s, axis) for s, _ in plain]))
            for axis in ("tone", "format")}
    out["wrapped_vs_not_judge"] = {
        axis: (_mean([r.judge[axis] for r in rows if r.text.strip().startswith(("「", "{{"))]),
               _mean([r.judge[axis] for r in rows if not r.text.strip().startswith(("「", "{{"))]))
        for axis in ("tone", "format")}
    return out


def shared_turns(path: Path) -> dict:
    dialogues = json.loads(path.read_text(encoding="utf-8"))
    pairs = [(d["messages"][i - 1]["content"], m["content"]) for d in dialogues
             for i, m in enumerate(d["messages"]) if m["role"] == "model" and i]
    students = [m["content"] for d in dialogues for m in d["messages"] if m["role"] == "user"]
    scorer = StyleScorer(load_profile())
    started, cpu = time.perf_counter(), time.process_time()
    socrates = [scorer.score(reply, prompt) for prompt, reply in pairs]
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    student = [scorer.score(text) for text in students]
    return {
        # CPU seconds too: on a shared machine the wall clock measures the other work as well.
        "speed": {"replies": len(pairs), "seconds": round(elapsed, 2), "replies_per_s": round(len(pairs) / elapsed),
                  "cpu_seconds": round(cpu, 2), "replies_per_cpu_s": round(len(pairs) / cpu)},
        "socrates_mean": {a: _mean([getattr(s, a) for s in socrates]) for a in (*AXES, "overall")},
        "student_mean": {a: _mean([getattr(s, a) for s in student]) for a in (*AXES, "overall")},
        "auc_socrates_vs_student": {a: auc([getattr(s, a) for s in socrates], [getattr(s, a) for s in student])
                                    for a in ("tone", "approach")},
    }


BREAKERS = ("braces", "latin_in_word", "english_in_sentence", "split_ending", "special_token", "markup")


def breaker_edits(text: str) -> dict[str, str]:
    """Each class-3 format breaker put into a real reply (our edits of text we did not write)."""
    first, _, rest = text.partition("。")
    middle = len(first) // 2
    return {
        "latin letters inside a word": first[:middle] + "wa" + first[middle:] + "。" + rest,
        "an English word inside a sentence": first + " indeed。" + rest,
        "an ending on its own line": text + "\nかね？",
        "stray braces before the reply": "}}" + text,
        "a special token": text + "<end_of_turn>",
        "markdown bold": f"**{first}**。{rest}",
    }


def breakers(path: Path) -> dict:
    """How often the new format breakers fire on real turns (both roles), and whether each,
    put into a real Socrates turn, brings format to 2 or below."""
    dialogues = json.loads(path.read_text(encoding="utf-8"))
    scorer = StyleScorer(load_profile())
    fired: dict[str, dict[str, int]] = {"socrates": {}, "student": {}}
    at_most_2: dict[str, list[bool]] = {}
    for d in dialogues:
        for m in d["messages"]:
            role = "socrates" if m["role"] == "model" else "student"
            feats = scorer.score(m["content"]).features.get("format", {})
            for name in BREAKERS:
                fired[role][name] = fired[role].get(name, 0) + bool(feats.get(name))
    for d in dialogues[:400]:
        reply = d["messages"][1]["content"]
        for name, text in breaker_edits(reply).items():
            at_most_2.setdefault(name, []).append(scorer.score(text).format <= 2.0)
    return {"turns_with_breaker": fired, "turns_per_role": len(dialogues),
            "edit_format_at_most_2": {k: round(sum(v) / len(v), 3) for k, v in at_most_2.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--seeds", type=int, default=4, help="fold seeds averaged on the dev half")
    parser.add_argument("--output", help="write the figures here as JSON")
    parser.add_argument("--breakers", action="store_true",
                        help="also count the class-3 format breakers on the real turns and edit them in (v3 only)")
    args = parser.parse_args()
    out: dict = {}
    judged = args.data / "judged_dev_ja.jsonl"
    dialogues = args.data / "socratic_dialogues_ja.json"
    if not judged.exists() and not dialogues.exists():
        print(f"{args.data}: no shared data found; nothing measured", file=sys.stderr)
        return 0
    if judged.exists():
        out["dev_half"] = dev_half(judged, args.seeds)
    if dialogues.exists():
        out["shared_dialogues"] = shared_turns(dialogues)
        if args.breakers:
            out["format_breakers"] = breakers(dialogues)
    text = json.dumps(out, ensure_ascii=False, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
