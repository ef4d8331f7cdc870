"""Style scorer: how Socratic a reply sounds, whether it asks, how clean and how coherent it is.

Each reply gets continuous scores in [0, 4] on four axes (tone, approach, format, logic), a
weighted overall score and human-readable evidence. The persona's rules (Socratic endings,
address terms, polite auxiliaries, lecturing markers, weights, rubric text) are data in a
profile YAML (``socratune/profiles/socrates.yaml``): a new persona is a new file, not new code.

Why Sudachi: a pure pip install whose dictionary ships as a wheel (no MeCab system library or
dictionary path to configure); it gives dictionary and normalized forms (だろう -> だ, でしょう
-> です, なさい -> なさる), so one rule covers every conjugation; and its part-of-speech tags
tell auxiliaries (助動詞) and sentence-final particles (終助詞) from look-alikes, which regexes
over characters cannot. Regexes are used only for surface format checks.

Calibration targets rank agreement with an LLM judge's 0-4 ratings, so scores blend partial
credit rather than count hits: tone mixes the length-weighted credit of sentence endings, the
best ending, address terms and the share of polite text (quoted speech is not the reply's own
register; asking keeps a trace of credit); approach rewards questions (a closing one and one
about something most) and subtracts lecturing, advice put as a question, answer-giving, long
explanation and a question that is an afterthought to statements; format and logic start at 4
and subtract capped penalties per problem found, format scaled by the share of readable text.
Degenerate text (loops, stutter, echoing the user, character runs) also scales tone and approach
down: a judge does not hear Socrates in a loop, whatever its endings.

``tests/data/style_calibration_ja.jsonl`` (101 hand-rated replies) is what the weights were
checked against. Layer 0: no torch or transformers. Tests: ``pytest tests/test_style.py
tests/test_style_calibration.py``.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sudachipy import Dictionary, SplitMode

from .data import jsonl_lines
from .errors import ConfigError, DataError
from .rundir import write_text_atomic

AXES = ("tone", "approach", "format", "logic")
DEFAULT_PROFILE = "socrates"

# --- profile schema --------------------------------------------------------------------------

Points = Annotated[float, Field(ge=0)]  # a weight or penalty on the 0-4 scale
Share = Annotated[float, Field(ge=0, le=1)]  # a credit in [0, 1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class ToneWeights(_Strict):
    mean_ending: Points
    best_ending: Points
    address: Points
    polite: Points
    asking: Share
    degenerate: Share


class ToneRules(_Strict):
    endings: list[Marker]
    plain_ending_weight: Share
    other_ending_weight: Share
    polite: list[Marker]
    polite_sentence_credit: Share
    address: list[Marker]
    weights: ToneWeights


class ApproachWeights(_Strict):
    base: Points
    question: Points
    ends_with_question: Points
    question_share: Points
    invitation: Points
    lecturing: Points
    lecturing_max: Points
    answer_giving: Points
    answer_giving_max: Points
    suggestion: Points
    suggestion_max: Points
    statement_share: Points
    long_explanation: Points
    degenerate: Share


class ApproachRules(_Strict):
    question_marks: str
    question_endings: list[Marker]
    invitations: list[Marker]
    lecturing: list[Marker]
    answer_giving: list[Marker]
    suggestions: list[Marker]
    lecture_chars: int = Field(gt=0)
    afterthought_share: float = Field(ge=0, lt=1)
    weights: ApproachWeights


class Penalty(_Strict):
    each: Points  # per occurrence
    max: Points  # the most this kind of problem can take away


class FormatPenalties(_Strict):
    special_token: Penalty
    html: Penalty
    emoji: Penalty
    english_word: Penalty
    foreign_script: Penalty
    stray_symbol: Penalty
    odd_space: Penalty
    odd_line_break: Penalty
    char_run: Penalty


class FormatRules(_Strict):
    special_tokens: list[str]
    allowed_symbols: str
    penalties: FormatPenalties

    @field_validator("special_tokens")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression {pattern!r}: {exc}") from exc
        return patterns


class LogicPenalties(_Strict):
    no_overlap: Points
    fragment: Points
    repeated_sentence: Points
    repetition: Points
    char_run: Points
    unknown_words: Points
    too_short: Points
    no_predicate: Points
    stutter: Points
    echo: Points


class LogicRules(_Strict):
    content_pos: list[str]
    stop_lemmas: list[str]
    overlap_wanted: int = Field(ge=0)
    penalties: LogicPenalties
    degenerate_at: float = Field(gt=0)
    echo_from: float = Field(ge=0, lt=1)


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


# What each level 0-4 means per axis, for an LLM judge prompt and for readers: all four axes,
# each with all five levels (the keys are restricted, so the minimum sizes make them complete).
Levels = Annotated[dict[Literal[0, 1, 2, 3, 4], str], Field(min_length=5)]
Rubric = Annotated[dict[Literal["tone", "approach", "format", "logic"], Levels], Field(min_length=4)]


class StyleProfile(_Strict):
    """A persona: the rules and weights of each axis, the overall weights and the rubric."""

    name: str
    description: str = ""
    tone: ToneRules
    approach: ApproachRules
    format: FormatRules
    logic: LogicRules
    overall_weights: AxisWeights
    rubric: Rubric


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


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> StyleProfile:
    """Load a shipped profile by name or a YAML file by path; errors name the file and key."""
    name = str(name_or_path)
    if isinstance(name_or_path, str) and not name.endswith((".yaml", ".yml")) and "/" not in name:
        allowed = available_profiles()
        if name not in allowed:
            raise ConfigError(f"unknown style profile '{name}'; allowed: {', '.join(allowed)} or a YAML path",
                              key="style.profile", allowed=allowed)
        source, text = f"profile {name}", (resources.files("socratune") / "profiles" / f"{name}.yaml").read_text(
            encoding="utf-8")
    else:
        source = name
        try:
            text = Path(name_or_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read style profile {source}: {exc.strerror}", key="style.profile") from exc
    try:
        return StyleProfile.model_validate(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        lines, first_key, first_allowed = [], None, None
        # Unknown keys first: a misspelt key also shows up as the right key "missing".
        for err in sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden"):
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            allowed = _allowed_keys(err["loc"]) if err["type"] == "extra_forbidden" else None
            lines.append(f"{source}: unknown key '{key}'; allowed: {', '.join(allowed)}" if allowed is not None
                         else f"{source}: '{key}': {err['msg']}")
            first_key, first_allowed = first_key or key, first_allowed or allowed
        raise ConfigError("\n".join(lines), key=first_key, allowed=first_allowed) from exc


# --- morphology ------------------------------------------------------------------------------


class _Morph(NamedTuple):
    surface: str
    form: str  # dictionary form
    norm: str  # normalized form, for comparing content words
    pos: tuple[str, ...]  # six fields; [5] is the conjugation form
    oov: bool
    quoted: bool = False  # inside 「」 or other brackets: someone else's words, not the reply's voice


_Spec = tuple[str | None, str | None, tuple[str, ...], str | None]  # form, surface, pos prefix, conj
_Rule = tuple[str, float, tuple[_Spec, ...]]  # marker name, weight, specs


def _compile(markers: list[Marker]) -> list[_Rule]:
    return [(m.name, m.weight, tuple((t.form, t.surface, tuple(t.pos.split(",")) if t.pos else (), t.conj)
                                     for t in m.tokens)) for m in markers]


def _match_at(morphs: list[_Morph], i: int, specs: tuple[_Spec, ...]) -> bool:
    if i < 0 or i + len(specs) > len(morphs):
        return False
    return all((form is None or m.form == form) and (surface is None or m.surface == surface)
               and m.pos[:len(pos)] == pos and (conj is None or m.pos[5].startswith(conj))
               for m, (form, surface, pos, conj) in zip(morphs[i:], specs))


def _found(rules: list[_Rule], morphs: list[_Morph]) -> list[_Rule]:
    """Rules matching anywhere in ``morphs``, once per occurrence."""
    return [r for r in rules for i in range(len(morphs)) if _match_at(morphs, i, r[2])]


def _own(morphs: list[_Morph]) -> list[_Morph]:
    """The reply's own words: quoted speech (「私は守ります」と言う) is left out of register and
    lecturing checks, as a reader does."""
    return [m for m in morphs if not m.quoted]


def _best_ending(rules: list[_Rule], morphs: list[_Morph]) -> _Rule | None:
    hits = [r for r in rules if _match_at(morphs, len(morphs) - len(r[2]), r[2])]
    return max(hits, key=lambda r: r[1]) if hits else None


_thread = threading.local()


@lru_cache(maxsize=1)
def _dictionary() -> Dictionary:
    return Dictionary()  # loads sudachidict-core once per process, on first use, not at import


def _tokenizer() -> Any:
    # One tokenizer per thread: a Sudachi tokenizer is mutably borrowed while it runs, so a
    # threaded server sharing one would fail with "Already borrowed".
    tokenizer = getattr(_thread, "tokenizer", None)
    if tokenizer is None:
        with warnings.catch_warnings():
            # sudachipy 0.7 renamed create() to tokenizer(); the pyproject floor (0.6.8) has only
            # create(). Switch to tokenizer() when the floor is raised to 0.7.
            warnings.simplefilter("ignore", DeprecationWarning)
            # Mode A (shortest units): 直感 in a prompt then matches 直感的 in a reply; endings
            # and auxiliaries are short units in every mode.
            tokenizer = _thread.tokenizer = _dictionary().create(SplitMode.A)
    return tokenizer


_CHUNK = 2000  # characters per Sudachi call: its input limit is in bytes, replies are short
_SKIP = ("補助記号", "空白")  # punctuation and blanks
_PERIOD = ("補助記号", "句点")  # 。？！


@dataclass
class _Sentence:
    morphs: list[_Morph]  # without closing punctuation, brackets or blanks
    text: str
    closer: str  # 。 ？ etc., or "" when the line ended without one


def _sentences(text: str) -> list[_Sentence]:
    """Split on sentence-final punctuation (補助記号-句点) outside 「」 and on line breaks."""
    out: list[_Sentence] = []
    for line in text.split("\n"):
        current: list[_Morph] = []
        depth = 0
        morphs = [m for start in range(0, len(line), _CHUNK) for m in _tokenizer().tokenize(line[start:start + _CHUNK])]
        for i, m in enumerate(morphs):
            pos = tuple(m.part_of_speech())
            depth += (pos[1] == "括弧開") - (pos[1] == "括弧閉" and depth > 0)
            morph = _Morph(m.surface(), m.dictionary_form(), m.normalized_form(), pos, m.is_oov(), depth > 0)
            current.append(morph)
            if i == len(morphs) - 1 or (morph.pos[:2] == _PERIOD and depth == 0):
                core = len(current)
                while core and current[core - 1].pos[0] in _SKIP:
                    core -= 1
                closer = next((c.surface for c in current[core:] if c.pos[:2] == _PERIOD), "")
                if core:
                    out.append(_Sentence(current[:core], "".join(c.surface for c in current[:core]), closer))
                current = []
    return out


# --- surface patterns for format (regexes are the right tool here) ---------------------------

_HTML = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>|&(?:[A-Za-z]+|#\d+);")
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F\u200D\u20E3]+")
_ENGLISH = re.compile(r"[A-Za-zＡ-Ｚａ-ｚ]+(?:['’][A-Za-z]+)?")
# English words with the spaces between and around them, removed as one so those spaces are
# not counted again as odd spacing.
_ENGLISH_RUN = re.compile(
    r"[ \t\u3000]*[A-Za-zＡ-Ｚａ-ｚ]+(?:(?:['’\-]|[ \t]+)[A-Za-zＡ-Ｚａ-ｚ]+)*[ \t\u3000]*")
_FOREIGN = re.compile("[\u0370-\u03FF\u0400-\u04FF\u0590-\u06FF\u0900-\u097F\u0E00-\u0E7F\u1100-\u11FF\uAC00-\uD7AF]+")
_HAN = re.compile("[\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF]")
# Three or more of one punctuation mark (。。。。, ？？？, ーーーー): noise, not Japanese prose.
_PUNCT_RUN = re.compile(r"([。、，．？！?!・ー―─])\1{2,}")


@lru_cache(maxsize=4096)
def _japanese_han(char: str) -> bool:
    """Whether a Han character is a Japanese kanji: in JIS X 0213, which holds every kanji of
    Japanese writing; Chinese simplified forms (这, 问, 题) are not."""
    try:
        char.encode("euc_jis_2004")
    except UnicodeEncodeError:
        return False
    return True


_JAPANESE = re.compile("[\u3040-\u309F\u30A0-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF々〆ヶ]")
_SPACES = re.compile(r"[ \t\u3000\u00A0]+")
_CHAR_RUN = re.compile(r"(\S)\1{5,}")
_NOT_CORE = re.compile(r"[\s。、，．？！?!「」『』（）()…・〜～]")


def _core(text: str) -> str:
    """Text without punctuation and blanks, for comparing wording."""
    return _NOT_CORE.sub("", text)


_LINE_END_OK = "。？！?!」』）)…\n"


@dataclass(frozen=True)
class StyleScore:
    """Scores in [0, 4] per axis plus the evidence that produced them."""

    tone: float
    approach: float
    format: float
    logic: float
    overall: float
    explanations: list[str]

    def axes(self) -> dict[str, float]:
        return {axis: getattr(self, axis) for axis in (*AXES, "overall")}


def _clip(x: float) -> float:
    return round(min(4.0, max(0.0, x)), 4)


class StyleScorer:
    """Scores replies against one profile; construct once and reuse (rules are precompiled)."""

    def __init__(self, profile: StyleProfile | None = None):
        self.profile = p = profile or load_profile(DEFAULT_PROFILE)
        self._endings, self._polite = _compile(p.tone.endings), _compile(p.tone.polite)
        self._address, self._questions = _compile(p.tone.address), _compile(p.approach.question_endings)
        self._invites, self._lecturing = _compile(p.approach.invitations), _compile(p.approach.lecturing)
        self._answers, self._suggestions = _compile(p.approach.answer_giving), _compile(p.approach.suggestions)
        # "(?!)" never matches: a profile may list no special tokens.
        self._special = re.compile("|".join(f"(?:{s})" for s in p.format.special_tokens or ["(?!)"]))
        self._content_pos = [tuple(x.split(",")) for x in p.logic.content_pos]
        self._stop = frozenset(p.logic.stop_lemmas)
        _tokenizer()  # load the dictionary now rather than inside the first score() call

    def score(self, text: str, prompt: str | None = None) -> StyleScore:
        """Score one reply; ``prompt`` (the user's message) lets logic check relevance."""
        if not text.strip():
            return StyleScore(0.0, 0.0, 0.0, 0.0, 0.0, ["empty reply"])
        notes: list[str] = []
        fmt, clean, readable = self._format(text, notes)
        sentences = _sentences(clean)
        if sentences:
            axes = {"tone": self._tone(sentences, readable, notes), "approach": self._approach(sentences, notes),
                    "format": fmt}
            axes["logic"], degenerate = self._logic(sentences, clean, prompt, notes)
            if degenerate:
                # A loop or word salad is not Socrates speaking or asking, whatever its endings.
                axes["tone"] = _clip(axes["tone"] * (1 - self.profile.tone.weights.degenerate * degenerate))
                axes["approach"] = _clip(axes["approach"]
                                         * (1 - self.profile.approach.weights.degenerate * degenerate))
                notes.append(f"degenerate text ({degenerate:.0%}) lowers tone and approach")
        else:
            notes.append("no words left once markup and special tokens are removed")
            axes = {"tone": 0.0, "approach": 0.0, "format": fmt, "logic": 0.0}
        w = self.profile.overall_weights.model_dump()
        overall = sum(w[a] * axes[a] for a in AXES) / sum(w.values())
        return StyleScore(**axes, overall=_clip(overall), explanations=notes)

    def _format(self, text: str, notes: list[str]) -> tuple[float, str, float]:
        """Format score, the text without special tokens and markup, and the share of the text
        that is readable Japanese (Japanese letters among letters, times the share not junk)."""
        found: dict[str, list[str]] = {}
        body = text.strip()
        for kind, pattern in (("special_token", self._special), ("html", _HTML)):
            found[kind] = pattern.findall(body)
            body = pattern.sub("", body)
        # A literal backslash-n (an escaping slip in data or generation) is one broken line
        # break, not English plus a stray symbol; the analysis reads it as the break it meant.
        literal_breaks = body.count("\\n")
        clean = body.replace("\\n", "\n").strip()
        found["emoji"] = _EMOJI.findall(clean)
        body = _EMOJI.sub("", clean)
        found["english_word"] = _ENGLISH.findall(body)
        body = _ENGLISH_RUN.sub("", body)
        found["foreign_script"] = _FOREIGN.findall(body) + [c for c in _HAN.findall(body) if not _japanese_han(c)]
        body = "".join(c for c in _FOREIGN.sub("", body) if not (_HAN.match(c) and not _japanese_han(c)))
        punct_runs = [m.group(0) for m in _PUNCT_RUN.finditer(body)]
        body = _PUNCT_RUN.sub("", body)
        allowed = self.profile.format.allowed_symbols
        found["stray_symbol"] = punct_runs + [c for c in body
                                              if not (c.isspace() or c.isdigit() or _JAPANESE.match(c) or c in allowed)]
        found["odd_space"] = _SPACES.findall(body.strip())
        found["char_run"] = [m.group(0) for m in _CHAR_RUN.finditer(clean)]
        mid_sentence = [c for i, c in enumerate(clean) if c == "\n" and clean[i - 1] not in _LINE_END_OK]
        found["odd_line_break"] = ["\\n"] * literal_breaks + re.findall(r"\r|\n{3,}", clean) + mid_sentence
        labels = {"special_token": "special token", "html": "HTML", "emoji": "emoji", "english_word": "English word",
                  "foreign_script": "non-Japanese script", "stray_symbol": "stray symbol", "char_run": "character run"}
        for kind, label in labels.items():
            notes.extend(f"{label} {f!r}" for f in dict.fromkeys(found[kind]))
        if found["odd_space"]:
            notes.append(f"{len(found['odd_space'])} run(s) of spaces inside the text")
        if found["odd_line_break"]:
            notes.append(f"{len(found['odd_line_break'])} odd line break(s) "
                         "(mid-sentence, blank runs or a literal \\n)")
        japanese = sum(not (_HAN.match(c) and not _japanese_han(c)) for c in _JAPANESE.findall(clean))
        other = sum(map(len, found["english_word"] + found["foreign_script"]))
        ja_share = japanese / (japanese + other) if japanese else 0.0
        if ja_share < 1:
            notes.append(f"Japanese is {ja_share:.0%} of the letters")
        # Junk (stray symbols, a run's characters beyond three) scales the score by its share of
        # the text: capped penalties alone would leave a reply that is mostly 、、、 or 666 at 1.5.
        visible = sum(not c.isspace() for c in clean)
        junk = sum(map(len, found["stray_symbol"])) + sum(len(run) - 3 for run in found["char_run"])
        readable = max(0.0, 1 - junk / visible) if visible else 0.0
        if readable < 1:
            notes.append(f"{1 - readable:.0%} of the characters are stray symbols or repeated runs")
        penalty = self.profile.format.penalties.model_dump()
        lost = sum(min(penalty[k]["each"] * len(hits), penalty[k]["max"]) for k, hits in found.items())
        # Emoji are format's concern; left in, they would read as unknown words and cut-off sentences.
        analysed = _SPACES.sub(" ", _EMOJI.sub("", clean)).strip()
        return _clip((4.0 - lost) * ja_share * readable), analysed, ja_share * readable

    def _tone(self, sentences: list[_Sentence], readable: float, notes: list[str]) -> float:
        rules, w = self.profile.tone, self.profile.tone.weights
        credits, polite_chars = [], 0
        for n, s in enumerate(sentences, 1):
            ending, last = _best_ending(self._endings, s.morphs), s.morphs[-1]
            if ending:
                credit, what = ending[1], f"ends with {ending[0]}"
            elif last.pos[0] in ("動詞", "形容詞", "助動詞") and last.pos[5].startswith("終止形"):
                credit, what = rules.plain_ending_weight, "ends in plain form"
            else:
                credit, what = rules.other_ending_weight, "has no in-character ending"
            polite = sorted({r[0] for r in _found(self._polite, _own(s.morphs))})
            if polite:
                credit *= rules.polite_sentence_credit
                polite_chars += len(s.text)
                notes.append(f"polite speech {'/'.join(polite)} in sentence {n}")
            notes.append(f"sentence {n} {what} (tone credit {credit:.2f})")
            credits.append(credit)
        total = sum(len(s.text) for s in sentences)
        mean = sum(c * len(s.text) for c, s in zip(credits, sentences)) / total
        address = sorted({r[0] for r in _found(self._address, [m for s in sentences for m in s.morphs])})
        notes.extend(f"address term {a}" for a in address)
        raw = (w.mean_ending * mean + w.best_ending * max(credits) + w.address * bool(address)
               - w.polite * polite_chars / total)
        # Questioning is a trace of Socrates' voice even in polite speech (rubric level 1), so a
        # polite reply that asks ranks above a polite one that explains.
        asking = w.asking * sum(self._asks(sentences)[0]) / len(sentences)
        if asking > raw:
            notes.append("polite or plain, but asks: a trace of Socrates' voice")
            raw = asking
        # Other scripts dilute the voice: a stray word costs little here (format takes the main
        # penalty), a mostly English reply loses the tone.
        return _clip(4.0 * min(1.0, raw) * min(1.0, readable / 0.8))

    def _asks(self, sentences: list[_Sentence]) -> tuple[list[bool], list[list[_Rule]]]:
        """Which sentences ask a question, and the suggestion markers found in each: a
        suggestion put as a question (〜てはいかがでしょうか？) gives advice, it does not ask."""
        marks = self.profile.approach.question_marks
        suggested = [_found(self._suggestions, _own(s.morphs)) for s in sentences]
        asks = [not hints and (bool(s.closer) and s.closer in marks
                               or _best_ending(self._questions, s.morphs) is not None)
                for s, hints in zip(sentences, suggested)]
        return asks, suggested

    def _approach(self, sentences: list[_Sentence], notes: list[str]) -> float:
        rules, w = self.profile.approach, self.profile.approach.weights
        asks, suggested = self._asks(sentences)
        statements = [s for s, a in zip(sentences, asks) if not a]
        notes.append(f"{sum(asks)} of {len(sentences)} sentences ask a question")
        score = w.base
        if any(asks):
            # A question about something (幸福とは何かね) moves thinking more than a bare request
            # for an opinion (どう思いますか): half the credit needs a content word.
            substance = any(self._content([s]) for s, a in zip(sentences, asks) if a)
            if not substance:
                notes.append("the questions name no content word (a bare request for an opinion)")
            score += (w.question * (0.5 + 0.5 * substance) + w.ends_with_question * asks[-1]
                      + w.question_share * min(1.0, sum(asks) / len(sentences) / 0.5))
        if any(_found(self._invites, s.morphs) for s in sentences):
            score += w.invitation
            notes.append("invites the user to think along")
        for kind, found_rules, each, cap in (("lecturing", self._lecturing, w.lecturing, w.lecturing_max),
                                             ("answer-giving", self._answers, w.answer_giving, w.answer_giving_max)):
            hits = [r for s in statements for r in _found(found_rules, _own(s.morphs))]
            notes.extend(f"{kind} marker {name}" for name in dict.fromkeys(r[0] for r in hits))
            score -= min(cap, each * sum(r[1] for r in hits))
        hints = [r for found in suggested for r in found]
        notes.extend(f"suggestion marker {name}" for name in dict.fromkeys(r[0] for r in hints))
        score -= min(w.suggestion_max, w.suggestion * sum(r[1] for r in hints))
        told = sum(len(s.text) for s in statements)
        if told > rules.lecture_chars:
            notes.append(f"statements run {told} characters")
            score -= w.long_explanation * min(1.0, (told - rules.lecture_chars) / 200)
        share = told / sum(len(s.text) for s in sentences)
        if any(asks) and share > rules.afterthought_share:
            # The question is an afterthought when statements make up most of the reply (a
            # Socratic framing sentence or two before the question stays below the threshold).
            notes.append(f"statements are {share:.0%} of the text")
            score -= w.statement_share * (share - rules.afterthought_share) / (1 - rules.afterthought_share)
        return _clip(score)

    def _content(self, sentences: list[_Sentence]) -> list[str]:
        return [m.norm for s in sentences for m in s.morphs
                if any(m.pos[:len(p)] == p for p in self._content_pos) and m.norm not in self._stop]

    def _logic(self, sentences: list[_Sentence], clean: str, prompt: str | None,
               notes: list[str]) -> tuple[float, float]:
        """Logic score, and how degenerate the text is in [0, 1]: the points lost to loops,
        stutter, junk and unknown words over the profile's ``degenerate_at``."""
        pen = self.profile.logic.penalties
        morphs = [m for s in sentences for m in s.morphs if m.pos[0] not in _SKIP]
        issues: list[tuple[float, str]] = []  # (points lost, evidence)
        degenerate = 0.0
        if len(morphs) < 4:
            issues.append((pen.too_short, f"only {len(morphs)} word(s)"))
        # Word salad has neither a predicate nor a final particle (何かね has no verb but is fine).
        if not any(m.pos[0] in ("動詞", "形容詞", "助動詞", "形状詞") or m.pos[1] == "終助詞"
                   for m in morphs):
            issues.append((pen.no_predicate, "no predicate (verb, adjective, copula or final particle)"))
            degenerate += pen.no_predicate
        tail = sentences[-1].morphs[-1]
        if not sentences[-1].closer and not (tail.pos[1] == "終助詞" or tail.pos[0] in ("感動詞", "接続詞")
                                             or tail.pos[5].startswith(("終止形", "命令形"))):
            issues.append((pen.fragment, f"cut off mid-sentence after '{tail.surface}'"))
        texts = [s.text for s in sentences if len(s.text) >= 4]
        if len(texts) > len(set(texts)):
            repeats = len(texts) - len(set(texts))
            issues.append((pen.repeated_sentence * repeats, f"{repeats} repeated sentence(s)"))
            degenerate += pen.repeated_sentence * repeats
        grams = [tuple(m.surface for m in morphs[i:i + 4]) for i in range(len(morphs) - 3)]
        repeated = 1 - len(set(grams)) / len(grams) if len(grams) >= 8 else 0.0
        if repeated > 0.1:
            issues.append((pen.repetition * (repeated - 0.1), f"{repeated:.0%} of 4-word windows repeat (loop)"))
            degenerate += pen.repetition * (repeated - 0.1)
        # Stutter: a word or two said again at once (君、君、君は / 嫌いな、嫌いな); particles and
        # auxiliaries alone do not count.
        surfaces = [m.surface for m in morphs]
        stutters = sum(surfaces[i:i + n] == surfaces[i + n:i + 2 * n]
                       and (n > 1 or morphs[i].pos[0] not in ("助詞", "助動詞"))
                       for n in (1, 2, 3) for i in range(len(surfaces) - 2 * n + 1))
        if stutters:
            lost = pen.stutter * min(1.0, stutters / 4)
            issues.append((lost, f"{stutters} word(s) repeated at once (stutter)"))
            degenerate += lost
        if _CHAR_RUN.search(clean):
            issues.append((pen.char_run, "one character repeated six or more times"))
            degenerate += pen.char_run
        unknown = sum(m.oov for m in morphs) / max(1, len(morphs))
        if unknown:
            issues.append((pen.unknown_words * unknown, f"{unknown:.0%} of words unknown to the dictionary"))
            degenerate += pen.unknown_words * unknown
        if prompt and prompt.strip():
            # Echo: the reply says the user's message back (a failure of small tuned models).
            alike = SequenceMatcher(None, _core(prompt), _core(clean), autojunk=False).ratio()
            if alike > self.profile.logic.echo_from:
                lost = pen.echo * min(1.0, (alike - self.profile.logic.echo_from) / (1 - self.profile.logic.echo_from))
                issues.append((lost, f"repeats the user's message ({alike:.0%} alike)"))
                degenerate += lost
        asked = set(self._content(_sentences(prompt))) if prompt and prompt.strip() else set()
        wanted = min(self.profile.logic.overlap_wanted, len(asked))
        if wanted:
            shared = sorted(asked & set(self._content(sentences)))
            notes.append(f"shares {len(shared)} content word(s) with the prompt"
                         + (f" ({', '.join(shared[:5])})" if shared else ""))
            issues.append((pen.no_overlap * (1 - min(len(shared), wanted) / wanted), ""))
        notes.extend(note for _, note in issues if note)
        return _clip(4.0 - sum(lost for lost, _ in issues)), min(1.0, degenerate / self.profile.logic.degenerate_at)


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
    return {k: round(sum(s.axes()[k] for s in scores) / len(scores), 4) for k in (*AXES, "overall")}


def format_summary_table(summary: dict[str, float], n: int) -> str:
    """A small table of mean scores for the terminal."""
    if not summary:
        return f"style scores: no replies scored (n={n})"
    rows = [f"style scores over {n} repl{'y' if n == 1 else 'ies'} (0-4)", f"{'axis':<10}{'mean':>6}"]
    return "\n".join(rows + [f"{axis:<10}{summary[axis]:>6.2f}" for axis in (*AXES, "overall") if axis in summary])


def _line_problem(item: Any) -> str | None:
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
    """
    in_path = Path(in_path)
    try:
        text = in_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {in_path}: {exc}") from exc
    scorer = _scorer(profile)
    records: list[dict] = []
    bad: list[str] = []
    scores: list[StyleScore] = []
    for number, item, problem in jsonl_lines(text):
        if problem := problem or _line_problem(item):
            bad.append(f"{in_path}:{number}: {problem}")
            continue
        scores.append(scorer.score(item["text"], item.get("prompt")))
        records.append({"id": item.get("id", number), "scores": scores[-1].axes(),
                        "explanations": scores[-1].explanations})
    if out_path is not None:
        write_text_atomic(Path(out_path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records, bad, summarize(scores)

