"""Style scoring for a persona: profile schema (``profile``), the measurements of each axis
(``morphology`` shared by all; ``format``, ``tone``, ``approach``, ``logic`` and ``grammar``),
the scorer that combines them (``scorer``) and fitting its combination weights to judge
ratings (``calibrate``).

Callers import from here (``from socratune.style import StyleScorer``); the names below are the
package's public API. Importing it loads neither torch nor the Sudachi dictionary.
"""

from ..core.scores import AXES, SCORE_KEYS
from .profile import (
    DEFAULT_PROFILE,
    FEATURES,
    StyleProfile,
    available_profiles,
    load_profile,
)
from .scorer import (
    StyleScore,
    StyleScorer,
    format_summary_table,
    score_jsonl,
    score_replies,
    summarize,
    unwrap,
)

__all__ = [
    "AXES", "DEFAULT_PROFILE", "FEATURES", "SCORE_KEYS", "StyleProfile", "StyleScore", "StyleScorer",
    "available_profiles", "format_summary_table", "load_profile", "score_jsonl", "score_replies", "summarize",
    "unwrap",
]
