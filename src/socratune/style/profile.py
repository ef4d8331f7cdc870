"""Style profile: the schema of a persona's YAML file, its feature list per axis, and loading.

A profile holds everything persona-specific the scorer reads (Socratic endings, address terms,
polite auxiliaries, lecturing markers, content-word rules), the **combination weights** that
turn each axis's features into a 0-4 score, the overall axis weights and the rubric. The
weights are data so that ``socratune calibrate`` can refit them to a user's own judge ratings
and write a new profile; the features are code (``scorer.py``) and listed here by name, so a
profile naming a feature that does not exist is refused at load time, not ignored.

Layer 0: imports no torch, transformers or Sudachi.
"""

from __future__ import annotations

import re
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..core.errors import ConfigError, quote_capped
from ..core.scores import AXES  # the axis names, written once for the whole package

DEFAULT_PROFILE = "socrates"
MAX_PROBLEMS_SHOWN = 3  # lines of a profile's validation errors quoted in one message

# The features the scorer computes per axis, each in [0, 1], and the sign its weight must have:
# +1 raises the axis, -1 lowers it. Calibration keeps these signs, so a fit on a few noisy
# ratings cannot make politeness raise tone or a loop raise logic.
FEATURES: dict[str, dict[str, int]] = {
    "tone": {
        "socratic_endings": +1,  # length-weighted mean ending credit over the sentences
        "socratic_count": +1,  # sentences with a strong Socratic ending (held_credit or more; full at three)
        "best_ending": +1,  # credit of the most Socratic sentence ending
        "address": +1,  # addresses the user as 君 / 友よ
        "asks": +1,  # share of sentences that ask: questioning is part of the voice
        "in_character_question": +1,  # share of the asking sentences whose ending is held Socratic speech
        "polite": -1,  # share of the text in polite (です/ます) sentences
        "acknowledgement": -1,  # a bare acknowledgement: no content word and no question (なるほど。)
        "not_japanese": -1,  # share of letters that are not Japanese, or junk
        "degenerate": -1,  # loops, stutter, unknown words, broken grammar
    },
    "approach": {
        "asks": +1,  # at least one sentence asks
        "marked_question": +1,  # at least one question closed by a question mark (？), not by 。
        "question_share": +1,  # share of sentences that ask (full at one in two)
        "ends_with_question": +1,
        "content_question": +1,  # a question names a content word (幸福とは何かね)
        "question_count": +1,  # sentences that ask (full at three)
        "question_length": +1,  # characters of the asking sentences (full at 60): a posed question
        "invitation": +1,  # 考えてみよう, 聞きたい
        "lecturing": -1,  # prescriptions and orders in statements (full at three markers)
        "answer_giving": -1,  # hands over an opinion or answer (full at two markers)
        "suggestion": -1,  # advice put as a question (〜てはいかが)
        "explanation": -1,  # statements beyond lecture_chars (full at +200 characters)
        "statement_share": -1,  # share of the text that does not ask, beyond half (0 at half, 1 at all)
        "degenerate": -1,
    },
    "format": {
        "special_token": -1,  # leaked chat-template tokens (full at two)
        "markup": -1,  # HTML or markdown (full at two)
        "emoji": -1,  # full at three
        "other_language": -1,  # English words or other scripts (full at four)
        "replacement_char": -1,  # U+FFFD from an invalid byte sequence (any)
        "stray_symbol": -1,  # symbols a Japanese reply does not use (full at four)
        "odd_space": -1,  # runs of spaces inside the text (full at two)
        "odd_line_break": -1,  # mid-sentence, blank runs or a literal \n (full at two)
        "wrapped": -1,  # the whole reply wrapped in 「…」 (quotes only since v3; braces are "braces")
        "braces": -1,  # a {{…}} template wrapper or stray braces (full at one)
        "latin_in_word": -1,  # Latin letters right inside a Japanese word (考えmasu; full at one)
        "english_in_sentence": -1,  # an English word inside a Japanese sentence (難しい indeed。; full at one)
        "split_ending": -1,  # a sentence ending on a line of its own after a line break (⏎かね？; full at one)
        "not_japanese": -1,  # share of letters that are not Japanese, or junk
    },
    "logic": {
        "unknown_words": -1,  # share of words the dictionary does not know (full at 30%)
        "garbled": -1,  # a U+FFFD or a kanji outside JIS X 0208 (any)
        "broken_grammar": -1,  # conjugations and particles that cannot follow what precedes
        "repetition": -1,  # repeated sentences and 4-word windows (a loop)
        "stutter": -1,  # a word said again at once (full at four)
        "fragment": -1,  # stops mid-sentence
        "too_short": -1,  # 1 - words / 12 for fewer than twelve words
        "no_predicate": -1,  # no verb, adjective, copula or final particle
        "says_nothing": -1,  # not one content word (a noun, verb, adjective beyond the stop lemmas)
        "off_topic": -1,  # takes up none of the prompt's content words
        "off_prompt": -1,  # share of the reply's content words that are the prompt's, below logic.fit_wanted
        "echo": -1,  # says the user's message back
    },
}

