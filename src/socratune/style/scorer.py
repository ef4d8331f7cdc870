"""Style scorer: how Socratic a reply sounds, whether it asks, how clean and how coherent it is.

Each reply gets scores in [0, 4] on four axes (tone, approach, format, logic), a weighted
overall score and readable evidence (what was detected in which sentence). Scoring has two
steps, kept apart so that the second can be refitted to a user's own judge:

1. **Features** (code, here): per axis a handful of general measurements in [0, 1] — the share
   of sentences with a Socratic ending, the share of polite text, whether and how much the reply
   asks, lecturing markers, format breakers, loops, unknown words, garbled characters, broken
   grammar, overlap with the prompt. ``profile.FEATURES`` lists them with the sign each may take.
2. **Combination** (data, the profile's ``combine`` section): axis = clip(intercept + sum of
   weight * feature, 0, 4). ``socratune calibrate`` fits these weights to judge ratings
   (``calibrate.py``); the shipped weights are round numbers set by reading the judge's rubric
   and checked (not fitted) against the judged development half.

Why few features: a rule per observed reply fits its author's ratings and not an external
judge's (style v1 reached 0.72 tone on the replies it was tuned on and 0.45 on unseen ones). A
reply wrapped whole in 「…」 or {{…}} (Gemma does this) is unwrapped before analysis, so it is
read as the model's own speech; the wrapping itself is a format feature.

Why Sudachi: a pure pip install whose dictionary ships as a wheel; dictionary and normalized
forms (だろう -> だ, でしょう -> です) let one rule cover every conjugation, and part-of-speech
tags tell auxiliaries and final particles from look-alikes. Regexes are used only for surface
format checks. Layer 0: no torch or transformers.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from sudachipy import Dictionary, SplitMode

from ..core.errors import DataError
from ..core.rundir import write_text_atomic
from ..core.scores import AXES, SCORE_KEYS
from ..data.dialogues import jsonl_lines, read_text_file
from .profile import (
    DEFAULT_PROFILE,
    Marker,
    StyleProfile,
    load_profile,
)

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
    # The cheap first-token check before the full match keeps scoring at hundreds of replies/s.
    return [r for r in rules for i, m in enumerate(morphs)
            if (r[2][0][0] is None or m.form == r[2][0][0]) and (r[2][0][1] is None or m.surface == r[2][0][1])
            and _match_at(morphs, i, r[2])]


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


_REQUEST_REACH = 4  # morphemes before a request searched for its verb: 考え|て|み|て + ほしい
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
_HAN_RUN = re.compile("[\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF]+")
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


@lru_cache(maxsize=4096)
def _everyday_kanji(char: str) -> bool:
    """Whether a kanji is in JIS X 0208 (levels 1 and 2, about 6,300 kanji): every kanji of
    ordinary modern prose. Of the 5,324 turns of the shared real dialogues one has a kanji outside
    it; the tiny model's byte-level slips (兛, 厢, 逫) land outside it in about a quarter of its
    replies. JIS X 0213 (``_japanese_han``) is wider on purpose: format asks only "is it Japanese"."""
    try:
        char.encode("shift_jis")
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

# Whole-reply wrappers, outermost first: Gemma-2-jpn often quotes its whole reply (「…」) and
# some checkpoints add template braces ({{「…」}}).
_WRAPPERS = (("{{", "}}"), ("「", "」"), ("『", "』"))
_MARKDOWN = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__|```|^[ \t]{0,3}(?:#{1,6}[ \t]|[-*+][ \t]|>[ \t]?|\d+\.[ \t])",
                       re.MULTILINE)
_REPLACEMENT = "\ufffd"  # what an invalid byte sequence decodes to
_GARBLED = re.compile(f"{_REPLACEMENT}+")  # one run of U+FFFD is one unreadable spot


def _stray_kanji(text: str) -> str:
    """Kanji outside JIS X 0208 standing alone among kana (どちらが兛られる): a garbled word.

    A run of Han with two or more of them (这是一个好问题) is Chinese, another language, which
    is format's concern, not a garbled Japanese word."""
    found = []
    for run in _HAN_RUN.findall(text):
        odd = [c for c in run if not _everyday_kanji(c)]
        if len(odd) == 1:
            found.extend(odd)
    return "".join(dict.fromkeys(found))


