"""Tone measurements: does the reply sound like the persona (endings, address, register)?"""

from __future__ import annotations

from .morphology import Scorer, Sentence, best_ending, capped, content_words, find_rules, own_words

_OPENER_CHARS = 6  # at most this long, asking nothing and naming nothing: an opener
_BARE_QUESTION_WORDS = 3  # そう|な|の？ / ああ、そう|か。 ask nothing; 君|は|どう|思う？ does


def _opener(scorer: Scorer, sentence: Sentence, asks: bool) -> bool:
    return not asks and len(sentence.text) <= _OPENER_CHARS and not content_words(scorer, [sentence])


def tone_features(scorer: Scorer, sentences: list[Sentence], asks: list[bool], degenerate: float,
                  notes: list[str]) -> dict[str, float]:
    """Tone features in [0, 1]; ``degenerate`` (how far the text is not language) discounts the
    credit of in-character questions: word salad ending in 〜かね？ is not Socrates asking."""
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
    # A short opener that says nothing (なるほど。, ふむ。, そうだね。) before the reply proper is
    # neither in nor out of character: it is left out of the shares, so a short question after it
    # counts as the whole of the reply's voice.
    kept = [i for i, s in enumerate(sentences) if not _opener(scorer, s, asks[i])] or list(range(len(sentences)))
    voiced = [sentences[i] for i in kept]
    total = sum(len(s.text) for s in voiced)
    address = sorted({r[0] for r in find_rules(scorer._address, [m for s in sentences for m in s.morphs])})
    notes.extend(f"address term {a}" for a in address)
    held = sum(c >= rules.held_credit for c in credits)
    asked = [c for c, a in zip(credits, asks) if a]
    in_character = (1 - degenerate) * sum(c >= rules.held_credit for c in asked) / len(asked) if asked else 0.0
    if asked:
        notes.append(f"{in_character:.0%} of the questions end in held Socratic speech")
    # なるほど。 / そうだね。 alone: an acknowledgement that says nothing and asks nothing is
    # not Socrates speaking, whatever its ending (the external judge rates it tone 0).
    # そうなの？ / そうか。 (read as asking) is no more: a question this short that names nothing.
    words = sum(m.pos[0] not in ("感動詞", "補助記号", "空白") for s in sentences for m in s.morphs)
    short = words <= _BARE_QUESTION_WORDS
    acknowledgement = float((not asked or short) and not content_words(scorer, sentences))
    if acknowledgement:
        notes.append("a bare acknowledgement: no content word and no question")
    return {
        "socratic_endings": sum(credits[i] * len(sentences[i].text) for i in kept) / total,
        "socratic_count": capped(held, 3),
        "best_ending": max(credits),
        "address": float(bool(address)),
        "asks": sum(asks[i] for i in kept) / len(kept),
        "polite": min(1.0, polite_chars / total),
        "in_character_question": in_character,
        "acknowledgement": acknowledgement,
    }
