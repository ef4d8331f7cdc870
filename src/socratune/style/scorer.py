"""Style scorer: how Socratic a reply sounds, whether it asks, how clean and how coherent it is.

Each reply gets scores in [0, 4] on four axes (tone, approach, format, logic), a weighted
overall score and readable evidence (what was detected in which sentence, and which
measurement cost which axis how many points). Scoring has two steps, kept apart so that the
second can be refitted to a user's own judge:

1. **Measurements** (code, one module per axis or family: ``format``, ``tone``, ``approach``,
   ``logic`` with ``grammar``, all reading ``morphology``): per axis a handful of general
   features in [0, 1] -- the share of sentences with a Socratic ending, the share of polite
   text, whether and how much the reply asks, lecturing markers, format breakers, loops,
   unknown words, garbled characters, broken grammar, fit to the prompt.
   ``profile.FEATURES`` lists them with the sign each may take. Every rule that costs points
   is such a feature: none is a fixed deduction.
2. **Combination** (data, the profile's ``combine`` section): axis = clip(intercept + sum of
   weight * feature, 0, 4). ``socratune calibrate`` fits these weights to judge ratings
   (``calibrate.py``), so a judge that ignores a wrapper teaches a weight of about 0; the
   shipped weights are round numbers set by reading the rubric and checked against the
   judged development half.

Why few features: a rule per observed reply fits its author's ratings and not an external
judge's (style v1 reached 0.72 tone on the replies it was tuned on and 0.45 on unseen ones). A
reply wrapped whole in 「…」 or {{…}} (Gemma does this) is unwrapped before analysis, so it is
read as the model's own speech; the wrapping itself is a format feature (``wrapped`` for
quotes, ``braces`` for a template's braces). Layer 0: no torch or transformers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import DataError
from ..core.rundir import write_text_atomic
from ..core.scores import AXES, SCORE_KEYS
from ..data.dialogues import jsonl_lines, read_text_file
from .approach import approach_features, asking
from .format import GARBLED, format_features, stray_kanji, unwrap
from .logic import logic_features
from .morphology import compile_markers, split_sentences, tokenizer
from .profile import DEFAULT_PROFILE, StyleProfile, load_profile
from .tone import tone_features

__all__ = ["StyleScore", "StyleScorer", "combine", "format_summary_table", "reply_line_problem", "score_jsonl",
           "score_replies", "summarize", "unwrap"]


@dataclass(frozen=True)
class StyleScore:
    """Scores in [0, 4] per axis, the evidence, and the features the scores were combined from."""

    tone: float
    approach: float
    format: float
    logic: float
    overall: float
    explanations: list[str]
    features: dict[str, dict[str, float]] = field(default_factory=dict, compare=False)

    def axes(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in SCORE_KEYS}


def _clip(x: float) -> float:
    return round(min(4.0, max(0.0, x)), 4)


def combine(profile: StyleProfile, axis: str, features: dict[str, float]) -> float:
    """The axis score from its features with the profile's weights (a feature not weighted adds 0)."""
    model = getattr(profile.combine, axis)
    return _clip(model.intercept + sum(w * features.get(name, 0.0) for name, w in model.weights.items()))


class StyleScorer:
    """Scores replies against one profile; construct once and reuse (rules are precompiled)."""

    def __init__(self, profile: StyleProfile | None = None):
        self.profile = p = profile or load_profile(DEFAULT_PROFILE)
        self._endings, self._polite = compile_markers(p.tone.endings), compile_markers(p.tone.polite)
        self._address, self._questions = compile_markers(p.tone.address), compile_markers(p.approach.question_endings)
        self._invites, self._lecturing = compile_markers(p.approach.invitations), compile_markers(p.approach.lecturing)
        self._requests = compile_markers(p.approach.requests.endings)
        self._request_verbs = frozenset(p.approach.requests.verbs)
        self._answers = compile_markers(p.approach.answer_giving)
        self._suggestions = compile_markers(p.approach.suggestions)
        # "(?!)" never matches: a profile may list no special tokens.
        self._special = re.compile("|".join(f"(?:{s})" for s in p.format.special_tokens or ["(?!)"]))
        self._content_pos = [tuple(x.split(",")) for x in p.logic.content_pos]
        self._stop = frozenset(p.logic.stop_lemmas)
        tokenizer()  # load the dictionary now rather than inside the first score() call

    def features(self, text: str, prompt: str | None = None) -> tuple[dict[str, dict[str, float]], list[str]]:
        """Every axis's features in [0, 1] and the evidence; empty features for an empty reply."""
        if not text.strip():
            return {}, ["empty reply"]
        notes: list[str] = []
        feats: dict[str, dict[str, float]] = {}
        feats["format"], clean = format_features(self, text, notes)
        sentences = split_sentences(clean)
        if not sentences:
            notes.append("no words left once markup and special tokens are removed")
            return {"format": feats["format"]}, notes
        not_japanese = feats["format"]["not_japanese"]
        # Counted on the raw text: the analysis text has U+FFFD and non-Japanese Han removed.
        garbled = (len(GARBLED.findall(text)), stray_kanji(text))
        feats["logic"] = logic_features(self, sentences, clean, prompt, garbled, notes)
        costs = self.profile.logic.degenerate_costs
        lost = sum(cost * feats["logic"].get(k, 0.0) for k, cost in costs.items())
        degenerate = min(1.0, lost / self.profile.logic.degenerate_at)
        if degenerate:
            notes.append(f"degenerate text ({degenerate:.0%}): not Socrates speaking or asking, whatever its endings")
        asks, suggested = asking(self, sentences)
        feats["tone"] = {**tone_features(self, sentences, asks, degenerate, notes), "not_japanese": not_japanese,
                         "degenerate": degenerate}
        feats["approach"] = {**approach_features(self, sentences, asks, suggested, notes), "degenerate": degenerate}
        return feats, notes

    def costs(self, feats: dict[str, dict[str, float]]) -> list[str]:
        """One line per measurement that cost an axis points, with the weight that priced it
        ("format -0.40: wrapped 1.00 x -0.40"), largest first within each axis."""
        lines = []
        for axis in AXES:
            weights = getattr(self.profile.combine, axis).weights
            paid = [(w * feats.get(axis, {}).get(name, 0.0), name, w) for name, w in weights.items() if w < 0]
            lines.extend(f"{axis} {cost:.2f}: {name} {feats[axis][name]:.2f} x {w:.2f}"
                         for cost, name, w in sorted(paid) if cost <= -0.005)
        return lines

    def score(self, text: str, prompt: str | None = None) -> StyleScore:
        """Score one reply; ``prompt`` (the user's message) lets logic check relevance."""
        feats, notes = self.features(text, prompt)
        if not feats:
            return StyleScore(0.0, 0.0, 0.0, 0.0, 0.0, notes)
        axes = {axis: combine(self.profile, axis, feats[axis]) if axis in feats else 0.0 for axis in AXES}
        w = self.profile.overall_weights.model_dump()
        overall = sum(w[a] * axes[a] for a in AXES) / sum(w.values())
        return StyleScore(**axes, overall=_clip(overall), explanations=notes + self.costs(feats),
                          features={a: {k: round(v, 4) for k, v in f.items()} for a, f in feats.items()})