def _closes_at_end(body: str, opener: str, closer: str) -> bool:
    """Whether the opener at the start is closed by the closer at the very end (and not before)."""
    depth, i = 0, 0
    while i < len(body):
        if body.startswith(opener, i):
            depth, i = depth + 1, i + len(opener)
        elif body.startswith(closer, i):
            depth, i = depth - 1, i + len(closer)
            if depth == 0:
                return i == len(body)
        else:
            i += 1
    return False


def unwrap(text: str) -> tuple[str, bool]:
    """The reply without a quote or brace wrapping the whole of it, and whether there was one.

    An opener at the start that is never closed (「なるほど。…) is dropped too; quotes inside
    the reply (その「誠実」とは) stay."""
    body, wrapped = text.strip(), False
    changed = True
    while changed:
        changed = False
        for opener, closer in _WRAPPERS:
            if body.startswith(opener) and (body.endswith(closer) and _closes_at_end(body, opener, closer)
                                            or closer not in body):
                body = body[len(opener):].strip()
                body = body[:-len(closer)].strip() if body.endswith(closer) else body
                wrapped = changed = True
    return body, wrapped


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


def _capped(count: float, full_at: float) -> float:
    return min(1.0, count / full_at)


def combine(profile: StyleProfile, axis: str, features: dict[str, float]) -> float:
    """The axis score from its features with the profile's weights (a feature not weighted adds 0)."""
    model = getattr(profile.combine, axis)
    return _clip(model.intercept + sum(w * features.get(name, 0.0) for name, w in model.weights.items()))


