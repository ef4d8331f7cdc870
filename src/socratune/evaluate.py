"""How Socratic is the tuned model? Base vs tuned vs checkpoints on held-out prompts.

``socratune evaluate RUN`` follows these steps (``evaluate()``):

1. Prompts: the bundled 40 held-out questions (``assets/eval_prompts_ja.jsonl``, none from the
   training sample) or ``--prompts FILE`` (JSONL ``{"id", "prompt", "followups"?}``); the models:
   the untuned base, each selected checkpoint (oldest first) and the final adapter.
2. Replies: the base is loaded once and answers first; then each adapter is loaded onto that same
   base with PEFT (``load_adapter``/``set_adapter``), answers, and is dropped again. Greedy
   decoding, batched, seeded: the same command gives the same replies.
3. ``--turns N`` continues every dialogue N more exchanges with a scripted user: at turn k the
   user says the prompt's own k-th ``followups`` line when it has one, else line k of the bundled
   script ``assets/eval_followups_ja.txt`` (cycling), so every model hears the same user.
4. Every reply is scored by the style scorer against the user message it answers, and, with
   ``--judge``, rated by an LLM judge (``judge.py``).
5. Statistics, with the dialogue as the unit (its score = the mean of its replies): per model
   and axis the mean with a 95% percentile-bootstrap interval; tuned vs base a paired Wilcoxon
   signed-rank test (one-sided: tuned higher) with the matched-pairs rank-biserial correlation as
   effect size; scorer-judge agreement as Spearman's rho per axis over all replies.
6. The report (``report.md``, ``evaluation.json`` with every number and reply, PNG plots) is
   written into a staging folder that replaces ``RUN/evaluation`` by renames; an earlier report
   is kept, renamed ``RUN/evaluation-<its creation time>``, never overwritten.

Tests: ``pytest tests/test_evaluate.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from .data import jsonl_lines
from .errors import ConfigError, DataError, RunDirError
from .generate import GenParams
from .judge import Judge
from .rundir import (
    CHECKPOINT_PREFIX,
    RunDir,
    checkpoint_problem,
    checkpoint_step,
    write_json_atomic,
    write_text_atomic,
)
from .style import AXES, StyleProfile, StyleScorer, load_profile

logger = logging.getLogger("socratune")

# Run-directory names of the report (rundir.py holds the training files' names; see report).
EVALUATION_DIR = "evaluation"
REPORT_MD = "report.md"
EVALUATION_JSON = "evaluation.json"
MEANS_PNG, PROGRESSION_PNG, DISTRIBUTIONS_PNG, AGREEMENT_PNG = (
    "means.png", "progression.png", "distributions.png", "judge_agreement.png")
KEYS = (*AXES, "overall")
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
ALPHA = 0.05  # significance level of "tuned beats base"
FORMAT_VERSION = 1


# --- prompts and the scripted user ------------------------------------------------------------


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    prompt: str
    followups: tuple[str, ...] = ()


def load_prompts(path: str | Path | None = None) -> list[EvalPrompt]:
    """Prompts from a JSONL file (``{"id", "prompt", "followups"?}``), or the bundled set."""
    if path is None:
        source, text = "bundled eval_prompts_ja.jsonl", (
            resources.files("socratune") / "assets" / "eval_prompts_ja.jsonl").read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read prompts {source}: {exc}") from exc
    prompts: list[EvalPrompt] = []
    problems: list[str] = []
    for number, item, problem in jsonl_lines(text):
        if problem:
            problems.append(f"{source}:{number}: {problem}")
            continue
        followups = item.get("followups", []) if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            problems.append(f"{source}:{number}: needs a non-empty string 'prompt'")
        elif not (isinstance(followups, list) and all(isinstance(f, str) and f.strip() for f in followups)):
            problems.append(f"{source}:{number}: 'followups' must be a list of non-empty strings")
        else:
            prompts.append(EvalPrompt(str(item.get("id", number)), item["prompt"].strip(),
                                      tuple(f.strip() for f in followups)))
    duplicates = sorted({p.id for p in prompts if [q.id for q in prompts].count(p.id) > 1})
    if duplicates:
        problems.append(f"{source}: duplicate ids {', '.join(duplicates)}")
    if problems:
        raise DataError("\n".join(problems))
    if not prompts:
        raise DataError(f"{source}: no prompts")
    return prompts


def followup_script() -> list[str]:
    """The scripted user's lines, in order (``assets/eval_followups_ja.txt``)."""
    text = (resources.files("socratune") / "assets" / "eval_followups_ja.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def followup(prompt: EvalPrompt, turn: int, script: list[str]) -> str:
    """What the user says at ``turn`` (1 = the first follow-up)."""
    if turn <= len(prompt.followups):
        return prompt.followups[turn - 1]
    return script[(turn - 1) % len(script)]


# --- the models compared ----------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """One model under evaluation: the base, a checkpoint or the final adapter."""

    name: str
    kind: str  # "base", "checkpoint" or "tuned"
    step: int | None
    adapter: Path | None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "step": self.step,
                "adapter": str(self.adapter) if self.adapter else None}


