"""The names of the style scores, written in one place, and the one measure of a model that
answers everything alike.

Every scored reply has four axes and their weighted mean, ``overall``; training metrics carry
them as ``eval_style_<key>``. The scorer (style), the training callbacks, the run summary, the
plots and the evaluation report all read the keys from here. Imports nothing beyond the
standard library.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

AXES = ("tone", "approach", "format", "logic")
OVERALL = "overall"
SCORE_KEYS = (*AXES, OVERALL)


def style_metric(key: str) -> str:
    """The training-metric name of a score key (``overall`` -> ``eval_style_overall``)."""
    return f"eval_style_{key}"


# A model whose most common reply answers more than this share of the prompts has found one reply
# the scorer likes rather than answering each prompt (issue 27: DPO reached 54% on real openers).
REPEATED_REPLY_SHARE = 0.1


@dataclass(frozen=True)
class Variety:
    """How alike a model's replies to different prompts are (surrounding white space ignored)."""

    replies: int
    distinct: int
    most_common: str
    most_common_count: int

    @property
    def most_common_share(self) -> float:
        return self.most_common_count / self.replies if self.replies else 0.0

    def repeats_itself(self) -> bool:
        """One reply answers more than REPEATED_REPLY_SHARE of the prompts (and at least two)."""
        return self.most_common_count >= 2 and self.most_common_share > REPEATED_REPLY_SHARE


def reply_variety(replies: list[str]) -> Variety:
    counts = Counter(reply.strip() for reply in replies)
    top, top_count = counts.most_common(1)[0] if counts else ("", 0)
    return Variety(len(replies), len(counts), top, top_count)
