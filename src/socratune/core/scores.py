"""The names of the style scores, written in one place.

Every scored reply has four axes and their weighted mean, ``overall``; training metrics carry
them as ``eval_style_<key>``. The scorer (style), the training callbacks, the run summary, the
plots and the evaluation report all read the keys from here. Imports nothing.
"""

from __future__ import annotations

AXES = ("tone", "approach", "format", "logic")
OVERALL = "overall"
SCORE_KEYS = (*AXES, OVERALL)


def style_metric(key: str) -> str:
    """The training-metric name of a score key (``overall`` -> ``eval_style_overall``)."""
    return f"eval_style_{key}"
