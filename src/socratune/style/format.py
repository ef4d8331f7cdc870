"""Format measurements: surface patterns of a reply (regexes are the right tool here).

Special tokens, markup, emoji, other languages, U+FFFD, stray symbols, spacing, line breaks, a
whole-reply wrapper; and the text the Japanese analysis reads (unwrapped, without the above).
Layer 0: no torch or transformers.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .morphology import Scorer, capped, tokenizer

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


def core_text(text: str) -> str:
    """Text without punctuation and blanks, for comparing wording."""
    return _NOT_CORE.sub("", text)


_LINE_END_OK = "。？！?!」』）)…\n"

# Whole-reply wrappers, outermost first: Gemma-2-jpn often quotes its whole reply (「…」) and
# some checkpoints add template braces ({{「…」}}).
_WRAPPERS = (("{{", "}}"), ("「", "」"), ("『", "』"))
_MARKDOWN = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__|```|^[ \t]{0,3}(?:#{1,6}[ \t]|[-*+][ \t]|>[ \t]?|\d+\.[ \t])",
                       re.MULTILINE)
_REPLACEMENT = "\ufffd"  # what an invalid byte sequence decodes to
GARBLED = re.compile(f"{_REPLACEMENT}+")  # one run of U+FFFD is one unreadable spot


def stray_kanji(text: str) -> str:
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


def unwrap_kinds(text: str) -> tuple[str, set[str]]:
    """The reply without the quotes or braces wrapping the whole of it, and which of them there
    were: ``quotes`` (「…」, 『…』) and ``braces`` ({{…}}, a template's).

    An opener at the start that is never closed (「なるほど。…) is dropped too; quotes inside
    the reply (その「誠実」とは) stay."""
    body, kinds = text.strip(), set()
    changed = True
    while changed:
        changed = False
        for opener, closer in _WRAPPERS:
            if body.startswith(opener) and (body.endswith(closer) and _closes_at_end(body, opener, closer)
                                            or closer not in body):
                body = body[len(opener):].strip()
                body = body[:-len(closer)].strip() if body.endswith(closer) else body
                kinds.add("braces" if opener == "{{" else "quotes")
                changed = True
    return body, kinds


def unwrap(text: str) -> tuple[str, bool]:
    """The reply without a quote or brace wrapping the whole of it, and whether there was one."""
    body, kinds = unwrap_kinds(text)
    return body, bool(kinds)


# Lowercase Latin letters with a Japanese letter right before and after, no space (考えmasu,
# 概nen念): a word broken by a tokenizer slip. Lowercase only: names and acronyms written in
# Latin letters (AさんとBさん, YouTubeチャンネル, fMRIの) are ordinary Japanese prose.
_JA_CLASS = "\u3040-\u309F\u30A0-\u30FF\u3400-\u4DBF\u4E00-\u9FFF々"
_LATIN_IN_WORD = re.compile(f"(?<![A-Za-z])(?<=[{_JA_CLASS}])[a-z]+(?=[{_JA_CLASS}])")
# An English word inside a Japanese sentence (確かに難しい indeed。, この paradoxical な): Japanese or
# 、 on one side at most a space away, so an interjection standing as its own sentence (Hmm。,
# Hmm... 君は) is not. Lowercase words of two letters or more only: on the 5,324 turns of the
# shared real dialogues, what else stands there is a name (SlackやGitHub, Wi-Fi, fMRI, SNS).
_WORD = "(?<![A-Za-z])[a-z]{2,}(?![A-Za-z])"
_ENGLISH_IN_SENTENCE = re.compile(
    f"(?<=[{_JA_CLASS}、])[ \\t\u3000]*{_WORD}(?:[ \\t]+[A-Za-z]+)*"
    f"|{_WORD}(?:[ \\t]+[A-Za-z]+)*(?=[ \\t\u3000]*[{_JA_CLASS}、])")
_BRACES = re.compile("[{}｛｝]+")


def _breakers(scorer: Scorer, body: str) -> tuple[dict[str, list[str]], str]:
    """Special tokens, markup, U+FFFD, emoji and other languages found in ``body``, and the
    text that is left once they are taken out (for the symbol and spacing checks)."""
    found: dict[str, list[str]] = {"special_token": scorer._special.findall(body)}
    body = scorer._special.sub("", body)
    found["markup"] = _HTML.findall(body) + [m.strip() for m in _MARKDOWN.findall(body)]
    body = _MARKDOWN.sub("", _HTML.sub("", body))
    # A literal backslash-n (an escaping slip in data or generation) is one broken line
    # break, not English plus a stray symbol; the analysis reads it as the break it meant.
    found["literal_break"] = ["\\n"] * body.count("\\n")
    clean = body.replace("\\n", "\n").strip()
    found["replacement_char"] = [_REPLACEMENT] * clean.count(_REPLACEMENT)
    found["emoji"] = _EMOJI.findall(clean)
    rest = _EMOJI.sub("", clean).replace(_REPLACEMENT, "")
    found["latin_in_word"] = _LATIN_IN_WORD.findall(rest)
    found["english_in_sentence"] = [m.strip() for m in _ENGLISH_IN_SENTENCE.findall(rest)]
    english = _ENGLISH.findall(rest)
    rest = _ENGLISH_RUN.sub("", rest)
    foreign = _FOREIGN.findall(rest) + [c for c in _HAN.findall(rest) if not _japanese_han(c)]
    found["other_language"] = english + foreign
    rest = "".join(c for c in _FOREIGN.sub("", rest) if not (_HAN.match(c) and not _japanese_han(c)))
    found["braces"] = _BRACES.findall(rest)
    rest = _BRACES.sub("", rest)
    found["clean"] = [clean]
    return found, rest


def _split_endings(clean: str) -> list[str]:
    """Lines after a line break that hold only a sentence ending (…でしょう？⏎かね？): an ending
    split off its sentence."""
    out = []
    for line in clean.split("\n")[1:]:
        line = line.strip()
        if not line or len(line) > 8:
            continue
        morphs = [m for m in tokenizer().tokenize(line) if m.part_of_speech()[0] not in ("補助記号", "空白")]
        if morphs and all(m.part_of_speech()[0] in ("助詞", "助動詞") for m in morphs):
            out.append(line)
    return out


def _notes(found: dict[str, list[str]], runs: list[str], notes: list[str]) -> None:
    labels = {"special_token": "special token", "markup": "markup", "emoji": "emoji",
              "other_language": "not Japanese:", "stray_symbol": "stray symbol",
              "latin_in_word": "Latin letters breaking a Japanese word:",
              "english_in_sentence": "an English word inside a Japanese sentence:",
              "split_ending": "a sentence ending on a line of its own:", "braces": "braces"}
    for kind, label in labels.items():
        notes.extend(f"{label} {f!r}" for f in dict.fromkeys(found[kind]))
    notes.extend(f"character run {r!r}" for r in dict.fromkeys(runs))
    if found["replacement_char"]:
        notes.append(f"{len(found['replacement_char'])} U+FFFD replacement character(s) (an invalid byte sequence)")
    if found["odd_space"]:
        notes.append(f"{len(found['odd_space'])} run(s) of spaces inside the text")
    if found["odd_line_break"]:
        notes.append(f"{len(found['odd_line_break'])} odd line break(s) (mid-sentence, blank runs or a literal \\n)")


def _analysed(clean: str) -> str:
    """The text the Japanese analysis reads: emoji, U+FFFD and other languages are format's
    concern; left in, they would read as unknown words (word salad) to the analyser."""
    analysed = _EMOJI.sub("", clean).replace(_REPLACEMENT, "")
    analysed = _FOREIGN.sub("", _ENGLISH_RUN.sub(" ", analysed))
    analysed = "".join(c for c in analysed if not (_HAN.match(c) and not _japanese_han(c)))
    return _SPACES.sub(" ", analysed).strip()


def format_features(scorer: Scorer, text: str, notes: list[str]) -> tuple[dict[str, float], str]:
    """Format features and the text to analyse: unwrapped, without special tokens and markup."""
    body, kinds = unwrap_kinds(text)
    if "quotes" in kinds:
        notes.append("the whole reply is wrapped in quotes 「…」 (read as the reply's own speech)")
    if "braces" in kinds:
        notes.append("the whole reply is wrapped in template braces {{…}}")
    found, rest = _breakers(scorer, body)
    clean = found.pop("clean")[0]
    punct_runs = [m.group(0) for m in _PUNCT_RUN.finditer(rest)]
    rest = _PUNCT_RUN.sub("", rest)
    allowed = scorer.profile.format.allowed_symbols
    found["stray_symbol"] = punct_runs + [c for c in rest
                                          if not (c.isspace() or c.isdigit() or _JAPANESE.match(c) or c in allowed)]
    found["odd_space"] = _SPACES.findall(rest.strip())
    runs = [m.group(0) for m in _CHAR_RUN.finditer(clean)]
    mid_sentence = [c for i, c in enumerate(clean) if c == "\n" and clean[i - 1] not in _LINE_END_OK]
    found["odd_line_break"] = found["literal_break"] + re.findall(r"\r|\n{3,}", clean) + mid_sentence
    found["split_ending"] = _split_endings(clean) if "\n" in clean else []
    _notes(found, runs, notes)
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
    counts = {k: len(v) for k, v in found.items()}
    features = {name: capped(counts[name], full_at) for name, full_at in _FULL_AT.items()}
    features["stray_symbol"] = capped(counts["stray_symbol"] + len(runs), 4)
    features["braces"] = capped(counts["braces"] + ("braces" in kinds), 1)
    features["wrapped"] = float("quotes" in kinds)
    features["not_japanese"] = 1 - ja_share * readable
    return features, _analysed(clean)


# Count at which each format feature is full. One special token, one piece of markup, one Latin
# run inside a word, one English word inside a sentence or one split-off ending is a format
# breaker on its own: the external judge rates each 0-2 (issue 29, class 3).
_FULL_AT = {"special_token": 1, "markup": 1, "emoji": 3, "other_language": 4, "replacement_char": 1,
            "odd_space": 2, "odd_line_break": 2, "latin_in_word": 1, "english_in_sentence": 1, "split_ending": 1}
