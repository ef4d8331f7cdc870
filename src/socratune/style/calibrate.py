"""Fit a profile's combination weights to an external judge's ratings (``socratune calibrate``).

Input: JSON Lines ``{"id", "prompt", "text", "judge": {"tone": x, "approach": x, ...}}`` with
ratings on the 0-4 scale (``evaluate --judge`` writes exactly this as ``judged.jsonl``; a rating
may be null or left out, and the row then only skips that axis). Each reply's features are
computed once; per axis the weights are fitted by bounded least squares (scipy's
``lsq_linear``) with each weight held to its feature's sign and a ridge pull toward the starting
profile's weights, so a small or lopsided set cannot turn a rule upside down and a feature the
set never shows keeps its prior weight. scipy is already a dependency (evaluate's statistics)
and the bounded solver is what sign constraints need; scikit-learn would add a dependency
for no gain here.

Honesty: the calibrated Spearman figures are k-fold cross-validated, folds grouped by dialogue
(the id up to ``#``) so replies of one conversation never sit on both sides: weights fitted on
k-1 folds are scored on the held-out fold, and rho is averaged over folds. The starting profile
is scored on the very same held-out folds, so the two columns compare like with like (pooling
held-out scores of different fits would rank ties between fits by accident). Layer 0: no torch or transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import ConfigError, DataError, quote_capped
from ..core.rundir import write_text_atomic
from ..core.scores import AXES
from ..data.dialogues import check_output_file, jsonl_lines, read_text_file
from .profile import FEATURES, Calibration, StyleProfile
from .scorer import StyleScorer, combine, reply_line_problem

MIN_ROWS = 20  # fewer ratings than this cannot say anything a fold could check
DEFAULT_FOLDS = 5
RIDGE = 4.0  # pull toward the starting weights and intercept, in rows of evidence each
# A refit that ranks the held-out folds worse than the starting weights by more than this keeps
# the starting weights; within it, the refit is shipped, so what the judge plainly ignores (a
# feature whose weight the data drives to 0) is learnt even where rank agreement barely moves.
KEEP_MARGIN = 0.02
JUDGED_JSONL = "judged.jsonl"


@dataclass(frozen=True)
class JudgedRow:
    id: str
    prompt: str | None
    text: str
    judge: dict[str, float | None]

    @property
    def group(self) -> str:
        """The dialogue a reply belongs to (its id up to '#'): folds never split one."""
        return self.id.split("#", 1)[0]


@dataclass(frozen=True)
class CalibrationResult:
    profile: StyleProfile
    rows: int
    rows_per_axis: dict[str, int]
    cv_spearman: dict[str, float | None]  # fitted on k-1 folds, mean rho on the held-out one
    uncalibrated_cv_spearman: dict[str, float | None]  # the starting profile on the same held-out folds
    uncalibrated_spearman: dict[str, float | None]  # the starting profile on all rows
    folds: int
    kept_axes: list[str]  # axes where refitting ranked clearly worse held out (or too few ratings)


def _row_problem(item: Any) -> str | None:
    if problem := reply_line_problem(item):  # a judged row is a scored reply plus its ratings
        return problem
    if not isinstance(item.get("id", ""), (str, int)):
        return "'id' must be a string or a number"
    judge = item.get("judge")
    if not isinstance(judge, dict):
        return "missing 'judge'" if "judge" not in item else "'judge' must be an object of ratings"
    for key, value in judge.items():
        if key not in AXES:
            return f"unknown axis 'judge.{quote_capped(key)[1:-1]}'; allowed: {', '.join(AXES)}"
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 4):
            return f"'judge.{quote_capped(key)[1:-1]}' must be a number from 0 to 4 or null, got {quote_capped(value)}"
    if all(judge.get(axis) is None for axis in AXES):
        return f"'judge' has no rating (expected some of {', '.join(AXES)})"
    return None


def read_judged(path: Path) -> list[JudgedRow]:
    """Rows of a judged JSONL file; any malformed line is an error naming FILE:LINE."""
    text = read_text_file(path, "judged file")  # missing, a directory, a FIFO, not UTF-8: one line naming it
    rows, bad = [], []
    for number, item, problem in jsonl_lines(text):
        if problem := problem or _row_problem(item):
            bad.append(f"{path}:{number}: {problem}")
            continue
        rows.append(JudgedRow(str(item.get("id", number)), item.get("prompt"), item["text"],
                              {axis: None if item["judge"].get(axis) is None else float(item["judge"][axis])
                               for axis in AXES}))
    if bad:
        more = f"\n(and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError("\n".join(bad[:5]) + more + "\nfix these lines; each needs "
                        '{"id", "prompt", "text", "judge": {"tone": 0-4, ...}}', rejections=bad)
    return rows


def spearman(scores: list[float], ratings: list[float]) -> float | None:
    """Spearman's rho, or None when either side is constant (rho is undefined then)."""
    from scipy.stats import spearmanr

    if len(set(scores)) < 2 or len(set(ratings)) < 2:
        return None
    rho = float(spearmanr(scores, ratings).statistic)
    return None if math.isnan(rho) else round(rho, 4)