# --- batch helpers and the `socratune score` back end ----------------------------------------


def _scorer(profile: StyleProfile | str | Path | None) -> StyleScorer:
    return StyleScorer(profile if isinstance(profile, StyleProfile) else load_profile(profile or DEFAULT_PROFILE))


def score_replies(replies: list[str], prompts: list[str | None] | None = None,
                  profile: StyleProfile | str | Path | None = None) -> list[StyleScore]:
    """Score many replies with one scorer; ``prompts`` (same length) are the user messages."""
    if prompts is not None and len(prompts) != len(replies):
        raise ValueError(f"{len(replies)} replies but {len(prompts)} prompts")
    scorer = _scorer(profile)
    return [scorer.score(r, p) for r, p in zip(replies, prompts or [None] * len(replies))]


def summarize(scores: list[StyleScore]) -> dict[str, float]:
    """Mean of each axis and overall; empty when there are no scores (nothing to log, not 0)."""
    if not scores:
        return {}
    return {k: round(sum(s.axes()[k] for s in scores) / len(scores), 4) for k in SCORE_KEYS}


def format_summary_table(summary: dict[str, float], n: int) -> str:
    """A small table of mean scores for the terminal."""
    if not summary:
        return f"style scores: no replies scored (n={n})"
    rows = [f"style scores over {n} repl{'y' if n == 1 else 'ies'} (0-4)", f"{'axis':<10}{'mean':>6}"]
    return "\n".join(rows + [f"{axis:<10}{summary[axis]:>6.2f}" for axis in SCORE_KEYS if axis in summary])


def reply_line_problem(item: Any) -> str | None:
    """Why a JSONL line is not a reply to score (``text``, optional ``prompt``), or None."""
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    if not isinstance(item.get("text"), str):
        return "missing 'text'" if "text" not in item else "'text' must be a string"
    if item.get("prompt") is not None and not isinstance(item["prompt"], str):
        return "'prompt' must be a string or null"
    return None


def score_jsonl(in_path: Path, out_path: Path | None = None,
                profile: StyleProfile | str | Path | None = None) -> tuple[list[dict], list[str], dict[str, float]]:
    """Score a JSONL file of {"id", "text", "prompt"?} lines for the ``socratune score`` command.

    Returns the output records in input order, one "FILE:LINE: reason" message per unusable
    line (the other lines are still scored) and the summary. A missing id becomes the line
    number. Writes ``out_path`` as JSONL atomically (temporary file, then rename) when given.
    Raises DataError, writing nothing, when no line can be scored: an empty output would read
    as "scored" to the next step, and an existing one would be lost for nothing.
    """
    in_path = Path(in_path)
    text = read_text_file(in_path, "replies file")  # missing, a directory, a FIFO, not UTF-8: one line naming it
    scorer = _scorer(profile)
    records: list[dict] = []
    bad: list[str] = []
    scores: list[StyleScore] = []
    for number, item, problem in jsonl_lines(text):
        if problem := problem or reply_line_problem(item):
            bad.append(f"{in_path}:{number}: {problem}")
            continue
        scores.append(scorer.score(item["text"], item.get("prompt")))
        records.append({"id": item.get("id", number), "scores": scores[-1].axes(),
                        "explanations": scores[-1].explanations})
    if not records:  # nothing to write: an existing output is kept, no empty one is left behind
        shown = "".join(f"\n  {line[:300]}" for line in bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{in_path} holds no usable reply (each line needs {{\"id\", \"text\", \"prompt\"?}}); "
                        f"nothing was written{shown}{more}", rejections=bad)
    if out_path is not None:
        write_text_atomic(Path(out_path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records, bad, summarize(scores)

