"""Which step's weights become the final model (``train.select``), decided from the evaluations
in the Trainer's log history (which ``trainer_state.json`` keeps, so resumes see all of them).

* ``best_eval_loss`` (default): the evaluated step with the lowest eval loss. Eval loss is
  measured on every eval dialogue with teacher forcing, so it is the least noisy signal a run
  has; on a small data set the last step is often overfitted.
* ``best_style``: the evaluated step with the highest ``eval_style_overall``. The style score is
  the mean over only ``style.eval_samples`` generated replies: noisy, especially on ``tiny``.
* ``last``: the weights at the last step, as before selection existed.

Early stopping (``train.early_stopping_patience``) watches the same metric: the run ends at the
evaluation that makes ``patience`` evaluations in a row without a new best. It is decided from
the log history alone, like selection, so a resumed run reaches the same decision at the same
step as an uninterrupted one.

Step 0 (the untuned base, evaluated before the first optimizer step) is never selected: it has
no adapter to save. Only steps that still have a checkpoint on disk, or the last step (its
weights are in memory), can be chosen; ``BestCheckpointCallback`` (callbacks.py) saves a
checkpoint at every new best and rotation keeps it. Pure functions: no torch, no files.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..core.scores import OVERALL, style_metric

SelectBy = Literal["best_eval_loss", "best_style", "last"]
SELECT_CHOICES: tuple[str, ...] = ("best_eval_loss", "best_style", "last")
# metric in the log history, and whether lower is better
SELECTION_METRIC = {"best_eval_loss": ("eval_loss", True), "best_style": (style_metric(OVERALL), False)}
# The closing message warns when the last evaluation's loss is this much above the best one.
LAST_WORSE_RATIO = 1.05


@dataclass(frozen=True)
class Selected:
    """The step whose weights are the final adapter, and why (``training_summary.json["selected"]``)."""

    step: int
    by: str
    eval_loss: float | None
    style_overall: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluations(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation entries of a log history, one per step (a resumed run may repeat a step:
    the later entry wins)."""
    by_step = {e["step"]: e for e in log_history if "eval_loss" in e}
    return [by_step[s] for s in sorted(by_step)]


def best_evaluation(log_history: list[dict[str, Any]], by: str,
                    allowed_steps: Collection[int] | None = None) -> dict[str, Any] | None:
    """The evaluation entry that ``by`` prefers (earliest on ties), among trained steps (> 0) in
    ``allowed_steps`` when given; None when no entry has the metric, or for ``last``."""
    if by not in SELECTION_METRIC:
        return None
    metric, lower_is_better = SELECTION_METRIC[by]
    candidates = [e for e in evaluations(log_history) if e["step"] > 0 and e.get(metric) is not None
                  and (allowed_steps is None or e["step"] in allowed_steps)]
    if not candidates:
        return None
    sign = 1 if lower_is_better else -1
    return min(candidates, key=lambda e: (sign * e[metric], e["step"]))


def is_new_best(log_history: list[dict[str, Any]], by: str, step: int) -> bool:
    """Whether the evaluation just logged at ``step`` is the best so far by ``by``."""
    best = best_evaluation(log_history, by)
    return best is not None and best["step"] == step


def select_step(log_history: list[dict[str, Any]], by: str, last_step: int,
                checkpoint_steps: Collection[int]) -> Selected:
    """The step to take the final adapter from: the best evaluated step that still has its
    weights (a checkpoint, or the last step), else the last step."""
    at_step = {e["step"]: e for e in evaluations(log_history)}
    best = best_evaluation(log_history, by, {*checkpoint_steps, last_step})
    chosen = best if best is not None else at_step.get(last_step, {"step": last_step})
    return Selected(step=chosen["step"], by=by if best is not None else "last",
                    eval_loss=chosen.get("eval_loss"), style_overall=chosen.get(style_metric(OVERALL)))


