"""Approach measurements: does the reply make the user think by asking, or lecture?"""

from __future__ import annotations

from .morphology import (
    Morph,
    Rule,
    Scorer,
    Sentence,
    best_ending,
    capped,
    content_words,
    find_rules,
    match_at,
    own_words,
)

_REQUEST_REACH = 4  # morphemes before a request searched for its verb: 考え|て|み|て + ほしい


def asking(scorer: Scorer, sentences: list[Sentence]) -> tuple[list[bool], list[list[Rule]]]:
    """Which sentences ask a question, and the suggestion markers found in each: a
    suggestion put as a question (〜てはいかがでしょうか？) gives advice, it does not ask."""
    marks = scorer.profile.approach.question_marks
    suggested = [find_rules(scorer._suggestions, own_words(s.morphs)) for s in sentences]
    asks = [not hints and (bool(s.closer) and s.closer in marks
                           or best_ending(scorer._questions, s.morphs) is not None)
            for s, hints in zip(sentences, suggested)]
    return asks, suggested


def _requests_telling(scorer: Scorer, morphs: list[Morph]) -> bool:
    """Whether the words hold a request that the user tell or think (説明してくれ): a request
    ending with a verb of telling or thinking at most _REQUEST_REACH morphemes before it
    (考え|て|み|て|ほしい, 聞か|せ|て|ほしい, 説明|し|て|くれ)."""
    return any(match_at(morphs, i, specs)
               and any(m.form in scorer._request_verbs for m in morphs[max(0, i - _REQUEST_REACH):i])
               for _, _, specs in scorer._requests for i in range(len(morphs)))


def approach_features(scorer: Scorer, sentences: list[Sentence], asks: list[bool],
                      suggested: list[list[Rule]], notes: list[str]) -> dict[str, float]:
    rules = scorer.profile.approach
    requests = [_requests_telling(scorer, own_words(s.morphs)) for s in sentences]
    statements = [s for s, a, r in zip(sentences, asks, requests) if not (a or r)]
    notes.append(f"{sum(asks)} of {len(sentences)} sentences ask a question")
    # A question about something (幸福とは何かね) moves thinking more than a bare request
    # for an opinion (どう思いますか).
    substance = any(content_words(scorer, [s]) for s, a in zip(sentences, asks) if a)
    if any(asks) and not substance:
        notes.append("the questions name no content word (a bare request for an opinion)")
    notes.extend(f"sentence {n} asks the user to tell or think (a request, not an order)"
                 for n, r in enumerate(requests, 1) if r)
    invites = any(requests) or any(find_rules(scorer._invites, s.morphs) for s in sentences)
    if invites:
        notes.append("invites the user to think along")
    marked = {}
    for kind, rules_found in (("lecturing", scorer._lecturing), ("answer-giving", scorer._answers)):
        hits = [r for s in statements for r in find_rules(rules_found, own_words(s.morphs))]
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
        # 〜でしょうか。 closed by 。 muses or hedges; a question put to the user carries ？. On the
        # shared real dialogues 92% of Socrates' questions carry one, 21% of the students'.
        "marked_question": float(any(a and s.closer in rules.question_marks for s, a in zip(sentences, asks))),
        "question_share": min(1.0, sum(asks) / len(sentences) / 0.5),
        "ends_with_question": float(asks[-1]),
        "content_question": float(substance),
        "question_count": capped(sum(asks), 3),
        "question_length": capped(sum(len(s.text) for s, a in zip(sentences, asks) if a), 60),
        "invitation": float(invites),
        "lecturing": capped(marked["lecturing"], 3),
        "answer_giving": capped(marked["answer-giving"], 2),
        "suggestion": capped(sum(r[1] for r in hints), 1),
        "explanation": min(1.0, max(0, told - rules.lecture_chars) / 200),
        # Beyond half the text, statements make the question an afterthought; a framing
        # sentence or two before a question stays below that.
        "statement_share": max(0.0, share - 0.5) / 0.5,
    }