def _fit_axis(features: list[dict[str, float]], ratings: list[float], prior: tuple[float, dict[str, float]],
              axis: str, ridge: float) -> tuple[float, dict[str, float]]:
    """Intercept and weights: bounded least squares plus a ridge pull toward ``prior``."""
    import numpy as np
    from scipy.optimize import lsq_linear

    names = list(FEATURES[axis])
    x = np.array([[1.0] + [f.get(n, 0.0) for n in names] for f in features])
    y = np.array(ratings)
    intercept0, weights0 = prior
    start = np.array([intercept0] + [weights0.get(n, 0.0) for n in names])
    # Ridge rows: sqrt(ridge) * s * (w - w0) = 0 for every weight and the intercept. s is the
    # square root of the feature's mean value where it is present (at least 0.5): a feature that
    # is usually 0.5 when it fires (one run of spaces) is held half as hard as a 0-or-1 one, so
    # the points it costs, not its raw weight, meet the prior. (The full mean, s = 0.5 there,
    # let trace features overfit: dev-half held-out format fell 0.80 -> 0.74.)
    present = [x[:, j][x[:, j] > 0] for j in range(1, len(names) + 1)]
    scale = np.array([1.0] + [max(0.5, float(v.mean()) ** 0.5) if v.size else 1.0 for v in present])
    pull = math.sqrt(ridge) * np.diag(scale)
    a = np.vstack([x, pull])
    b = np.concatenate([y, pull @ start])
    lower = [-8.0] + [0.0 if FEATURES[axis][n] > 0 else -np.inf for n in names]
    upper = [8.0] + [np.inf if FEATURES[axis][n] > 0 else 0.0 for n in names]
    solution = lsq_linear(a, b, bounds=(lower, upper)).x
    return round(float(solution[0]), 4), {n: round(float(w), 4) for n, w in zip(names, solution[1:])}


def _with_weights(profile: StyleProfile, fitted: dict[str, tuple[float, dict[str, float]]]) -> StyleProfile:
    data = profile.model_dump(exclude_none=True)
    for axis, (intercept, weights) in fitted.items():
        data["combine"][axis] = {"intercept": intercept, "weights": weights}
    return StyleProfile.model_validate(data)


def _folds(rows: list[JudgedRow], k: int, seed: int) -> list[int]:
    """A fold number per row; all replies of one dialogue share a fold."""
    groups = sorted({r.group for r in rows})
    random.Random(seed).shuffle(groups)
    fold_of = {g: i % k for i, g in enumerate(groups)}
    return [fold_of[r.group] for r in rows]


@dataclass
class _AxisFit:
    weights: tuple[float, dict[str, float]]
    cv: float | None = None  # refitted on k-1 folds, mean rho on the held-out ones
    before_cv: float | None = None  # the starting weights on the same held-out folds
    kept: bool = False


