"""Tone measurements: does the reply sound like the persona (endings, address, register)?"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .morphology import Sentence, best_ending, capped, find_rules, own_words

if TYPE_CHECKING:
    from .scorer import StyleScorer


def tone_features(scorer: StyleScorer, sentences: list[Sentence], asks: list[bool],
                  notes: list[str]) -> dict[str, float]:
    rules = scorer.profile.tone
    credits, polite_chars = [], 0
    for n, s in enumerate(sentences, 1):
        ending, last = best_ending(scorer._endings, s.morphs), s.morphs[-1]
        if ending:
            credit, what = ending[1], f"ends with {ending[0]}"
        elif last.pos[0] in ("動詞", "形容詞", "助動詞") and last.pos[5].startswith(("終止形", "命令形")):
            credit, what = rules.plain_ending_weight, "ends in plain form"
        else:
            credit, what = rules.other_ending_weight, "has no in-character ending"
        polite = sorted({r[0] for r in find_rules(scorer._polite, own_words(s.morphs))})
        if polite:
            credit *= rules.polite_sentence_credit
            polite_chars += len(s.text)
            notes.append(f"polite speech {'/'.join(polite)} in sentence {n}")
        notes.append(f"sentence {n} {what} (tone credit {credit:.2f})")
        credits.append(credit)
    total = sum(len(s.text) for s in sentences)
    address = sorted({r[0] for r in find_rules(scorer._address, [m for s in sentences for m in s.morphs])})
    notes.extend(f"address term {a}" for a in address)
    held = sum(c >= rules.held_credit for c in credits)
    return {
        "socratic_endings": sum(c * len(s.text) for c, s in zip(credits, sentences)) / total,
        "socratic_count": capped(held, 3),
        "best_ending": max(credits),
        "address": float(bool(address)),
        "asks": sum(asks) / len(sentences),
        "polite": polite_chars / total,
    }
