"""The evaluation report, as pure functions over the per-reply records ``evaluate`` produces:
the statistics (bootstrap intervals, Wilcoxon signed-rank test, rank-biserial effect size,
scorer-judge agreement), the plots and ``report.md``.

Nothing here loads a model: given ``evaluation.json``'s content, a report can be redrawn or
recomputed anywhere. ``evaluate.py`` runs the models and calls into this module.

A record is ``{"model", "prompt_id", "turn", "user", "reply", "scores": {key: 0-4},
"explanations", "judge"?}``; a model entry is ``Subject.as_dict()`` of evaluate.py
(``{"name", "kind", "step", "adapter", "aliases"}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.scores import AXES, OVERALL, REPEATED_REPLY_SHARE, SCORE_KEYS, reply_variety
from ..training.plots import mark_step, save_figure

# File names inside RUN/evaluation.
REPORT_MD = "report.md"
EVALUATION_JSON = "evaluation.json"
MEANS_PNG, PROGRESSION_PNG, DISTRIBUTIONS_PNG, AGREEMENT_PNG = (
    "means.png", "progression.png", "distributions.png", "judge_agreement.png")
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
ALPHA = 0.05  # significance level of "tuned beats base"


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


def _unit_values(records: list[dict], model: str, key: str, source: str) -> dict[str, float]:
    """Per dialogue (prompt id) the mean of its replies' ``source`` ("scores"/"judge") on ``key``."""
    by_prompt: dict[str, list[float]] = {}
    for r in records:
        value = r["judge"]["scores"][key] if source == "judge" else r["scores"][key]
        if r["model"] == model and value is not None:
            by_prompt.setdefault(r["prompt_id"], []).append(value)
    return {pid: sum(v) / len(v) for pid, v in by_prompt.items()}


def compare_models(records: list[dict], tuned: str, other: str) -> dict[str, Any]:
    """Per score key, ``tuned`` vs ``other`` on their shared dialogues: both means and the paired
    test (``base_mean`` holds ``other``'s mean, so every comparison has the shape of tuned vs base)."""
    comparison = {}
    for key in SCORE_KEYS:
        mine, theirs = _unit_values(records, tuned, key, "scores"), _unit_values(records, other, key, "scores")
        shared = sorted(mine.keys() & theirs.keys())
        comparison[key] = {"base_mean": _mean([theirs[p] for p in shared]),
                           "tuned_mean": _mean([mine[p] for p in shared]),
                           **paired_comparison([mine[p] for p in shared], [theirs[p] for p in shared])}
    return comparison


def variety(records: list[dict], model: str) -> dict[str, Any]:
    """How many of ``model``'s replies differ (ignoring surrounding white space), and its most
    common reply with its count: a high score earned by one reply for every prompt is a reward
    hacked, not a better model."""
    found = reply_variety([r["reply"] for r in records if r["model"] == model])
    return {"replies": found.replies, "distinct": found.distinct, "most_common": found.most_common,
            "most_common_count": found.most_common_count, "most_common_share": found.most_common_share}


def repeated_reply_warnings(stats: dict[str, Any]) -> list[str]:
    """One line per model whose most common reply exceeds REPEATED_REPLY_SHARE of its replies."""
    return [f"{name} gives the same reply to {v['most_common_count']} of {v['replies']} prompts "
            f"({v['most_common_share']:.0%}): 「{_cell(v['most_common'], 60)}」; its scores may come from one reply "
            "the scorer likes, not from answering the prompts"
            for name, v in stats.get("variety", {}).items()
            if v["replies"] >= 10 and v["most_common_share"] > REPEATED_REPLY_SHARE]


def compute_statistics(records: list[dict], names: list[str], seed: int, judged: bool) -> dict[str, Any]:
    """Every aggregate number of the report, from the per-reply records of the models ``names``."""
    summary = {m: {k: describe(list(_unit_values(records, m, k, "scores").values()), seed) for k in SCORE_KEYS}
               for m in names}
    turns = max((r["turn"] for r in records), default=0) + 1
    by_turn = {m: {k: [_mean([r["scores"][k] for r in records if r["model"] == m and r["turn"] == t])
                       for t in range(turns)] for k in SCORE_KEYS} for m in names}
    stats: dict[str, Any] = {"summary": summary, "by_turn": by_turn,
                             "variety": {m: variety(records, m) for m in names},
                             "tuned_vs_base": compare_models(records, "tuned", "base")}
    if "supervised" in names:  # a preference-tuned run against the supervised run it continued
        stats["tuned_vs_supervised"] = compare_models(records, "tuned", "supervised")
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