def _fit_and_check(feats: list[dict[str, float]], ratings: list[float], fold: list[int], k: int,
                   profile: StyleProfile, axis: str, ridge: float) -> _AxisFit:
    """Cross-validate a refit of one axis, then fit it on every row unless it did clearly worse."""
    model = getattr(profile.combine, axis)
    prior = (model.intercept, dict(model.weights))
    if len(ratings) < MIN_ROWS:
        return _AxisFit(prior, kept=True)  # too few ratings: keep the prior
    calibrated_rho, uncalibrated_rho = [], []
    for f in range(k):
        train = [j for j in range(len(ratings)) if fold[j] != f]
        test = [j for j in range(len(ratings)) if fold[j] == f]
        if not test or not train:
            continue
        part = _with_weights(profile, {axis: _fit_axis([feats[j] for j in train], [ratings[j] for j in train],
                                                       prior, axis, ridge)})
        truth = [ratings[j] for j in test]
        calibrated_rho.append(spearman([combine(part, axis, feats[j]) if feats[j] else 0.0 for j in test], truth))
        uncalibrated_rho.append(spearman([combine(profile, axis, feats[j]) if feats[j] else 0.0 for j in test], truth))
    # Folds where either rho is undefined (constant ratings or scores) are left out of both means.
    pairs = [(c, u) for c, u in zip(calibrated_rho, uncalibrated_rho) if c is not None and u is not None]
    cv = round(sum(c for c, _ in pairs) / len(pairs), 4) if pairs else None
    before_cv = round(sum(u for _, u in pairs) / len(pairs), 4) if pairs else None
    if cv is None or before_cv is None or cv < before_cv - KEEP_MARGIN:
        # The refit ranks clearly worse held out than the starting weights (or the folds cannot
        # tell: constant ratings): keep those, rather than ship weights that only fit these rows.
        return _AxisFit(prior, cv, before_cv, kept=True)
    return _AxisFit(_fit_axis(feats, ratings, prior, axis, ridge), cv, before_cv)


def calibrate(rows: list[JudgedRow], profile: StyleProfile, *, folds: int = DEFAULT_FOLDS, seed: int = 0,
              source: str = "(rows)", source_sha256: str = "", ridge: float = RIDGE) -> CalibrationResult:
    """Fit ``profile``'s combination weights to ``rows``; report k-fold CV Spearman per axis.

    Every feature of an axis is refitted (sign held), so a judge that ignores what a feature
    measures (a 「…」 wrapper, runs of spaces) drives its weight to 0. An axis keeps the starting
    weights when it has fewer than MIN_ROWS ratings or when the refitted weights rank the
    held-out folds worse than the starting ones by more than KEEP_MARGIN (or rho is undefined
    there, as with ratings that are all the same)."""
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}", key="--folds")
    if len(rows) < MIN_ROWS:
        raise DataError(f"{source}: {len(rows)} judged repl{'y' if len(rows) == 1 else 'ies'}; calibrate needs "
                        f"at least {MIN_ROWS} to fit and cross-validate weights (judge more replies)")
    groups = len({r.group for r in rows})
    k = max(2, min(folds, groups))
    if groups < 2:
        raise DataError(f"{source}: every row belongs to one dialogue ('{rows[0].group}'); cross-validation "
                        "needs replies from at least two (ids like DIALOGUE#TURN)")
    scorer = StyleScorer(profile)
    features = [scorer.score(r.text, r.prompt).features for r in rows]
    fold = _folds(rows, k, seed)
    fits: dict[str, _AxisFit] = {}
    before: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for axis in AXES:
        idx = [i for i, r in enumerate(rows) if r.judge[axis] is not None]
        counts[axis] = len(idx)
        ratings = [rows[i].judge[axis] for i in idx]
        feats = [features[i].get(axis, {}) for i in idx]
        before[axis] = spearman([combine(profile, axis, f) if f else 0.0 for f in feats], ratings)
        fits[axis] = _fit_and_check(feats, ratings, [fold[i] for i in idx], k, profile, axis, ridge)
    calibrated = _with_weights(profile, {axis: fit.weights for axis, fit in fits.items()})
    cv = {axis: fit.cv for axis, fit in fits.items()}
    before_cv = {axis: fit.before_cv for axis, fit in fits.items()}
    kept = [axis for axis, fit in fits.items() if fit.kept]
    record = Calibration(file=Path(source).name, sha256=source_sha256, rows=len(rows), rows_per_axis=counts,
                         date=datetime.now(timezone.utc).replace(microsecond=0), folds=k,
                         method=f"scipy lsq_linear on every feature, signs held, ridge {ridge} toward "
                                f"{profile.name}; {k}-fold CV grouped by dialogue, seed {seed}",
                         cv_spearman=cv, uncalibrated_cv_spearman=before_cv, uncalibrated_spearman=before,
                         kept_axes=kept, base_profile=profile.name)
    data = calibrated.model_dump(exclude_none=True)
    data["calibration"] = record.model_dump()
    data["description"] = (f"{profile.description} Combination weights calibrated on {record.file} "
                           f"({len(rows)} judged replies).").strip()
    return CalibrationResult(StyleProfile.model_validate(data), len(rows), counts, cv, before_cv, before, k, kept)