def select_subjects(run: RunDir, checkpoints: str = "all") -> tuple[list[Subject], list[dict[str, str]]]:
    """Base, the chosen checkpoints and the tuned model, plus checkpoints skipped and why.

    ``checkpoints`` is ``all``, ``none`` or names separated by commas (``checkpoint-80`` or
    ``80``). With ``all`` an incomplete checkpoint is skipped with its reason; one named
    explicitly must be complete.
    """
    if not (run.adapter_dir / "adapter_config.json").exists():
        raise RunDirError(f"{run.path} has no final adapter: the run is not finished "
                          f"(socratune status {run.path} tells where it stands)")
    present = {p.name: p for p in run.checkpoints()}
    spec = checkpoints.strip()
    chosen: list[Path] = []
    if spec == "all":
        chosen = list(present.values())
    elif spec != "none":
        for raw in (s.strip() for s in spec.split(",")):
            name = raw if raw.startswith(CHECKPOINT_PREFIX) else f"{CHECKPOINT_PREFIX}{raw}"
            if name not in present:
                raise ConfigError(f"--checkpoints: {run.checkpoints_dir} has no {raw or '(empty name)'}; "
                                  f"allowed: all, none, {', '.join(present) or '(no checkpoints)'}",
                                  key="--checkpoints", allowed=["all", "none", *present])
            chosen.append(present[name])
    subjects, skipped = [Subject("base", "base", 0, None)], []
    for path in sorted(dict.fromkeys(chosen), key=lambda p: checkpoint_step(p) or 0):
        problem = checkpoint_problem(path)
        if problem and spec != "all":
            raise RunDirError(f"{path} cannot be evaluated: {problem}")
        if problem:
            skipped.append({"name": path.name, "reason": problem})
            logger.warning("skipping %s: %s", path.name, problem)
        else:
            subjects.append(Subject(path.name, "checkpoint", checkpoint_step(path), path))
    summary = run.summary() or {}
    supervised = supervised_subject(run)
    if supervised is not None:
        subjects.append(supervised)
    subjects.append(Subject("tuned", "tuned", summary.get("global_step"), run.adapter_dir))
    return subjects, skipped


def supervised_subject(run: RunDir) -> Subject | None:
    """A preference-tuned run (DPO / ORPO) is compared with the supervised run it continued
    (``prefs.from_run``) as well as with the base; None for a supervised run."""
    from .resume import read_recorded_config

    prefs = (read_recorded_config(run) or {}).get("prefs") or {}
    if not prefs.get("from_run"):
        return None
    source = RunDir(prefs["from_run"])
    if not (source.adapter_dir / "adapter_config.json").exists():
        raise RunDirError(f"{run.path} continued the supervised run {source.path}, whose final adapter is gone; "
                          "restore it to compare, or evaluate the supervised run on its own")
    return Subject("supervised", "supervised", (source.summary() or {}).get("global_step"), source.adapter_dir)


# --- generation -------------------------------------------------------------------------------


def converse(model: Any, tokenizer: Any, prompts: list[EvalPrompt], turns: int, script: list[str],
             params: GenParams, batch_size: int) -> list[list[dict[str, str]]]:
    """Each prompt's dialogue: the model's reply, then ``turns`` more scripted exchanges."""
    from .data import BOT
    from .generate import generate_replies

    dialogues = [[{"role": "user", "content": p.prompt}] for p in prompts]
    for turn in range(turns + 1):
        if turn:
            for dialogue, prompt in zip(dialogues, prompts):
                dialogue.append({"role": "user", "content": followup(prompt, turn, script)})
        replies = generate_replies(model, tokenizer, dialogues, params, batch_size)
        for dialogue, reply in zip(dialogues, replies):
            dialogue.append({"role": BOT, "content": reply})
    return dialogues


