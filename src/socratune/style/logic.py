"""Logic measurements: is the reply language, and a reply to what the user said?"""

from __future__ import annotations

from difflib import SequenceMatcher

from .format import core_text
from .grammar import broken_grammar
from .morphology import SKIP, Scorer, Sentence, capped, content_words, split_sentences


def logic_features(scorer: Scorer, sentences: list[Sentence], clean: str, prompt: str | None,
                   garbled: tuple[int, str], notes: list[str]) -> dict[str, float]:
    morphs = [m for s in sentences for m in s.morphs if m.pos[0] not in SKIP]
    f = dict.fromkeys(("unknown_words", "garbled", "broken_grammar", "repetition", "stutter", "fragment",
                       "too_short", "no_predicate", "says_nothing", "off_topic", "off_prompt", "echo"), 0.0)
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
    if not content_words(scorer, sentences):
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
    # A window that starts with a particle is a phrase boundary, not a stutter (では、君は君自身:
    # は+君 twice).
    stutters = sum(surfaces[i:i + n] == surfaces[i + n:i + 2 * n] and morphs[i].pos[0] not in ("助詞", "助動詞")
                   for n in (1, 2, 3) for i in range(len(surfaces) - 2 * n + 1))
    if stutters:
        notes.append(f"{stutters} word(s) repeated at once (stutter)")
    f["stutter"] = capped(stutters, 4)
    unknown = sum(m.oov for m in morphs) / max(1, len(morphs))
    if unknown:
        notes.append(f"{unknown:.0%} of words unknown to the dictionary")
    f["unknown_words"] = capped(unknown, 0.3)
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
    broken = broken_grammar(sentences)
    notes.extend(f"broken grammar: {b}" for b in broken)
    f["broken_grammar"] = capped(len(broken), 2)
    if prompt and prompt.strip():
        _fit_to_prompt(scorer, sentences, clean, prompt, f, notes)
    return f


def _fit_to_prompt(scorer: Scorer, sentences: list[Sentence], clean: str, prompt: str, f: dict[str, float],
                   notes: list[str]) -> None:
    """How the reply fits the user's message: an echo of it, how many of its content words are
    taken up (off_topic), and what share of the reply's own content words are the prompt's
    (off_prompt). A reply to *this* message builds on its words (君の言う幸福とは); a reply that
    would fit any message (その気に向いたのかね？) takes few or none. On the 2,662 shared real
    dialogues, a Socrates turn takes a median 29% of its content words from its user turn, 14%
    at the tenth percentile; paired with another dialogue's user turn, a median 7%."""
    rules = scorer.profile.logic
    # Echo: the reply says the user's message back (a failure of small tuned models).
    alike = SequenceMatcher(None, core_text(prompt), core_text(clean), autojunk=False).ratio()
    if alike > rules.echo_from:
        f["echo"] = min(1.0, (alike - rules.echo_from) / (1 - rules.echo_from))
        notes.append(f"repeats the user's message ({alike:.0%} alike)")
    asked = set(content_words(scorer, split_sentences(prompt)))
    wanted = min(rules.overlap_wanted, len(asked))
    if not wanted:
        return
    said = set(content_words(scorer, sentences))
    shared = sorted(asked & said)
    notes.append(f"shares {len(shared)} content word(s) with the prompt"
                 + (f" ({', '.join(shared[:5])})" if shared else ""))
    f["off_topic"] = 1 - min(len(shared), wanted) / wanted
    share = len(shared) / len(said) if said else 0.0  # naming nothing, it takes up nothing
    f["off_prompt"] = 1 - min(1.0, share / rules.fit_wanted)
    if f["off_prompt"]:
        notes.append(f"{share:.0%} of the reply's content words are the prompt's (fits at {rules.fit_wanted:.0%})")