class StyleScorer:
    """Scores replies against one profile; construct once and reuse (rules are precompiled)."""

    def __init__(self, profile: StyleProfile | None = None):
        self.profile = p = profile or load_profile(DEFAULT_PROFILE)
        self._endings, self._polite = _compile(p.tone.endings), _compile(p.tone.polite)
        self._address, self._questions = _compile(p.tone.address), _compile(p.approach.question_endings)
        self._invites, self._lecturing = _compile(p.approach.invitations), _compile(p.approach.lecturing)
        self._requests = _compile(p.approach.requests.endings)
        self._request_verbs = frozenset(p.approach.requests.verbs)
        self._answers, self._suggestions = _compile(p.approach.answer_giving), _compile(p.approach.suggestions)
        # "(?!)" never matches: a profile may list no special tokens.
        self._special = re.compile("|".join(f"(?:{s})" for s in p.format.special_tokens or ["(?!)"]))
        self._content_pos = [tuple(x.split(",")) for x in p.logic.content_pos]
        self._stop = frozenset(p.logic.stop_lemmas)
        _tokenizer()  # load the dictionary now rather than inside the first score() call

    def features(self, text: str, prompt: str | None = None) -> tuple[dict[str, dict[str, float]], list[str]]:
        """Every axis's features in [0, 1] and the evidence; empty features for an empty reply."""
        if not text.strip():
            return {}, ["empty reply"]
        notes: list[str] = []
        feats: dict[str, dict[str, float]] = {}
        feats["format"], clean = self._format(text, notes)
        sentences = _sentences(clean)
        if not sentences:
            notes.append("no words left once markup and special tokens are removed")
            return {"format": feats["format"]}, notes
        not_japanese = feats["format"]["not_japanese"]
        # Counted on the raw text: the analysis text has U+FFFD and non-Japanese Han removed.
        garbled = (len(_GARBLED.findall(text)), _stray_kanji(text))
        feats["logic"] = self._logic(sentences, clean, prompt, garbled, notes)
        logic_model = self.profile.combine.logic.weights
        lost = sum(-logic_model.get(k, 0.0) * feats["logic"][k] for k in _DEGENERATE)
        degenerate = min(1.0, lost / self.profile.logic.degenerate_at)
        if degenerate:
            notes.append(f"degenerate text ({degenerate:.0%}): not Socrates speaking or asking, whatever its endings")
        asks, suggested = self._asks(sentences)
        feats["tone"] = {**self._tone(sentences, asks, notes), "not_japanese": not_japanese, "degenerate": degenerate}
        feats["approach"] = {**self._approach(sentences, asks, suggested, notes), "degenerate": degenerate}
        return feats, notes

    def score(self, text: str, prompt: str | None = None) -> StyleScore:
        """Score one reply; ``prompt`` (the user's message) lets logic check relevance."""
        feats, notes = self.features(text, prompt)
        if not feats:
            return StyleScore(0.0, 0.0, 0.0, 0.0, 0.0, notes)
        axes = {axis: combine(self.profile, axis, feats[axis]) if axis in feats else 0.0 for axis in AXES}
        w = self.profile.overall_weights.model_dump()
        overall = sum(w[a] * axes[a] for a in AXES) / sum(w.values())
        return StyleScore(**axes, overall=_clip(overall), explanations=notes,
                          features={a: {k: round(v, 4) for k, v in f.items()} for a, f in feats.items()})

    def _format(self, text: str, notes: list[str]) -> tuple[dict[str, float], str]:
        """Format features and the text to analyse: unwrapped, without special tokens and markup."""
        found: dict[str, list[str]] = {}
        body, wrapped = unwrap(text)
        if wrapped:
            notes.append("the whole reply is wrapped in quotes or braces (read as the reply's own speech)")
        found["special_token"] = self._special.findall(body)
        body = self._special.sub("", body)
        found["markup"] = _HTML.findall(body) + [m.strip() for m in _MARKDOWN.findall(body)]
        body = _MARKDOWN.sub("", _HTML.sub("", body))
        # A literal backslash-n (an escaping slip in data or generation) is one broken line
        # break, not English plus a stray symbol; the analysis reads it as the break it meant.
        literal_breaks = body.count("\\n")
        clean = body.replace("\\n", "\n").strip()
        found["replacement_char"] = [_REPLACEMENT] * clean.count(_REPLACEMENT)
        found["emoji"] = _EMOJI.findall(clean)
        rest = _EMOJI.sub("", clean).replace(_REPLACEMENT, "")
        english = _ENGLISH.findall(rest)
        rest = _ENGLISH_RUN.sub("", rest)
        foreign = _FOREIGN.findall(rest) + [c for c in _HAN.findall(rest) if not _japanese_han(c)]
        found["other_language"] = english + foreign
        rest = "".join(c for c in _FOREIGN.sub("", rest) if not (_HAN.match(c) and not _japanese_han(c)))
        punct_runs = [m.group(0) for m in _PUNCT_RUN.finditer(rest)]
        rest = _PUNCT_RUN.sub("", rest)
        allowed = self.profile.format.allowed_symbols
        found["stray_symbol"] = punct_runs + [c for c in rest
                                              if not (c.isspace() or c.isdigit() or _JAPANESE.match(c) or c in allowed)]
        found["odd_space"] = _SPACES.findall(rest.strip())
        runs = [m.group(0) for m in _CHAR_RUN.finditer(clean)]
        mid_sentence = [c for i, c in enumerate(clean) if c == "\n" and clean[i - 1] not in _LINE_END_OK]
        found["odd_line_break"] = ["\\n"] * literal_breaks + re.findall(r"\r|\n{3,}", clean) + mid_sentence
        labels = {"special_token": "special token", "markup": "markup", "emoji": "emoji",
                  "other_language": "not Japanese:", "stray_symbol": "stray symbol"}
        for kind, label in labels.items():
            notes.extend(f"{label} {f!r}" for f in dict.fromkeys(found[kind]))
        notes.extend(f"character run {r!r}" for r in dict.fromkeys(runs))
        if found["replacement_char"]:
            notes.append(f"{len(found['replacement_char'])} U+FFFD replacement character(s) (an invalid byte sequence)")
        if found["odd_space"]:
            notes.append(f"{len(found['odd_space'])} run(s) of spaces inside the text")
        if found["odd_line_break"]:
            notes.append(f"{len(found['odd_line_break'])} odd line break(s)"
                         " (mid-sentence, blank runs or a literal \\n)")
        japanese = sum(not (_HAN.match(c) and not _japanese_han(c)) for c in _JAPANESE.findall(clean))
        other = sum(map(len, found["other_language"]))
        ja_share = japanese / (japanese + other) if japanese else 0.0
        if ja_share < 1:
            notes.append(f"Japanese is {ja_share:.0%} of the letters")
        # Junk (stray symbols, U+FFFD, a run's characters beyond three) counts by its share of the
        # text: a reply that is mostly 、、、 or 666 is not readable whatever else it holds.
        visible = sum(not c.isspace() for c in clean)
        junk = (sum(map(len, found["stray_symbol"])) + len(found["replacement_char"])
                + sum(len(run) - 3 for run in runs))
        readable = max(0.0, 1 - junk / visible) if visible else 0.0
        if readable < 1:
            notes.append(f"{1 - readable:.0%} of the characters are stray symbols, U+FFFD or repeated runs")
        features = {
            "special_token": _capped(len(found["special_token"]), 2),
            "markup": _capped(len(found["markup"]), 2),
            "emoji": _capped(len(found["emoji"]), 3),
            "other_language": _capped(len(found["other_language"]), 4),
            "replacement_char": _capped(len(found["replacement_char"]), 1),
            "stray_symbol": _capped(len(found["stray_symbol"]) + len(runs), 4),
            "odd_space": _capped(len(found["odd_space"]), 2),
            "odd_line_break": _capped(len(found["odd_line_break"]), 2),
            "wrapped": float(wrapped),
            "not_japanese": 1 - ja_share * readable,
        }
        # Emoji, U+FFFD and other languages are format's concern; left in, they would read as
        # unknown words (word salad) to the Japanese analyser.
        analysed = _EMOJI.sub("", clean).replace(_REPLACEMENT, "")
        analysed = _FOREIGN.sub("", _ENGLISH_RUN.sub(" ", analysed))
        analysed = "".join(c for c in analysed if not (_HAN.match(c) and not _japanese_han(c)))
        analysed = _SPACES.sub(" ", analysed).strip()
        return features, analysed

    def _tone(self, sentences: list[_Sentence], asks: list[bool], notes: list[str]) -> dict[str, float]:
        rules = self.profile.tone
        credits, polite_chars = [], 0
        for n, s in enumerate(sentences, 1):
            ending, last = _best_ending(self._endings, s.morphs), s.morphs[-1]
            if ending:
                credit, what = ending[1], f"ends with {ending[0]}"
            elif last.pos[0] in ("動詞", "形容詞", "助動詞") and last.pos[5].startswith(("終止形", "命令形")):
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
        address = sorted({r[0] for r in _found(self._address, [m for s in sentences for m in s.morphs])})
        notes.extend(f"address term {a}" for a in address)
        held = sum(c >= rules.held_credit for c in credits)
        return {
            "socratic_endings": sum(c * len(s.text) for c, s in zip(credits, sentences)) / total,
            "socratic_count": _capped(held, 3),
            "best_ending": max(credits),
            "address": float(bool(address)),
            "asks": sum(asks) / len(sentences),
            "polite": polite_chars / total,
        }

    def _asks(self, sentences: list[_Sentence]) -> tuple[list[bool], list[list[_Rule]]]:
        """Which sentences ask a question, and the suggestion markers found in each: a
        suggestion put as a question (〜てはいかがでしょうか？) gives advice, it does not ask."""
        marks = self.profile.approach.question_marks
        suggested = [_found(self._suggestions, _own(s.morphs)) for s in sentences]
        asks = [not hints and (bool(s.closer) and s.closer in marks
                               or _best_ending(self._questions, s.morphs) is not None)
                for s, hints in zip(sentences, suggested)]
        return asks, suggested

    def _requests_telling(self, morphs: list[_Morph]) -> bool:
        """Whether the words hold a request that the user tell or think (説明してくれ): a request
        ending with a verb of telling or thinking at most _REQUEST_REACH morphemes before it
        (考え|て|み|て|ほしい, 聞か|せ|て|ほしい, 説明|し|て|くれ)."""
        return any(_match_at(morphs, i, specs)
                   and any(m.form in self._request_verbs for m in morphs[max(0, i - _REQUEST_REACH):i])
                   for _, _, specs in self._requests for i in range(len(morphs)))

    def _approach(self, sentences: list[_Sentence], asks: list[bool], suggested: list[list[_Rule]],
                  notes: list[str]) -> dict[str, float]:
        rules = self.profile.approach
        requests = [self._requests_telling(_own(s.morphs)) for s in sentences]
        statements = [s for s, a, r in zip(sentences, asks, requests) if not (a or r)]
        notes.append(f"{sum(asks)} of {len(sentences)} sentences ask a question")
        # A question about something (幸福とは何かね) moves thinking more than a bare request
        # for an opinion (どう思いますか).
        substance = any(self._content([s]) for s, a in zip(sentences, asks) if a)
        if any(asks) and not substance:
            notes.append("the questions name no content word (a bare request for an opinion)")
        notes.extend(f"sentence {n} asks the user to tell or think (a request, not an order)"
                     for n, r in enumerate(requests, 1) if r)
        invites = any(requests) or any(_found(self._invites, s.morphs) for s in sentences)
        if invites:
            notes.append("invites the user to think along")
        marked = {}
        for kind, rules_found in (("lecturing", self._lecturing), ("answer-giving", self._answers)):
            hits = [r for s in statements for r in _found(rules_found, _own(s.morphs))]
            notes.extend(f"{kind} marker {name}" for name in dict.fromkeys(r[0] for r in hits))
            marked[kind] = sum(r[1] for r in hits)
        hints = [r for found in suggested for r in found]
        notes.extend(f"suggestion marker {name}" for name in dict.fromkeys(r[0] for r in hints))
        told = sum(len(s.text) for s in statements)
        if told > rules.lecture_chars:
            notes.append(f"statements run {told} characters")
        share = told / sum(len(s.text) for s in sentences)
        if any(asks) and share > 0.5:
            notes.append(f"statements are {share:.0%} of the text")
        return {
            "asks": float(any(asks)),
            "question_share": min(1.0, sum(asks) / len(sentences) / 0.5),
            "ends_with_question": float(asks[-1]),
            "content_question": float(substance),
            "question_count": _capped(sum(asks), 3),
            "question_length": _capped(sum(len(s.text) for s, a in zip(sentences, asks) if a), 60),
            "invitation": float(invites),
            "lecturing": _capped(marked["lecturing"], 3),
            "answer_giving": _capped(marked["answer-giving"], 2),
            "suggestion": _capped(sum(r[1] for r in hints), 1),
            "explanation": min(1.0, max(0, told - rules.lecture_chars) / 200),
            # Beyond half the text, statements make the question an afterthought; a framing
            # sentence or two before a question stays below that.
            "statement_share": max(0.0, share - 0.5) / 0.5,
        }

    def _content(self, sentences: list[_Sentence]) -> list[str]:
        return [m.norm for s in sentences for m in s.morphs
                if any(m.pos[:len(p)] == p for p in self._content_pos) and m.norm not in self._stop]

    def _logic(self, sentences: list[_Sentence], clean: str, prompt: str | None, garbled: tuple[int, str],
               notes: list[str]) -> dict[str, float]:
        morphs = [m for s in sentences for m in s.morphs if m.pos[0] not in _SKIP]
        f = dict.fromkeys(("unknown_words", "garbled", "broken_grammar", "repetition", "stutter", "fragment",
                           "too_short", "no_predicate", "says_nothing", "off_topic", "echo"), 0.0)
        if len(morphs) < 12:
            # A few words rarely answer anything; graded, since そうなのかね？ is a reply too.
            f["too_short"] = 1 - len(morphs) / 12
            notes.append(f"only {len(morphs)} word(s)")
        # Word salad has neither a predicate nor a final particle (何かね has no verb but is fine).
        if not any(m.pos[0] in ("動詞", "形容詞", "助動詞", "形状詞") or m.pos[1] == "終助詞" for m in morphs):
            f["no_predicate"] = 1.0
            notes.append("no predicate (verb, adjective, copula or final particle)")
        # A reply names what it is about: one word is enough (では君は、幸福とは何だと考えるのかね？).
        # The tiny model's well-formed salad (ふむ、君は何をするものかね？) names nothing: one in
        # eight of its replies has no content word, none of 600 real Socrates turns.
        if not self._content(sentences):
            f["says_nothing"] = 1.0
            notes.append("names no content word (about nothing)")
        tail = sentences[-1].morphs[-1]
        if not sentences[-1].closer and not (tail.pos[1] == "終助詞" or tail.pos[0] in ("感動詞", "接続詞")
                                             or tail.pos[5].startswith(("終止形", "命令形"))):
            f["fragment"] = 1.0
            notes.append(f"cut off mid-sentence after '{tail.surface}'")
        texts = [s.text for s in sentences if len(s.text) >= 4]
        repeats = len(texts) - len(set(texts))
        grams = [tuple(m.surface for m in morphs[i:i + 4]) for i in range(len(morphs) - 3)]
        windows = 1 - len(set(grams)) / len(grams) if len(grams) >= 8 else 0.0
        if repeats:
            notes.append(f"{repeats} repeated sentence(s)")
        if windows > 0.1:
            notes.append(f"{windows:.0%} of 4-word windows repeat (loop)")
        f["repetition"] = min(1.0, repeats / 2 + max(0.0, windows - 0.1) * 2)
        # Stutter: a word or two said again at once (君、君、君は / 嫌いな、嫌いな); particles and
        # auxiliaries alone do not count.
        surfaces = [m.surface for m in morphs]
        stutters = sum(surfaces[i:i + n] == surfaces[i + n:i + 2 * n]
                       and (n > 1 or morphs[i].pos[0] not in ("助詞", "助動詞"))
                       for n in (1, 2, 3) for i in range(len(surfaces) - 2 * n + 1))
        if stutters:
            notes.append(f"{stutters} word(s) repeated at once (stutter)")
        f["stutter"] = _capped(stutters, 4)
        unknown = sum(m.oov for m in morphs) / max(1, len(morphs))
        if unknown:
            notes.append(f"{unknown:.0%} of words unknown to the dictionary")
        f["unknown_words"] = _capped(unknown, 0.3)
        # Garbled spots: a U+FFFD where a character should be (違�い), or a kanji that ordinary
        # Japanese prose never uses; one is enough, as it leaves a word nobody can read. Sudachi
        # knows almost every single kanji as a word, so 兛 in どちらが兛られる is not "unknown"
        # to it; a reader still cannot read the word.
        replaced, rare = garbled
        if replaced:
            notes.append(f"{replaced} garbled spot(s) (U+FFFD) where characters should be")
        if rare:
            notes.append(f"kanji outside everyday Japanese (JIS X 0208): {rare}")
        f["garbled"] = float(bool(replaced or rare))
        broken = _broken_grammar(sentences)
        notes.extend(f"broken grammar: {b}" for b in broken)
        f["broken_grammar"] = _capped(len(broken), 2)
        if prompt and prompt.strip():
            # Echo: the reply says the user's message back (a failure of small tuned models).
            echo_from = self.profile.logic.echo_from
            alike = SequenceMatcher(None, _core(prompt), _core(clean), autojunk=False).ratio()
            if alike > echo_from:
                f["echo"] = min(1.0, (alike - echo_from) / (1 - echo_from))
                notes.append(f"repeats the user's message ({alike:.0%} alike)")
            asked = set(self._content(_sentences(prompt)))
            wanted = min(self.profile.logic.overlap_wanted, len(asked))
            if wanted:
                shared = sorted(asked & set(self._content(sentences)))
                notes.append(f"shares {len(shared)} content word(s) with the prompt"
                             + (f" ({', '.join(shared[:5])})" if shared else ""))
                f["off_topic"] = 1 - min(len(shared), wanted) / wanted
        return f