def generate_dialogues(run: RunDir, subjects: list[Subject], prompts: list[EvalPrompt], turns: int,
                       script: list[str], params: GenParams, batch_size: int,
                       seed: int) -> dict[str, list[list[dict]]]:
    """Dialogues of every subject; the base is loaded once and adapters are swapped on it."""
    import torch

    from .callbacks import release_memory
    from .modeling import load_adapter_for_inference, load_for_inference

    base, tokenizer = load_for_inference(run.path, base_only=True)
    model, loaded = base, None
    dialogues: dict[str, list[list[dict]]] = {}
    for number, subject in enumerate(subjects, 1):
        logger.info("evaluate: replies of %s (%d of %d models, %d prompts, %d turn(s))",
                    subject.name, number, len(subjects), len(prompts), turns + 1)
        if subject.adapter is not None:
            # Adapters are swapped on the one base: PeftModel wraps it on the first, later ones
            # are loaded beside it, activated, and the previous one deleted (memory stays flat).
            if loaded is None:
                model = load_adapter_for_inference(base, subject.adapter)
                loaded = "default"
            else:
                model.load_adapter(str(subject.adapter), adapter_name=subject.name)
                model.set_adapter(subject.name)
                model.delete_adapter(loaded)
                loaded = subject.name
        torch.manual_seed(seed)
        dialogues[subject.name] = converse(model, tokenizer, prompts, turns, script, params, batch_size)
    del model, base
    release_memory()
    return dialogues


# --- statistics -------------------------------------------------------------------------------