def model_label(model: dict[str, Any]) -> str:
    """A model's name with the names of identical weights: ``tuned (= checkpoint-120)``."""
    aliases = model.get("aliases") or []
    return f"{model['name']} (= {', '.join(aliases)})" if aliases else model["name"]


def plot_report(records: list[dict], models: list[dict[str, Any]], stats: dict[str, Any], folder: Path,
                run_name: str = "", selected_step: int | None = None) -> list[str]:
    """Means with intervals, checkpoint progression, distributions (and judge agreement), titled
    with ``run_name``; the progression marks ``selected_step`` (the final adapter's step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m["name"] for m in models]
    title = f"{run_name}: " if run_name else ""
    summary = stats["summary"]
    written = [_plot_means(plt, models, summary, folder, title),
               _plot_progression(plt, models, summary, folder, title, selected_step),
               _plot_distributions(plt, records, names, folder, title)]
    if "agreement" in stats:
        written.append(_plot_agreement(plt, records, stats, folder, title))
    return written


def _plot_means(plt: Any, models: list[dict[str, Any]], summary: dict[str, Any], folder: Path, title: str) -> str:
    """Mean style score per model and axis, with bootstrap intervals."""
    names = [m["name"] for m in models]
    figure, axes = plt.subplots(figsize=(max(7.0, 0.25 * len(SCORE_KEYS) * len(names) + 4), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(SCORE_KEYS))]
        means = [summary[name][k]["mean"] or 0 for k in SCORE_KEYS]
        errors = [[m - (summary[name][k]["ci_low"] or m) for m, k in zip(means, SCORE_KEYS)],
                  [(summary[name][k]["ci_high"] or m) - m for m, k in zip(means, SCORE_KEYS)]]
        axes.bar(xs, means, width, yerr=errors, capsize=2, label=model_label(models[i]))
    axes.set_xticks(range(len(SCORE_KEYS)), SCORE_KEYS)
    axes.set_ylim(0, 4.2)
    axes.set_ylabel("mean style score (0-4), 95% bootstrap CI")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(f"{title}mean style score per model")
    save_figure(figure, folder / MEANS_PNG)
    plt.close(figure)
    return MEANS_PNG


def _plot_progression(plt: Any, models: list[dict[str, Any]], summary: dict[str, Any], folder: Path, title: str,
                      selected_step: int | None) -> str:
    """Style score by training step; the final adapter a star, ``selected_step`` marked."""
    # Base (step 0) and the checkpoints form the line; the final adapter is a star at its step.
    # When it has the weights of a checkpoint (listed as its alias) it is that point of the line.
    figure, axes = plt.subplots(figsize=(7, 4.5))
    tuned = next(m for m in models if m["kind"] == "tuned")
    line = sorted((m for m in models if m["kind"] == "base" or m["kind"] == "checkpoint"
                   or (m["kind"] == "tuned" and m.get("aliases"))),  # supervised: another run's steps
                  key=lambda m: m["step"] or 0)
    steps = [m["step"] or 0 for m in line]
    tuned_step = tuned["step"] if tuned["step"] is not None else steps[-1] + 1
    for key in SCORE_KEYS:
        drawn = axes.plot(steps, [summary[m["name"]][key]["mean"] for m in line], marker="o", label=key,
                          linewidth=2.5 if key == OVERALL else 1.5)[0]
        axes.fill_between(steps, [summary[m["name"]][key]["ci_low"] for m in line],
                          [summary[m["name"]][key]["ci_high"] for m in line], color=drawn.get_color(), alpha=0.12)
        axes.plot([tuned_step], [summary[tuned["name"]][key]["mean"]], marker="*", markersize=13, linestyle="",
                  color=drawn.get_color())
    mark_step(axes, selected_step, "final adapter")
    axes.set_xlabel("training step (step 0 = untuned base; ★ = final adapter)")
    axes.set_ylabel("mean style score (0-4)")
    axes.set_ylim(0, 4.2)
    axes.set_title(f"{title}style score by training step")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save_figure(figure, folder / PROGRESSION_PNG)
    plt.close(figure)
    return PROGRESSION_PNG


def _plot_distributions(plt: Any, records: list[dict], names: list[str], folder: Path, title: str) -> str:
    """Each axis's scores per reply, one box per model."""
    figure, grid = plt.subplots(1, len(SCORE_KEYS), figsize=(3.2 * len(SCORE_KEYS), 4), sharey=True)
    for axes, key in zip(grid, SCORE_KEYS):
        axes.boxplot([[r["scores"][key] for r in records if r["model"] == n] for n in names], showmeans=True)
        axes.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right", fontsize=8)
        axes.set_title(f"{title}{key}" if key == SCORE_KEYS[0] else key)
        axes.set_ylim(-0.1, 4.1)
        axes.grid(axis="y", alpha=0.3)
    grid[0].set_ylabel("style score per reply (0-4)")
    save_figure(figure, folder / DISTRIBUTIONS_PNG)
    plt.close(figure)
    return DISTRIBUTIONS_PNG


