"""The Japanese analysis every axis reads: Sudachi morphemes, sentences, marker matching.

Why Sudachi: a pure pip install whose dictionary ships as a wheel; dictionary and normalized
forms (だろう -> だ, でしょう -> です) let one rule cover every conjugation, and part-of-speech
tags tell auxiliaries and final particles from look-alikes. Layer 0: no torch or transformers.
"""

from __future__ import annotations

import re
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

from sudachipy import Dictionary, SplitMode

from .profile import Marker, StyleProfile


def capped(count: float, full_at: float) -> float:
    """A count as a feature in [0, 1], full at ``full_at``."""
    return min(1.0, count / full_at)


class Morph(NamedTuple):
    surface: str
    form: str  # dictionary form
    norm: str  # normalized form, for comparing content words
    pos: tuple[str, ...]  # six fields; [5] is the conjugation form
    oov: bool
    quoted: bool = False  # inside 「」 or other brackets: someone else's words, not the reply's voice


Spec = tuple[str | None, str | None, tuple[str, ...], str | None]  # form, surface, pos prefix, conj
Rule = tuple[str, float, tuple[Spec, ...]]  # marker name, weight, specs


class Scorer(Protocol):
    """What the per-axis measurements read from a ``scorer.StyleScorer``: its profile and the
    profile's markers compiled once. A Protocol, so the axis modules need not import the scorer
    that imports them."""

    profile: StyleProfile
    _endings: list[Rule]
    _polite: list[Rule]
    _address: list[Rule]
    _questions: list[Rule]
    _invites: list[Rule]
    _lecturing: list[Rule]
    _requests: list[Rule]
    _request_verbs: frozenset[str]
    _answers: list[Rule]
    _suggestions: list[Rule]
    _special: re.Pattern[str]
    _content_pos: list[tuple[str, ...]]
    _stop: frozenset[str]


def compile_markers(markers: list[Marker]) -> list[Rule]:
    return [(m.name, m.weight, tuple((t.form, t.surface, tuple(t.pos.split(",")) if t.pos else (), t.conj)
                                     for t in m.tokens)) for m in markers]


def match_at(morphs: list[Morph], i: int, specs: tuple[Spec, ...]) -> bool:
    if i < 0 or i + len(specs) > len(morphs):
        return False
    return all((form is None or m.form == form) and (surface is None or m.surface == surface)
               and m.pos[:len(pos)] == pos and (conj is None or m.pos[5].startswith(conj))
               for m, (form, surface, pos, conj) in zip(morphs[i:], specs))


def find_rules(rules: list[Rule], morphs: list[Morph]) -> list[Rule]:
    """Rules matching anywhere in ``morphs``, once per occurrence."""
    # The cheap first-token check before the full match keeps scoring at hundreds of replies/s.
    return [r for r in rules for i, m in enumerate(morphs)
            if (r[2][0][0] is None or m.form == r[2][0][0]) and (r[2][0][1] is None or m.surface == r[2][0][1])
            and match_at(morphs, i, r[2])]


def own_words(morphs: list[Morph]) -> list[Morph]:
    """The reply's own words: quoted speech (「私は守ります」と言う) is left out of register and
    lecturing checks, as a reader does."""
    return [m for m in morphs if not m.quoted]


def best_ending(rules: list[Rule], morphs: list[Morph]) -> Rule | None:
    hits = [r for r in rules if match_at(morphs, len(morphs) - len(r[2]), r[2])]
    return max(hits, key=lambda r: r[1]) if hits else None


_thread = threading.local()


@lru_cache(maxsize=1)
def _dictionary() -> Dictionary:
    return Dictionary()  # loads sudachidict-core once per process, on first use, not at import


def tokenizer() -> Any:
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
SKIP = ("補助記号", "空白")  # punctuation and blanks
PERIOD = ("補助記号", "句点")  # 。？！


@dataclass
class Sentence:
    morphs: list[Morph]  # without closing punctuation, brackets or blanks
    text: str
    closer: str  # 。 ？ etc., or "" when the line ended without one


def split_sentences(text: str) -> list[Sentence]:
    """Split on sentence-final punctuation (補助記号-句点) outside 「」 and on line breaks."""
    out: list[Sentence] = []
    for line in text.split("\n"):
        current: list[Morph] = []
        depth = 0
        morphs = [m for start in range(0, len(line), _CHUNK) for m in tokenizer().tokenize(line[start:start + _CHUNK])]
        for i, m in enumerate(morphs):
            pos = tuple(m.part_of_speech())
            depth += (pos[1] == "括弧開") - (pos[1] == "括弧閉" and depth > 0)
            morph = Morph(m.surface(), m.dictionary_form(), m.normalized_form(), pos, m.is_oov(), depth > 0)
            current.append(morph)
            if i == len(morphs) - 1 or (morph.pos[:2] == PERIOD and depth == 0):
                core = len(current)
                while core and current[core - 1].pos[0] in SKIP:
                    core -= 1
                closer = next((c.surface for c in current[core:] if c.pos[:2] == PERIOD), "")
                if core:
                    out.append(Sentence(current[:core], "".join(c.surface for c in current[:core]), closer))
                current = []
    return out


def content_words(scorer: Scorer, sentences: list[Sentence]) -> list[str]:
    return [m.norm for s in sentences for m in s.morphs
            if any(m.pos[:len(p)] == p for p in scorer._content_pos) and m.norm not in scorer._stop]
