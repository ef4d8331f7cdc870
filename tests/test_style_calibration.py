"""The style scorer against hand-rated replies, and the cases that calibration showed it missing.

``tests/data/style_calibration_ja.jsonl`` holds 101 replies to held-out questions, each rated
0-4 per axis by hand the way the profile's rubric reads (as an LLM judge would): Socratic
replies, polite assistant answers with and without markdown or emoji, lectures, advice put as a
question, mixed registers, English or Chinese mixed in, special tokens, literal ``\\n``, loops,
stutter, echoes of the user, word salad and garbage like the tiny model's. The issue's bar is
rank agreement (Spearman) with an external judge, so that is what is asserted, against the
baseline of counting 〜かね.

Run: ``python -m pytest -q tests/test_style_calibration.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from socratune.style import AXES, StyleScorer

CALIBRATION = Path(__file__).parent / "data" / "style_calibration_ja.jsonl"


@pytest.fixture(scope="module")
def scorer() -> StyleScorer:
    return StyleScorer()


@pytest.fixture(scope="module")
def rated(scorer) -> list[tuple[dict, dict]]:
    rows = [json.loads(line) for line in CALIBRATION.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row, scorer.score(row["text"], row["prompt"]).axes()) for row in rows]


def _rho(rated, axis: str, scores) -> float:
    return spearmanr(scores, [row["rating"][axis] for row, _ in rated]).statistic


def test_calibration_set_is_varied_and_fully_rated(rated):
    assert len(rated) >= 100
    kinds = {row["kind"].split("-")[0] for row, _ in rated}
    assert {"socratic", "polite", "base", "tuned", "english", "special", "word", "tiny"} <= kinds
    for row, _ in rated:
        assert set(row["rating"]) == set(AXES) and all(v in range(5) for v in row["rating"].values())
    for axis in AXES:  # every axis uses the low, middle and high ratings
        assert {0, 2, 4} <= {row["rating"][axis] for row, _ in rated} or axis == "logic"


def test_scorer_ranks_like_the_hand_ratings_and_beats_counting_kane(rated):
    kane = [row["text"].count("かね") for row, _ in rated]
    tone, kane_tone = _rho(rated, "tone", [s["tone"] for _, s in rated]), _rho(rated, "tone", kane)
    assert tone >= 0.82 and tone >= kane_tone + 0.15
    # The bar on unseen replies is 0.75 / 0.55 / 0.45; these leave a margin for that.
    assert _rho(rated, "approach", [s["approach"] for _, s in rated]) >= 0.75
    assert _rho(rated, "format", [s["format"] for _, s in rated]) >= 0.85
    assert _rho(rated, "logic", [s["logic"] for _, s in rated]) >= 0.6


# --- misses the calibration showed, now handled ---------------------------------------------


def test_quoted_polite_speech_is_not_the_replys_register(scorer):
    s = scorer.score("では聞くが、もし誰かが「私は強いので助けます」と言ったなら、君はその人を立派だと思うかね？")
    assert s.tone >= 3.5
    assert not any(e.startswith("polite speech") for e in s.explanations)


def test_echoing_the_user_loses_logic_and_approach(scorer):
    prompt = "運命は決まっていると思いますか。"
    echo = scorer.score(prompt, prompt)
    assert echo.logic <= 1.5 and echo.approach <= 2.0
    assert "repeats the user's message (100% alike)" in echo.explanations
    restated = scorer.score("運命は決まっている、と君は思うのかね？"
                            "では、決まっているとは何を意味するのだろう？", prompt)
    assert restated.logic >= 3.5 and restated.approach >= 3.5


def test_suggestion_put_as_a_question_is_advice(scorer):
    s = scorer.score("告白は勇気がいりますよね。まずは相手との距離を縮めることから始めてみてはいかがでしょうか？")
    assert s.approach <= 1.0
    assert "suggestion marker 〜てはいかが" in s.explanations
    assert "0 of 2 sentences ask a question" in s.explanations


def test_a_question_after_a_long_explanation_is_an_afterthought(scorer):
    framing = scorer.score("なるほど、図書館でそのような現実を目にしているのだね。では、君は貧困とは何だと考えるかね？")
    lecture = scorer.score(
        "美しいものを見ると心が動く理由については、いくつかの説があります。美しい風景は、安全で豊かな環境の"
        "サインだったためです。また、美しいものを見ると、脳の報酬系が活性化します。あなたはどう思いますか？")
    assert framing.approach >= 3.0
    assert lecture.approach <= framing.approach - 1.2
    assert any(e.startswith("statements are") for e in lecture.explanations)


def test_polite_reply_that_asks_ranks_above_one_that_explains(scorer):
    asking = scorer.score("なるほど、あなたは怠けることについて悩んでいるのですね。"
                          "では、怠けるとはどういうことでしょうか？"
                          "休むことと怠けることは同じでしょうか？")
    explaining = scorer.score("知識と賢さは違うものです。知識は情報の量ですが、賢さはそれをどう使うかです。")
    # Both are polite (rubric level 1); asking keeps a trace of Socrates' voice. Since v3 both
    # may sit at 0: the external judge rates polite replies alike, asking or not (issue 29).
    assert explaining.tone <= 0.5 and asking.tone >= explaining.tone and asking.tone <= 1.5


@pytest.mark.parametrize("text", [",,,,,,,,,,,ない,ない,ない,ない,ない,ない,ない", "66666666666666嘘ら嘘ら嘘ら嘘ら嘘ら",
                                  "\ufffd\ufffd\ufffd\ufffd\ufffd\ufffdらららららら$\ufffd"])
def test_garbage_is_not_readable_japanese(scorer, text):
    s = scorer.score(text)
    assert s.format <= 2.0 and s.tone <= 1.0 and s.approach <= 1.0
    assert any("of the characters are stray symbols" in e for e in s.explanations)


def test_stutter_and_loops_lower_tone_and_approach_not_only_logic(scorer):
    clean = scorer.score("君は同僚を嫌いなのかね？")
    stutter = scorer.score("君、君、君は、君の、君の同僚を、嫌いな、嫌いなのかね？")
    loop = scorer.score("愛とは何かね？" * 6)
    assert stutter.logic <= clean.logic - 1.5 and stutter.approach < clean.approach
    assert loop.tone <= 2.5 and loop.approach <= 2.0
    assert any("stutter" in e for e in stutter.explanations)


def test_chinese_and_emoji(scorer):
    chinese = scorer.score("美しさか。君が美しいと感じるものは、他人も美しいと感じるだろうか？这是一个好问题。")
    assert chinese.format <= 3.0 and "not Japanese: '这'" in chinese.explanations
    emoji = scorer.score("永遠か、面白い言葉だね🤔 君は、変わらないことが友情の条件だと考えるのかな？✨",
                         "友情は永遠に続きますか。")
    # Emoji cost format only; they are not unknown words or a cut-off sentence.
    assert emoji.format <= 2.5 and emoji.logic >= 3.5