# Logic features that mean the text is not language at all or not a reply (an echo); the
# points they cost logic, over the profile's degenerate_at, also lower tone and approach.
_DEGENERATE = ("unknown_words", "garbled", "broken_grammar", "repetition", "stutter", "no_predicate", "echo")


# Neighbours Japanese grammar does not allow, as (POS of a word, POS of the next): a
# sentence-final particle with the sentence going on (かね + 景), a case particle followed by
# a copula, final or conjunctive particle (が + だ, を + ね), particles doubled (は + は), a
# plain-form verb taking は directly (考える + は). Each is at most a few in ten thousand word
# pairs of the shared real Socratic dialogues, and common in shuffled text.
_IMPOSSIBLE = (
    (("助詞", "終助詞"), ("名詞",)), (("助詞", "終助詞"), ("動詞",)), (("助詞", "終助詞"), ("助詞", "格助詞")),
    (("助詞", "格助詞"), ("助動詞",)), (("助詞", "格助詞"), ("助詞", "終助詞")),
    (("助詞", "格助詞"), ("助詞", "接続助詞")),
    (("助詞", "係助詞"), ("助詞", "係助詞")), (("助詞", "係助詞"), ("助詞", "終助詞")),
    (("助詞", "副助詞"), ("助詞", "副助詞")),
)