@dataclass(frozen=True)
class EarlyStop:
    """Why a run ended before its last planned step (``training_summary.json["stopped_early"]``)."""

    step: int  # the evaluation that ended the run
    best_step: int  # the best evaluation by ``by`` before it
    patience: int
    by: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def early_stop(log_history: list[dict[str, Any]], by: str, patience: int | None) -> EarlyStop | None:
    """An EarlyStop when the latest evaluation is the ``patience``-th in a row after the best one by
    ``by`` (trained steps only: step 0 is never a best); None while the run should go on, or when
    ``by`` names no metric or no patience is set."""
    if patience is None or by not in SELECTION_METRIC:
        return None
    metric = SELECTION_METRIC[by][0]
    measured = [e["step"] for e in evaluations(log_history) if e["step"] > 0 and e.get(metric) is not None]
    best = best_evaluation(log_history, by)
    if best is None or not measured:
        return None
    since_best = sum(step > best["step"] for step in measured)
    if since_best < patience:
        return None
    return EarlyStop(step=measured[-1], best_step=best["step"], patience=patience, by=by)


def describe_end(summary: dict[str, Any]) -> str | None:
    """The closing line that says why the run ended, when it ended before its planned last step."""
    stopped = summary.get("stopped_early")
    if not stopped:
        return None
    metric = "eval loss" if stopped["by"] == "best_eval_loss" else "style score"
    times = "evaluation" if stopped["patience"] == 1 else "evaluations"
    return (f"stopped early at step {stopped['step']} of {summary.get('total_steps')}: the {metric} had not "
            f"improved on step {stopped['best_step']}'s for {stopped['patience']} {times} "
            f"(train.early_stopping_patience: {stopped['patience']})")


def last_is_clearly_worse(summary: dict[str, Any]) -> bool:
    """Whether the last evaluation's loss is more than ``LAST_WORSE_RATIO`` times the best."""
    best, final = summary.get("eval_loss_best"), summary.get("eval_loss_final")
    return best is not None and final is not None and final > best * LAST_WORSE_RATIO


def describe_selection(summary: dict[str, Any]) -> list[str]:
    """The closing lines about the final adapter: the step chosen, and a warning when its eval
    loss is clearly above the run's best (or a note when the best step was kept because the
    last one is clearly worse)."""
    selected = summary.get("selected")
    if not selected:
        return []
    numbers = ", ".join(f"{name} {value:.4g}" for name, value in (("eval loss", selected["eval_loss"]),
                        ("style", selected["style_overall"])) if value is not None)
    lines = [f"final adapter: the weights of step {selected['step']} of {summary.get('global_step')} "
             f"(train.select: {selected['by']}{'; ' + numbers if numbers else ''})"]
    best, best_step, chosen = summary.get("eval_loss_best"), summary.get("eval_loss_best_step"), selected["eval_loss"]
    if best is not None and chosen is not None and chosen > best * LAST_WORSE_RATIO:
        if summary.get("method") in ("dpo", "orpo"):  # a preference run keeps its last step (docs/selection.md)
            advice = ("a preference run keeps its last step: a larger prefs.beta or prefs.sft_weight, or fewer "
                      "epochs, drift less")
        elif selected["by"] == "best_style":
            advice = "chosen for its style score"
        else:
            advice = "train.select: best_eval_loss keeps the best step"
        lines.append(f"warning: the eval loss at step {selected['step']}, {chosen:.4g}, is "
                     f"{100 * (chosen / best - 1):.0f}% above the best, {best:.4g} at step {best_step}: "
                     f"the model overfits; {advice}")
    elif last_is_clearly_worse(summary):
        final = summary["eval_loss_final"]
        lines.append(f"note: the last eval loss {final:.4g} is {100 * (final / best - 1):.0f}% above the best "
                     f"{best:.4g}: later steps overfit, so the final adapter is step {selected['step']}'s")
    return lines
