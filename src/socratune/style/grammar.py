"""Grammar measurements: word sequences Japanese does not allow, which word salad is full of."""

from __future__ import annotations

from .morphology import Sentence

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


def broken_grammar(sentences: list[Sentence]) -> list[str]:
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