# Case particles that may follow another one (への, との and any + の aside): in 400 real
# Socratic turns these were the only pairs of two case particles.
_CASE_PAIRS = frozenset({"へと", "からと", "からへ", "までを"})


# A particle needs a word before it. After 、 the tiny model writes one (は、も、 / 、、も) where
# real text has a conjunction (で of では, と of と、, which Sudachi tags as particles): in 1,800
# turns of the shared real dialogues another particle right after 、 came up 4 times (one a case
# particle, に), in the tiny model's replies once in 25. At a sentence start it is not counted:
# Gemma's stray closing line "かね？" reads to the external judge as a slip of format, not of logic.
_OPENING_PARTICLES = frozenset({"で", "と"})
# Case and binding particles only: など, か after 、 quote what went before (〜のか、などから).
_CLAUSE_PARTICLES = (("助詞", "格助詞"), ("助詞", "係助詞"))
_COMMAS = frozenset({"、", "，"})
# What an adnominal (その, この, どんな) cannot stand before: it modifies a noun, or a clause or
# modifier that leads to one (その満たされる感覚, その美しい花); before 、, a conjunction, a
# particle or an auxiliary it modifies nothing (その、いく / そのまたは / そのだね). One of 1,200
# real Socrates turns broke this (どのくらい, read as どの + くらい).
_NOT_MODIFIABLE = ("助詞", "助動詞", "接続詞", "感動詞", "補助記号")
_BRACKETS = ("括弧開", "括弧閉")  # quoted words are left out of ``ms``: その「不便」 leaves その + 」
_NOT_A_STEM = ("助詞", "助動詞", "補助記号", "感動詞", "接尾辞")