def calibrate_file(judged_path: Path, profile: StyleProfile, output: Path, *, folds: int = DEFAULT_FOLDS,
                   seed: int = 0, ridge: float = RIDGE) -> CalibrationResult:
    """The ``socratune calibrate`` back end: read, fit, write ``output`` (never over an existing file)."""
    judged_path, output = Path(judged_path), Path(output)
    if output.exists() or output.is_symlink():
        raise DataError(f"{output} already exists; choose another --output or remove it first")
    check_output_file(output, "--output", DataError)  # found now, not after the fit
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}", key="--folds")
    rows = read_judged(judged_path)
    digest = hashlib.sha256(judged_path.read_bytes()).hexdigest()
    result = calibrate(rows, profile, folds=folds, seed=seed, source=str(judged_path), source_sha256=digest,
                       ridge=ridge)
    write_profile(result.profile, output)
    return result


def format_calibration(result: CalibrationResult, output: str | Path) -> str:
    """The terminal summary: held-out Spearman per axis, starting profile beside calibrated."""
    rows = [(f"calibrated on {result.rows} judged replies; Spearman with the judge, mean over "
             f"{result.folds} held-out folds (grouped by dialogue)"),
            f"{'axis':<10}{'ratings':>8}{'uncalibrated':>14}{'calibrated':>12}"]
    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for axis in AXES:
        note = "" if axis not in result.kept_axes else (
            f"  (fewer than {MIN_ROWS} ratings: weights kept)" if result.rows_per_axis[axis] < MIN_ROWS
            else f"  (worse held out by over {KEEP_MARGIN}: starting weights kept)")
        rows.append(f"{axis:<10}{result.rows_per_axis[axis]:>8}{show(result.uncalibrated_cv_spearman[axis]):>14}"
                    f"{show(result.cv_spearman[axis]):>12}{note}")
    rows.append(f"wrote {output}; use it with --profile {output} (score, evaluate) or style.profile (train)")
    return "\n".join(rows)


def write_profile(profile: StyleProfile, path: Path) -> None:
    """A profile as YAML that ``load_profile`` reads back to the same profile."""
    header = ("# Style profile written by `socratune calibrate`; see `calibration` at the end for what\n"
              "# its combination weights were fitted on. Load it with --profile or style.profile.\n")
    body = yaml.safe_dump(profile.model_dump(exclude_none=True), allow_unicode=True,
                          sort_keys=False, width=120)
    write_text_atomic(Path(path), header + body)


def judged_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``evaluate`` reply records with a judge verdict, as calibrate's input lines: the id is
    MODEL/PROMPT_ID#TURN so that folds group each generated dialogue."""
    out = []
    for r in records:
        scores = (r.get("judge") or {}).get("scores") or {}
        if any(scores.get(axis) is not None for axis in AXES):
            out.append({"id": f"{r['model']}/{r['prompt_id']}#{r['turn']}", "prompt": r["user"], "text": r["reply"],
                        "judge": {axis: scores.get(axis) for axis in AXES}})
    return out


def write_judged_jsonl(records: list[dict[str, Any]], path: Path) -> int:
    """Write the judged replies of ``evaluate`` records as calibrate's JSONL; returns how many."""
    lines = judged_records(records)
    write_text_atomic(Path(path), "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return len(lines)
