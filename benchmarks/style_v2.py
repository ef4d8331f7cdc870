"""Style scorer v2: agreement with an external judge, edits it must notice, and speed.

Run from the repository root (needs ``../shared/data``; says so and stops when it is missing)::

    python benchmarks/style_v2.py [--data ../shared/data] [--limit N] [--output style_v2.json] [--replies F.jsonl ...]

Three measurements (four with ``--replies``), each labelled by the data it stands on:

1. **Judge agreement, development half** (``judged_dev_ja.jsonl``: 72 replies rated by the
   reference project's external LLM judge): Spearman per axis of the shipped profile on all
   rows, and ``calibrate``'s grouped 5-fold figures (starting vs refitted weights on the same
   held-out folds), averaged over four fold seeds. The shipped weights were chosen while
   looking at this set, so its all-rows figure flatters them; the held-out half is the check.
2. **Edits of real replies** (the shared dialogues' Socrates turns, which nobody on the team
   wrote): each edit breaks one thing a judge rates (polite speech, lecturing with no question,
   English, markup, U+FFFD, word salad, a loop, an unrelated prompt, a whole-reply 「…」), and
   the figure is the share of replies whose edited form scores strictly lower on that axis
   (for 「…」: the share whose tone stays within 0.25, since quoting is not a change of voice).
   The edits are ours, the replies are not.
3. **Speed**: replies/s scoring every Socrates turn with its user turn, one process.
4. With ``--replies FILE...``: mean scores of model replies written by ``socratune generate``
   (the tiny model's word salad at several checkpoints and temperatures; our own generated data).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from socratune.style import AXES, StyleScorer, load_profile  # noqa: E402 (after the sys.path line)
from socratune.style.calibrate import calibrate, read_judged, spearman  # noqa: E402
from socratune.style.morphology import tokenizer as _tokenizer  # noqa: E402

POLITE = [("のかね", "のですか"), ("かね", "ですか"), ("だろうか", "でしょうか"), ("だね", "ですね"),
          ("だよ", "ですよ"), ("のだ。", "のです。"), ("だ。", "です。"), ("君", "あなた"), ("かな", "でしょうか")]


def polite(text: str) -> str:
    for plain, courteous in POLITE:
        text = text.replace(plain, courteous)
    return text


def lecture(text: str) -> str:
    """No question left: statements only, ending in a prescription."""
    kept = [s for s in re.split(r"(?<=[。！？?])", text) if s and not s.endswith(("？", "?"))]
    topic = re.findall(r"[\u4E00-\u9FFF]{2,}", text)
    thing = topic[0] if topic else "それ"
    return "".join(kept) + f"{thing}とは、結局のところ大切なものだ。君はそれを理解する必要がある。"


def salad(text: str, rng: random.Random) -> str:
    """The reply's words shuffled, its Socratic ending kept: 「では景えてしまうものかね？」-like."""
    words = [m.surface() for m in _tokenizer().tokenize(re.sub(r"[。、？！?!「」]", "", text))]
    rng.shuffle(words)
    return "".join(words[:40]) + "ものかね？"


def loop(text: str) -> str:
    first = re.split(r"(?<=[。！？?])", text)[0]
    return first * 5


def edits(text: str, other_prompt: str, rng: random.Random) -> dict[str, tuple[str, str | None, str]]:
    """name -> (edited text, prompt override or None, axis that must drop)."""
    middle = len(text) // 2
    return {
        "polite です/ます": (polite(text), None, "tone"),
        "lecture, no question": (lecture(text), None, "approach"),
        "English sentence": (text + " Let me ask you something important about this.", None, "format"),
        "HTML markup": (f"<p>{text}</p><br>", None, "format"),
        "markdown": (f"**{text[:middle]}**\n- {text[middle:]}", None, "format"),
        "U+FFFD": (text[:middle] + "\ufffd\ufffd" + text[middle:], None, "format"),
        "word salad": (salad(text, rng), None, "logic"),
        "loop": (loop(text), None, "logic"),
        "unrelated prompt": (text, other_prompt, "logic"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--limit", type=int, default=400, help="replies to edit (all are timed)")
    parser.add_argument("--output", help="write the figures here as JSON")
    parser.add_argument("--replies", nargs="*", type=Path, default=[],
                        help="`socratune generate --output` JSONL files (e.g. the tiny model's replies at several "
                             "checkpoints): mean scores per file, the word-salad check")
    args = parser.parse_args()
    shared = args.data
    if not (shared / "socratic_dialogues_ja.json").exists():
        print(f"{shared} not found: nothing measured", file=sys.stderr)
        return 0
    scorer = StyleScorer(load_profile())
    out: dict = {}
    for path in args.replies:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        scored = [scorer.score(r["text"], r.get("prompt")) for r in rows]
        out.setdefault("generated_replies_mean", {})[path.name] = {
            "replies": len(rows), **{a: round(sum(getattr(s, a) for s in scored) / len(scored), 3)
                                     for a in (*AXES, "overall")}}

    judged = shared / "judged_dev_ja.jsonl"
    if judged.exists():
        rows = read_judged(judged)
        scores = [scorer.score(r.text, r.prompt).axes() for r in rows]
        out["dev_all_rows"] = {a: spearman([s[a] for s in scores], [r.judge[a] for r in rows]) for a in AXES}
        runs = [calibrate(rows, scorer.profile, seed=seed) for seed in range(4)]
        for key, attr in (("dev_cv_uncalibrated", "uncalibrated_cv_spearman"), ("dev_cv_calibrated", "cv_spearman")):
            out[key] = {a: round(sum(getattr(r, attr)[a] for r in runs) / len(runs), 3) for a in AXES}
        out["dev_calibrated_kept_axes"] = runs[0].kept_axes

    dialogues = json.loads((shared / "socratic_dialogues_ja.json").read_text(encoding="utf-8"))
    pairs = [(d["messages"][i - 1]["content"], m["content"]) for d in dialogues
             for i, m in enumerate(d["messages"]) if m["role"] == "model" and i]
    started = time.perf_counter()
    base = [scorer.score(reply, prompt) for prompt, reply in pairs]
    elapsed = time.perf_counter() - started
    out["speed"] = {"replies": len(pairs), "seconds": round(elapsed, 2), "replies_per_s": round(len(pairs) / elapsed)}
    out["real_turns_mean"] = {a: round(sum(getattr(s, a) for s in base) / len(base), 3) for a in (*AXES, "overall")}

    rng = random.Random(0)
    chosen = rng.sample(range(len(pairs)), min(args.limit, len(pairs)))
    lower: dict[str, list[bool]] = {}
    quoted_same = []
    for n, i in enumerate(chosen):
        prompt, reply = pairs[i]
        other = pairs[chosen[(n + 1) % len(chosen)]][0]
        for name, (text, prompt_override, axis) in edits(reply, other, rng).items():
            edited = scorer.score(text, prompt_override or prompt)
            lower.setdefault(f"{name} -> {axis}", []).append(getattr(edited, axis) < getattr(base[i], axis))
        wrapped = scorer.score(f"「{reply}」", prompt)
        quoted_same.append(abs(wrapped.tone - base[i].tone) <= 0.25)
    out["edits_scored_lower"] = {k: round(sum(v) / len(v), 3) for k, v in lower.items()}
    out["whole_reply_quotes_keep_tone"] = round(sum(quoted_same) / len(quoted_same), 3)
    out["edited_replies"] = len(chosen)
    text = json.dumps(out, ensure_ascii=False, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