def _broken_grammar(sentences: list[_Sentence]) -> list[str]:
    """Sequences Japanese grammar does not allow, which word salad is full of: the neighbours
    in ``_IMPOSSIBLE``, two case particles (とが), a te-form particle after something that does
    not conjugate (景え + て),
    an interjection inside a clause, a suffix or prefix with nothing to attach to, a particle with
    no word before it (、も), an empty clause (、、) and an adnominal with nothing to modify (その、)."""
    found = []
    for s in sentences:
        # Punctuation stays in: words either side of 、 are not neighbours (〜かね、それとも).
        ms = [m for m in s.morphs if m.pos[0] != "空白" and not m.quoted]
        # Words after a blank: English removed for the analysis leaves one (能力、 owe など).
        spaced = {id(m) for prev, m in zip(s.morphs, s.morphs[1:]) if prev.pos[0] == "空白"}
        for i, m in enumerate(ms):
            before = ms[i - 1] if i else None
            after = ms[i + 1].surface if i + 1 < len(ms) else ""
            quoting = m.surface in ("と", "って")  # 〜かなと考える: a quoted question, not a broken one
            if (before is not None and before.pos[0] == "助詞" and not quoting
                    and any(before.pos[:len(a)] == a and m.pos[:len(b)] == b for a, b in _IMPOSSIBLE)):
                then = m.pos[1] if m.pos[1] != "*" else m.pos[0]
                found.append(f"'{before.surface}{m.surface}' ({before.pos[1]} then {then})")
            elif (before is not None and before.pos[:2] == m.pos[:2] == ("助詞", "格助詞")
                  and m.surface != "の" and before.surface + m.surface not in _CASE_PAIRS):
                found.append(f"'{before.surface}{m.surface}' (two case particles)")
            elif (before is not None and before.pos[0] == "動詞" and before.pos[5].startswith(("終止形", "連体形"))
                  and m.pos[1] == "係助詞" and m.surface == "は"):
                found.append(f"'{before.surface}{m.surface}' (plain verb then は)")
            elif m.pos[1] == "接続助詞" and m.surface in ("て", "で") and (
                    before is None or before.pos[0] not in ("動詞", "形容詞", "助動詞")):
                found.append(f"'{(before.surface if before else '') + m.surface}' (te-form after no verb)")
            elif m.pos[0] == "感動詞" and before is not None and i + 1 < len(ms) and ms[i + 1].pos[0] == "助詞":
                found.append(f"'{m.surface}{ms[i + 1].surface}' (interjection inside a clause)")
            elif m.pos[0] == "接尾辞" and (before is None or before.pos[0] in ("助詞", "助動詞")):
                found.append(f"'{m.surface}' (suffix with nothing to attach to)")
            elif (m.pos[:2] in _CLAUSE_PARTICLES and m.surface not in _OPENING_PARTICLES
                  and before is not None and before.surface in _COMMAS and id(m) not in spaced):
                found.append(f"'{before.surface}{m.surface}' (particle with no word before it)")
            elif m.surface in _COMMAS and before is not None and before.surface in _COMMAS:
                found.append(f"'{before.surface}{m.surface}' (an empty clause between commas)")
            elif m.pos[0] == "連体詞" and (i + 1 == len(ms) or ms[i + 1].pos[0] in _NOT_MODIFIABLE
                                           and ms[i + 1].pos[1] not in _BRACKETS):
                found.append(f"'{m.surface}{after}' (その/この with nothing to modify)")
            elif m.pos[0] == "接頭辞" and (i + 1 == len(ms) or ms[i + 1].pos[0] in _NOT_A_STEM):
                found.append(f"'{m.surface}{after}' (prefix with nothing to attach to)")
    return found


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