def _plot_agreement(plt: Any, records: list[dict], stats: dict[str, Any], folder: Path, title: str) -> str:
    """The scorer against the LLM judge, one scatter per axis."""
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
    figure.suptitle(f"{title}style scorer vs LLM judge")
    save_figure(figure, folder / AGREEMENT_PNG)
    plt.close(figure)
    return AGREEMENT_PNG


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
                  "The same paired test, with the supervised run this one continued in place of the base.", ""]
        rows = [[k, _num(c["base_mean"]), _num(c["tuned_mean"]), _num(c["mean_difference"], 3),
                 _num(c["statistic"], 1), f"{c['p_greater']:.3g}", _num(c["rank_biserial"]),
                 "**yes**" if c["tuned_beats_base"] else "no"] for k, c in stats["tuned_vs_supervised"].items()]
        lines += _table(["axis", "supervised", "tuned", "difference", "W", "p (tuned > supervised)",
                         "rank-biserial", "tuned beats supervised"], rows)
    lines += ["## Mean scores per model", "", ("One row per distinct model: checkpoints with the same weights as "
              "another model are listed beside it (=), not evaluated twice."), ""]
    labels = {m["name"]: model_label(m) for m in data["models"]}
    rows = [[labels[n]] + [f"{_num(stats['summary'][n][k]['mean'])} [{_num(stats['summary'][n][k]['ci_low'])}, "
                   f"{_num(stats['summary'][n][k]['ci_high'])}]" for k in SCORE_KEYS] for n in names]
    lines += _table(["model", *SCORE_KEYS], rows)
    if "variety" in stats:  # reports written before it was added have none
        lines += ["Distinct replies per model (a model that answers every prompt alike scores as its one "
                  "reply does):", ""]
        lines += _table(["model", "replies", "distinct", "most common reply", "given"],
                        [[labels[n], str(v["replies"]), str(v["distinct"]), _cell(v["most_common"], 60),
                          f"{v['most_common_count']} ({v['most_common_share']:.0%})"]
                         for n, v in stats["variety"].items()])
        warnings = repeated_reply_warnings(stats)
        lines += [f"- **Warning:** {w}." for w in warnings] + ([""] if warnings else [])
    lines += [f"![means]({MEANS_PNG})", "", f"![checkpoint progression]({PROGRESSION_PNG})", "",
              f"![score distributions]({DISTRIBUTIONS_PNG})", ""]
    if data["turns"]:
        lines += ["## Overall score by turn", ""]
        lines += _table(["model", *(f"turn {t + 1}" for t in range(data["turns"] + 1))],
                        [[n, *(_num(v) for v in stats["by_turn"][n][OVERALL])] for n in names])
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
        lines += _table(["model", "reply", *AXES],
                        [[n, _cell(replies[(n, prompt_id)]["reply"]) or "(empty)",
                          *(_num(replies[(n, prompt_id)]["scores"][a], 1) for a in AXES)]
                         for n in ("base", "tuned")])
    lines += [("Every reply, with its scores and the scorer's explanations, is in "
              f"[{EVALUATION_JSON}]({EVALUATION_JSON})."), ""]
    return "\n".join(lines)