def bootstrap_ci(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, level: float = CONFIDENCE,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of the mean; None without values."""
    import numpy as np

    if not values:
        return None
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def rank_biserial(differences: list[float]) -> float:
    """Matched-pairs rank-biserial correlation: (R+ - R-) / (R+ + R-) over the nonzero
    differences ranked by size; +1 when every pair favours the first sample, 0 when none differ."""
    from scipy.stats import rankdata

    nonzero = [d for d in differences if d != 0]
    if not nonzero:
        return 0.0
    ranks = rankdata([abs(d) for d in nonzero])
    plus = sum(r for r, d in zip(ranks, nonzero) if d > 0)
    return float((2 * plus - ranks.sum()) / ranks.sum())


def paired_comparison(tuned: list[float], base: list[float], alpha: float = ALPHA) -> dict[str, Any]:
    """Wilcoxon signed-rank test of tuned > base on paired values, with effect size and verdict."""
    from scipy.stats import wilcoxon

    if len(tuned) != len(base):
        raise ValueError(f"{len(tuned)} tuned values but {len(base)} base values")
    differences = [t - b for t, b in zip(tuned, base)]
    nonzero = sum(d != 0 for d in differences)
    result: dict[str, Any] = {
        "n": len(differences), "n_nonzero": nonzero,
        "mean_difference": sum(differences) / len(differences) if differences else None,
        "statistic": None, "p_greater": 1.0, "p_two_sided": 1.0, "rank_biserial": rank_biserial(differences),
    }
    if nonzero:  # all pairs equal: no evidence either way (scipy would warn and divide by zero)
        result["statistic"] = float(wilcoxon(tuned, base, alternative="greater").statistic)
        result["p_greater"] = float(wilcoxon(tuned, base, alternative="greater").pvalue)
        result["p_two_sided"] = float(wilcoxon(tuned, base).pvalue)
    result["tuned_beats_base"] = bool(result["p_greater"] < alpha and result["rank_biserial"] > 0)
    return result


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho; None when undefined (fewer than 3 pairs or a constant side)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def describe(values: list[float], seed: int) -> dict[str, Any]:
    """Mean, bootstrap interval and count of one model's values on one axis."""
    interval = bootstrap_ci(values, seed=seed)
    return {"mean": _mean(values), "ci_low": interval[0] if interval else None,
            "ci_high": interval[1] if interval else None, "n": len(values)}


# --- scoring and the numbers of the report ----------------------------------------------------


def score_dialogues(dialogues: dict[str, list[list[dict]]], prompts: list[EvalPrompt],
                    scorer: StyleScorer) -> list[dict[str, Any]]:
    """One record per reply: model, prompt id, turn, the user line it answers, reply, scores."""
    records = []
    for model, model_dialogues in dialogues.items():
        for prompt, dialogue in zip(prompts, model_dialogues):
            for turn, index in enumerate(range(1, len(dialogue), 2)):
                user, reply = dialogue[index - 1]["content"], dialogue[index]["content"]
                score = scorer.score(reply, user)
                records.append({"model": model, "prompt_id": prompt.id, "turn": turn, "user": user,
                                "reply": reply, "scores": score.axes(), "explanations": score.explanations})
    return records


def _unit_values(records: list[dict], model: str, key: str, source: str) -> dict[str, float]:
    """Per dialogue (prompt id) the mean of its replies' ``source`` ("scores"/"judge") on ``key``."""
    by_prompt: dict[str, list[float]] = {}
    for r in records:
        value = r["judge"]["scores"][key] if source == "judge" else r["scores"][key]
        if r["model"] == model and value is not None:
            by_prompt.setdefault(r["prompt_id"], []).append(value)
    return {pid: sum(v) / len(v) for pid, v in by_prompt.items()}


def compare_subjects(records: list[dict], tuned: str, other: str) -> dict[str, Any]:
    """Per key, ``tuned`` vs ``other`` on their shared dialogues: means and the paired test
    (``base_mean`` holds ``other``'s mean, as in tuned vs base)."""
    comparison = {}
    for key in KEYS:
        mine, theirs = _unit_values(records, tuned, key, "scores"), _unit_values(records, other, key, "scores")
        shared = sorted(mine.keys() & theirs.keys())
        comparison[key] = {"base_mean": _mean([theirs[p] for p in shared]), "tuned_mean": _mean([mine[p] for p in shared]),
                           **paired_comparison([mine[p] for p in shared], [theirs[p] for p in shared])}
    return comparison


def compute_statistics(records: list[dict], subjects: list[Subject], seed: int, judged: bool) -> dict[str, Any]:
    """Every aggregate number of the report, from the per-reply records."""
    names = [s.name for s in subjects]
    summary = {m: {k: describe(list(_unit_values(records, m, k, "scores").values()), seed) for k in KEYS}
               for m in names}
    turns = max((r["turn"] for r in records), default=0) + 1
    by_turn = {m: {k: [_mean([r["scores"][k] for r in records if r["model"] == m and r["turn"] == t])
                       for t in range(turns)] for k in KEYS} for m in names}
    comparison = {}
    for key in KEYS:
        tuned, base = _unit_values(records, "tuned", key, "scores"), _unit_values(records, "base", key, "scores")
        shared = sorted(tuned.keys() & base.keys())
        comparison[key] = {"base_mean": _mean([base[p] for p in shared]), "tuned_mean": _mean([tuned[p] for p in shared]),
                           **paired_comparison([tuned[p] for p in shared], [base[p] for p in shared])}
    stats: dict[str, Any] = {"summary": summary, "by_turn": by_turn, "tuned_vs_base": comparison}
    if "supervised" in names:
        stats["tuned_vs_supervised"] = compare_subjects(records, "tuned", "supervised")
    if judged:
        stats["judge_summary"] = {
            m: {a: {**describe(list(_unit_values(records, m, a, "judge").values()), seed),
                    "missing": sum(r["model"] == m and r["judge"]["scores"][a] is None for r in records)}
                for a in AXES} for m in names}
        agreement = {}
        for axis in AXES:
            pairs = [(r["scores"][axis], r["judge"]["scores"][axis]) for r in records
                     if r["judge"]["scores"][axis] is not None]
            agreement[axis] = {"spearman": spearman([p[0] for p in pairs], [p[1] for p in pairs]), "n": len(pairs)}
        stats["agreement"] = agreement
    return stats


# --- plots ------------------------------------------------------------------------------------


def _plot(records: list[dict], subjects: list[Subject], stats: dict[str, Any], folder: Path) -> list[str]:
    """Means with intervals, checkpoint progression, distributions (and judge agreement)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _save

    names = [s.name for s in subjects]
    summary = stats["summary"]
    written = []

    figure, axes = plt.subplots(figsize=(max(7.0, 0.25 * len(KEYS) * len(names) + 4), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(KEYS))]
        means = [summary[name][k]["mean"] or 0 for k in KEYS]
        errors = [[m - (summary[name][k]["ci_low"] or m) for m, k in zip(means, KEYS)],
                  [(summary[name][k]["ci_high"] or m) - m for m, k in zip(means, KEYS)]]
        axes.bar(xs, means, width, yerr=errors, capsize=2, label=name)
    axes.set_xticks(range(len(KEYS)), KEYS)
    axes.set_ylim(0, 4.2)
    axes.set_ylabel("mean style score (0-4), 95% bootstrap CI")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes.grid(axis="y", alpha=0.3)
    _save(figure, folder / MEANS_PNG)
    plt.close(figure)
    written.append(MEANS_PNG)

    # Base (step 0) and the checkpoints form the line; the final adapter is a star at its step,
    # which is often the last checkpoint's (the same weights, or the best ones when kept).
    figure, axes = plt.subplots(figsize=(7, 4.5))
    line = [s for s in subjects if s.kind not in ("tuned", "supervised")]  # supervised: another run's steps
    steps = [s.step or 0 for s in line]
    tuned_step = subjects[-1].step if subjects[-1].step is not None else steps[-1] + 1
    for key in KEYS:
        drawn = axes.plot(steps, [summary[s.name][key]["mean"] for s in line], marker="o", label=key,
                          linewidth=2.5 if key == "overall" else 1.5)[0]
        axes.fill_between(steps, [summary[s.name][key]["ci_low"] for s in line],
                          [summary[s.name][key]["ci_high"] for s in line], color=drawn.get_color(), alpha=0.12)
        axes.plot([tuned_step], [summary["tuned"][key]["mean"]], marker="*", markersize=13, linestyle="",
                  color=drawn.get_color())
    axes.set_xlabel("training step (step 0 = untuned base; ★ = final adapter)")
    axes.set_ylabel("mean style score (0-4)")
    axes.set_ylim(0, 4.2)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    _save(figure, folder / PROGRESSION_PNG)
    plt.close(figure)
    written.append(PROGRESSION_PNG)

    figure, grid = plt.subplots(1, len(KEYS), figsize=(3.2 * len(KEYS), 4), sharey=True)
    for axes, key in zip(grid, KEYS):
        axes.boxplot([[r["scores"][key] for r in records if r["model"] == n] for n in names], showmeans=True)
        axes.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right", fontsize=8)
        axes.set_title(key)
        axes.set_ylim(-0.1, 4.1)
        axes.grid(axis="y", alpha=0.3)
    grid[0].set_ylabel("style score per reply (0-4)")
    _save(figure, folder / DISTRIBUTIONS_PNG)
    plt.close(figure)
    written.append(DISTRIBUTIONS_PNG)

    if "agreement" in stats:
        figure, grid = plt.subplots(1, len(AXES), figsize=(3.2 * len(AXES), 3.4), sharey=True)
        for axes, axis in zip(grid, AXES):
            pairs = [(r["scores"][axis], r["judge"]["scores"][axis]) for r in records
                     if r["judge"]["scores"][axis] is not None]
            axes.scatter([p[0] for p in pairs], [p[1] for p in pairs], s=12, alpha=0.5)
            rho = stats["agreement"][axis]["spearman"]
            axes.set_title(f"{axis}: rho {rho:.2f}" if rho is not None else f"{axis}: rho n/a", fontsize=10)
            axes.set_xlim(-0.1, 4.1)
            axes.set_ylim(-0.2, 4.2)
            axes.set_xlabel("scorer")
            axes.grid(alpha=0.3)
        grid[0].set_ylabel("judge")
        _save(figure, folder / AGREEMENT_PNG)
        plt.close(figure)
        written.append(AGREEMENT_PNG)
    return written


# --- the markdown report ----------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def render_report(data: dict[str, Any]) -> str:
    """report.md from evaluation.json's content (so the two can never disagree)."""
    stats, names = data["statistics"], [m["name"] for m in data["models"]]
    lines = [f"# Style evaluation of {data['run_dir']}", "",
             (f"Created {data['created']}. {data['prompts']['count']} prompts ({data['prompts']['source']}), "
             f"{data['turns'] + 1} repl{'y' if data['turns'] == 0 else 'ies'} per dialogue, "
             f"greedy decoding, at most {data['generation']['max_new_tokens']} new tokens, "
             f"style profile `{data['profile']}`."), "",
             ("Scores are 0-4. A dialogue is the unit: its score is the mean of its replies. Intervals are "
             f"{CONFIDENCE:.0%} percentile-bootstrap intervals of the mean ({data['bootstrap']['resamples']} "
             "resamples). Tuned vs base: paired Wilcoxon signed-rank test, one-sided (tuned higher), "
             f"α = {ALPHA}; effect size = matched-pairs rank-biserial correlation (−1 … +1)."), ""]
    if data["turns"]:
        lines += [(f"The scripted user's follow-up lines (turn k uses line k, cycling, unless a prompt "
                  f"brings its own): {' / '.join(data['followup_script'])}"), ""]
    lines += ["## Tuned vs base", ""]
    rows = [[k, _num(c["base_mean"]), _num(c["tuned_mean"]), _num(c["mean_difference"], 3),
             _num(c["statistic"], 1), f"{c['p_greater']:.3g}", _num(c["rank_biserial"]),
             "**yes**" if c["tuned_beats_base"] else "no"] for k, c in stats["tuned_vs_base"].items()]
    lines += _table(["axis", "base", "tuned", "difference", "W", "p (tuned > base)", "rank-biserial",
                     "tuned beats base"], rows)
    if "tuned_vs_supervised" in stats:
        lines += ["## Preference-tuned vs supervised", "",
                  "The same paired test, the supervised run this one continued in place of the base.", ""]
        rows = [[k, _num(c["base_mean"]), _num(c["tuned_mean"]), _num(c["mean_difference"], 3),
                 _num(c["statistic"], 1), f"{c['p_greater']:.3g}", _num(c["rank_biserial"]),
                 "**yes**" if c["tuned_beats_base"] else "no"] for k, c in stats["tuned_vs_supervised"].items()]
        lines += _table(["axis", "supervised", "tuned", "difference", "W", "p (tuned > supervised)",
                         "rank-biserial", "tuned beats supervised"], rows)
    lines += ["## Mean scores per model", ""]
    rows = [[n] + [f"{_num(stats['summary'][n][k]['mean'])} [{_num(stats['summary'][n][k]['ci_low'])}, "
                   f"{_num(stats['summary'][n][k]['ci_high'])}]" for k in KEYS] for n in names]
    lines += _table(["model", *KEYS], rows)
    lines += [f"![means]({MEANS_PNG})", "", f"![checkpoint progression]({PROGRESSION_PNG})", "",
              f"![score distributions]({DISTRIBUTIONS_PNG})", ""]
    if data["turns"]:
        lines += ["## Overall score by turn", ""]
        lines += _table(["model", *(f"turn {t + 1}" for t in range(data["turns"] + 1))],
                        [[n, *(_num(v) for v in stats["by_turn"][n]["overall"])] for n in names])
    if data["judge"]:
        judge = data["judge"]
        lines += ["## LLM judge", "", (f"Judge `{judge['model']}` at {judge['url']}; "
                  f"{judge['missing_replies']} of {judge['replies']} replies have at least one missing score."), ""]
        rows = [[n] + [f"{_num(stats['summary'][n][a]['mean'])} / {_num(stats['judge_summary'][n][a]['mean'])}"
                       for a in AXES] for n in names]
        lines += ["Mean score, scorer / judge:", "", *_table(["model", *AXES], rows)]
        rows = [[a, _num(stats["agreement"][a]["spearman"]), str(stats["agreement"][a]["n"])] for a in AXES]
        lines += ["Agreement over all replies:", "", *_table(["axis", "Spearman rho", "replies"], rows),
                  f"![judge agreement]({AGREEMENT_PNG})", ""]
    if data["skipped_checkpoints"]:
        lines += ["## Skipped checkpoints", ""]
        lines += [f"- {s['name']}: {s['reason']}" for s in data["skipped_checkpoints"]] + [""]
    lines += ["## Sample replies (first turn)", ""]
    replies = {(r["model"], r["prompt_id"]): r for r in data["replies"] if r["turn"] == 0}
    for prompt_id in list(dict.fromkeys(r["prompt_id"] for r in data["replies"]))[:5]:
        base = replies[("base", prompt_id)]
        lines += [f"**{prompt_id}** 「{_cell(base['user'])}」", ""]
        lines += _table(["model", "reply", "tone", "approach", "format", "logic"],
                        [[n, _cell(replies[(n, prompt_id)]["reply"]) or "(empty)",
                          *(_num(replies[(n, prompt_id)]["scores"][a], 1) for a in AXES)]
                         for n in ("base", "tuned")])
    lines += [("Every reply, with its scores and the scorer's explanations, is in "
              f"[{EVALUATION_JSON}]({EVALUATION_JSON})."), ""]
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationResult:
    folder: Path  # RUN/evaluation
    previous: Path | None  # where an earlier report was moved, if there was one
    data: dict[str, Any]  # the content of evaluation.json


def _publish(staged: Path, final: Path) -> Path | None:
    """Move ``staged`` to ``final``; an existing report is first renamed after its creation time."""
    previous = None
    if final.exists():
        try:
            created = json.loads((final / EVALUATION_JSON).read_text(encoding="utf-8"))["created"]
            stamp = datetime.fromisoformat(created).strftime("%Y%m%dT%H%M%S")
        except (OSError, ValueError, KeyError, TypeError):
            stamp = datetime.fromtimestamp(final.stat().st_mtime).strftime("%Y%m%dT%H%M%S")
        previous = final.with_name(f"{final.name}-{stamp}")
        suffix = 1
        while previous.exists():
            suffix += 1
            previous = final.with_name(f"{final.name}-{stamp}-{suffix}")
        os.replace(final, previous)
    os.replace(staged, final)
    return previous


def evaluate(run_dir: str | Path, *, prompts_path: str | Path | None = None, limit: int | None = None,
             checkpoints: str = "all", turns: int = 0, max_new_tokens: int = 128, batch_size: int = 8,
             seed: int = 0, profile: StyleProfile | str | Path | None = None, judge: Judge | None = None,
             judge_workers: int = 4) -> EvaluationResult:
    """Run the whole evaluation of one run directory and write its report (see the module doc).

    ``judge`` also rates every reply when given. Holds the run's lock, so it never runs beside
    training or another evaluation of the same run.
    """
    run = RunDir(run_dir)
    if not run.exists():
        raise RunDirError(f"{run.path} does not exist")
    for flag, value, least in (("--turns", turns, 0), ("--max-new-tokens", max_new_tokens, 1),
                               ("--batch-size", batch_size, 1), ("--limit", limit or 1, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}", key=flag)
    style_profile = profile if isinstance(profile, StyleProfile) else load_profile(profile or "socrates")
    prompts = load_prompts(prompts_path)[:limit]
    script = followup_script()
    params = GenParams(max_new_tokens=max_new_tokens)
    with run.lock():
        subjects, skipped = select_subjects(run, checkpoints)
        dialogues = generate_dialogues(run, subjects, prompts, turns, script, params, batch_size, seed)
        records = score_dialogues(dialogues, prompts, StyleScorer(style_profile))
        if judge is not None:
            logger.info("evaluate: the LLM judge rates %d replies", len(records))
            verdicts = judge.rate_many([(r["reply"], r["user"]) for r in records], workers=judge_workers)
            for record, verdict in zip(records, verdicts):
                record["judge"] = verdict.as_dict()
        data = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run.path),
            "prompts": {"source": str(prompts_path) if prompts_path else "bundled eval_prompts_ja.jsonl",
                        "count": len(prompts)},
            "turns": turns,
            "followup_script": script,
            "generation": {**asdict(params), "batch_size": batch_size, "seed": seed},
            "profile": style_profile.name,
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "level": CONFIDENCE, "seed": seed},
            "unit": "dialogue: the mean of its replies",
            "models": [s.as_dict() for s in subjects],
            "skipped_checkpoints": skipped,
            "judge": None if judge is None else {
                **judge.describe(), "replies": len(records),
                "missing_replies": sum(r["judge"]["error"] is not None for r in records)},
            "statistics": compute_statistics(records, subjects, seed, judge is not None),
            "replies": records,
        }
        final = run / EVALUATION_DIR
        staged = run / f".{EVALUATION_DIR}.staging"  # under the lock: ours alone; a crash leaves it
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        try:
            _plot(records, subjects, data["statistics"], staged)
            write_json_atomic(staged / EVALUATION_JSON, data)
            write_text_atomic(staged / REPORT_MD, render_report(data))
            previous = _publish(staged, final)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    if previous:
        logger.info("evaluate: the previous report was kept as %s", previous)
    return EvaluationResult(final, previous, data)