# Points towards logic.degenerate_at per sign of non-language (the v2 shipped logic weights).
DEGENERATE_COSTS = {"unknown_words": 3.0, "garbled": 3.0, "broken_grammar": 2.0, "repetition": 3.0, "stutter": 2.0,
                    "no_predicate": 1.0, "echo": 3.0}

# --- profile schema --------------------------------------------------------------------------

Share = Annotated[float, Field(ge=0, le=1)]  # a credit in [0, 1]
Points = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN or infinite weight would score every reply 0 or nan, silently
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TokenSpec(_Strict):
    """One morpheme to match; a field left out matches anything."""

    form: str | None = Field(None, description="dictionary form (だろう -> だ)")
    surface: str | None = None
    pos: str | None = Field(None, description='POS prefix, comma-joined: "助詞,終助詞"')
    conj: str | None = Field(None, description='conjugation-form prefix: "命令形"')


class Marker(_Strict):
    """A named run of morphemes (か + ね); weight is its credit (endings) or penalty share."""

    name: str
    tokens: list[TokenSpec] = Field(min_length=1)
    weight: Share = 1.0

    @field_validator("tokens", mode="before")
    @classmethod
    def _form_shorthand(cls, value: Any) -> Any:
        # A bare string is the dictionary form: tokens: [必要, が, ある].
        return [{"form": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


class ToneRules(_Strict):
    endings: list[Marker]
    plain_ending_weight: Share
    other_ending_weight: Share
    polite: list[Marker]
    polite_sentence_credit: Share
    held_credit: Share = Field(0.75, description="ending credit from which a sentence counts as Socratic speech")
    address: list[Marker]


class Requests(_Strict):
    """A request that the user tell or think (説明してくれ, 考えてみてほしい): it invites, it does
    not lecture. Left out of a profile, no sentence is read as such a request."""

    endings: list[Marker] = Field(default_factory=list)
    verbs: list[str] = Field(default_factory=list, description="dictionary forms of telling and thinking verbs")


class ApproachRules(_Strict):
    question_marks: str
    question_endings: list[Marker]
    requests: Requests = Field(default_factory=Requests)
    invitations: list[Marker]
    lecturing: list[Marker]
    answer_giving: list[Marker]
    suggestions: list[Marker]
    lecture_chars: int = Field(gt=0)


class FormatRules(_Strict):
    special_tokens: list[str]
    allowed_symbols: str

    @field_validator("special_tokens")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression {pattern!r}: {exc}") from exc
        return patterns


class LogicRules(_Strict):
    content_pos: list[str]
    stop_lemmas: list[str]
    overlap_wanted: int = Field(ge=0)
    echo_from: float = Field(ge=0, lt=1)
    fit_wanted: float = Field(0.1, gt=0, le=1, description="share of the reply's content words taken from the "
                              "prompt at which it fits the prompt (off_prompt is 0 from here)")
    degenerate_at: float = Field(gt=0, description="logic points lost at which text is fully degenerate")
    # What each sign of non-language costs towards degenerate_at. Fixed here, apart from the logic
    # weights in `combine`, so that degenerate is a measurement: refitting logic (calibrate) does not
    # change what tone and approach read. Left out, the v2 shipped logic weights are used.
    degenerate_costs: dict[str, Points] = Field(
        default_factory=lambda: dict(DEGENERATE_COSTS),
        description="logic features and the points each costs towards degenerate_at")

    @field_validator("degenerate_costs")
    @classmethod
    def _logic_features_only(cls, costs: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(costs) - set(FEATURES["logic"]))
        if unknown:
            raise ValueError(f"unknown logic feature(s) {', '.join(unknown)}; allowed: {', '.join(FEATURES['logic'])}")
        return costs


class AxisModel(_Strict):
    """axis score = clip(intercept + sum(weight * feature), 0, 4); features are in [0, 1]."""

    intercept: float = Field(ge=-8, le=8)
    weights: dict[str, float]


class Combination(_Strict):
    tone: AxisModel
    approach: AxisModel
    format: AxisModel
    logic: AxisModel

    @model_validator(mode="after")
    def _known_features_with_their_signs(self) -> Combination:
        for axis in AXES:
            known = FEATURES[axis]
            for name, weight in getattr(self, axis).weights.items():
                if name not in known:
                    raise ValueError(f"{axis}: unknown feature '{name}'; allowed: {', '.join(known)}")
                if weight * known[name] < 0:
                    raise ValueError(f"{axis}.{name}: weight {weight} has the wrong sign "
                                     f"(this feature can only {'raise' if known[name] > 0 else 'lower'} the score)")
        return self


class AxisWeights(_Strict):
    tone: Points
    approach: Points
    format: Points
    logic: Points

    @model_validator(mode="after")
    def _not_all_zero(self) -> AxisWeights:
        if sum(self.model_dump().values()) <= 0:
            raise ValueError("at least one axis weight must be positive")
        return self


class Calibration(_Strict):
    """What a calibrated profile's combination weights were fitted on, and how well they did."""

    file: str
    sha256: str
    rows: int
    rows_per_axis: dict[str, int]
    date: datetime
    folds: int
    method: str
    cv_spearman: dict[str, float | None]  # calibrated: mean rho over held-out folds
    uncalibrated_cv_spearman: dict[str, float | None]  # the starting profile on the same folds
    uncalibrated_spearman: dict[str, float | None]  # the starting profile on all rows
    kept_axes: list[str] = []  # axes that kept the starting weights (worse held out, or too few ratings)
    base_profile: str


# What each level 0-4 means per axis, for an LLM judge prompt and for readers: all four axes,
# each with all five levels (the keys are restricted, so the minimum sizes make them complete).
Levels = Annotated[dict[Literal[0, 1, 2, 3, 4], str], Field(min_length=5)]
Rubric = Annotated[dict[Literal["tone", "approach", "format", "logic"], Levels], Field(min_length=4)]


class StyleProfile(_Strict):
    """A persona: the rules of each axis, the feature weights, the overall weights and the rubric."""

    name: str
    description: str = ""
    tone: ToneRules
    approach: ApproachRules
    format: FormatRules
    logic: LogicRules
    combine: Combination
    overall_weights: AxisWeights
    rubric: Rubric
    calibration: Calibration | None = None


def available_profiles() -> list[str]:
    folder = resources.files("socratune") / "profiles"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    """Keys allowed where the unknown key ``loc`` sits (list indices are stepped over)."""
    model: type[BaseModel] = StyleProfile
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if isinstance(part, int) or field is None:
            continue
        inner = getattr(field.annotation, "__args__", (field.annotation,))  # list[Marker] -> Marker
        models = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            model = models[0]
    return list(model.model_fields)


def profile_source(name_or_path: str | Path) -> tuple[str, dict[str, Any]]:
    """(label for messages, YAML mapping) of a shipped profile name or a YAML path. A path is read
    through the config reader, so a missing file, a directory, a FIFO, non-UTF-8 text, aliases,
    deep nesting or huge integers each get a one-line ConfigError naming the file."""
    from ..core.config import read_yaml_file

    name = str(name_or_path)
    if isinstance(name_or_path, str) and not name.endswith((".yaml", ".yml")) and "/" not in name:
        allowed = available_profiles()
        if name not in allowed:
            raise ConfigError(f"unknown style profile {quote_capped(name)}; allowed: {', '.join(allowed)} or a "
                              "YAML path", key="style.profile", allowed=allowed)
        text = (resources.files("socratune") / "profiles" / f"{name}.yaml").read_text(encoding="utf-8")
        return f"profile {name}", yaml.safe_load(text)
    try:
        return name, read_yaml_file(Path(name_or_path), "style profile")
    except ConfigError as exc:
        raise ConfigError(str(exc), key="style.profile") from None


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> StyleProfile:
    """Load a shipped profile by name or a YAML file by path; errors name the file and key."""
    source, data = profile_source(name_or_path)
    try:
        return StyleProfile.model_validate(data)
    except ValidationError as exc:
        lines, first_key, first_allowed = [], None, None
        # Unknown keys first: a misspelt key also shows up as the right key "missing".
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        for err in errors[:MAX_PROBLEMS_SHOWN]:  # a file wrong everywhere still gets a short message
            key = (".".join(str(p) for p in err["loc"]) or "(top level)")[:80]
            allowed = _allowed_keys(err["loc"]) if err["type"] == "extra_forbidden" else None
            lines.append(f"{source}: unknown key '{key}'; allowed: {', '.join(allowed)}" if allowed is not None
                         else f"{source}: '{key}': {err['msg'][:200]}")
            first_key, first_allowed = first_key or key, first_allowed or allowed
        if len(errors) > MAX_PROBLEMS_SHOWN:
            lines.append(f"{source}: and {len(errors) - MAX_PROBLEMS_SHOWN} more problems")
        raise ConfigError("\n".join(lines), key=first_key, allowed=first_allowed) from exc
