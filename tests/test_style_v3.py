"""Style v3 (issue 29): every cost is a weighted measurement that calibrate can refit, the
format breakers the external judge punishes, and tone for short in-character questions.

The synthetic judges below rate the replies of ``tests/data/style_calibration_ja.jsonl``
(the team's 101 varied replies) once as written and once wrapped in 「…」 (or with a run of
spaces): one judge ignores the change, one marks it down. Calibrate must learn which.

Run: ``python -m pytest -q tests/test_style_v3.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from socratune.style import FEATURES, StyleProfile, StyleScorer, load_profile, unwrap
from socratune.style.calibrate import JudgedRow, calibrate, read_judged

DATA = Path(__file__).parent / "data" / "style_calibration_ja.jsonl"
SHARED_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "judged_dev_ja.jsonl"


@pytest.fixture(scope="module")
def scorer() -> StyleScorer:
    return StyleScorer()


def _replies() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["prompt"], unwrap(r["text"])[0]) for r in rows]


def _wrap(text: str) -> str | None:
    return f"「{text}」"


def _spaced(text: str) -> str | None:
    return text.replace("。", "。  ", 1) if "。" in text[:-1] else None


def _blind(feature: str) -> StyleScorer:
    """The default scorer with one format feature weighing nothing."""
    data = load_profile().model_dump(exclude_none=True)
    data["combine"]["format"]["weights"][feature] = 0.0
    return StyleScorer(StyleProfile.model_validate(data))


def _judged(edit, feature: str, penalty: float) -> list[JudgedRow]:
    """Format ratings of each reply and its edited form by a judge that agrees with the default
    format score except that ``feature`` costs nothing, and the edit costs ``penalty`` points
    (0: the judge ignores what the edit adds)."""
    judge = _blind(feature)
    rows = []
    for i, (prompt, text) in enumerate(_replies()):
        edited = edit(text)
        if edited is None:
            continue
        rating = judge.score(text, prompt).format
        for turn, (reply, value) in enumerate(((text, rating), (edited, max(0.0, rating - penalty)))):
            rows.append(JudgedRow(f"d{i}#{turn}", prompt, reply, {"tone": None, "approach": None,
                                                                    "format": value, "logic": None}))
    return rows


def _gap(profile: StyleProfile, rows: list[JudgedRow]) -> float:
    """Mean format of the plain replies minus that of their edited forms."""
    scorer = StyleScorer(profile)
    plain = [scorer.score(r.text, r.prompt).format for r in rows if r.id.endswith("#0")]
    edited = [scorer.score(r.text, r.prompt).format for r in rows if r.id.endswith("#1")]
    return sum(plain) / len(plain) - sum(edited) / len(edited)


@pytest.mark.parametrize("edit, feature", [(_wrap, "wrapped"), (_spaced, "odd_space")], ids=["wrapper", "spacing"])
def test_a_judge_that_ignores_it_gets_a_profile_that_ignores_it(scorer, edit, feature):
    rows = _judged(edit, feature, penalty=0.0)
    assert len(rows) >= 100
    default = load_profile()
    assert _gap(default, rows) >= 0.3  # the default (the rubric) marks it down
    fitted = calibrate(rows, default).profile
    assert "format" not in fitted.calibration.kept_axes
    assert fitted.combine.format.weights[feature] >= -0.2  # from -0.4 (wrapped) and -1.5 (odd_space)
    assert abs(_gap(fitted, rows)) <= 0.1  # wrapped / spaced scores like the plain reply


@pytest.mark.parametrize("edit, feature", [(_wrap, "wrapped"), (_spaced, "odd_space")], ids=["wrapper", "spacing"])
def test_a_judge_that_punishes_it_keeps_the_penalty(scorer, edit, feature):
    rows = _judged(edit, feature, penalty=1.5)
    fitted = calibrate(rows, load_profile()).profile
    assert fitted.combine.format.weights[feature] <= -0.5
    assert _gap(fitted, rows) >= 0.5


def test_fitted_weights_are_what_a_written_profile_scores_with(scorer, tmp_path):
    from socratune.style.calibrate import write_profile

    rows = _judged(_wrap, "wrapped", penalty=0.0)
    fitted = calibrate(rows, load_profile()).profile
    write_profile(fitted, tmp_path / "fitted.yaml")
    loaded = load_profile(tmp_path / "fitted.yaml")
    assert loaded.combine == fitted.combine
    wrapped = "「なるほど。では君は、幸福とは何だと考えるのかね？」"
    assert StyleScorer(loaded).score(wrapped).format > scorer.score(wrapped).format


# --- the format breakers of class 3 ------------------------------------------------------------

QUESTION = "なるほど。では君は、幸福とは何だと考えるのかね？"


@pytest.mark.parametrize("text", [
    "<start_of_turn>model\nなるほど。では君は、幸福とは何だと考えるのかね？",  # a special token
    "なるほど。では君は、**幸福**とは何だと考えるのかね？",  # markdown
    "なるほど。では君は、<b>幸福</b>とは何だと考えるのかね？",  # HTML
    "なるほど。では君は、幸福とは何だと考えrulesのかね？",  # Latin letters breaking a word
    "なるほど、それは確かに難しい indeed。では君は、幸福とは何だと考えるのかね？",  # English in a sentence
    "なるほど。では君は、幸福とは何だと考えるのでしょう？\nかね？",  # an ending split onto its own line
    "}「なるほど。では君は、幸福とは何だと考えるのかね？」",  # stray braces before the reply
    "{{「なるほど。では君は、幸福とは何だと考えるのかね？」}}",  # a template's braces
], ids=["special-token", "markdown", "html", "latin-in-word", "english-in-sentence", "split-ending",
        "stray-brace", "template-braces"])
def test_each_format_breaker_scores_format_at_most_2(scorer, text):
    s = scorer.score(text)
    assert s.format <= 2.0, s.explanations
    assert any(e.startswith("format -") for e in s.explanations)  # says which measurement cost it


def test_clean_replies_and_what_is_not_a_breaker_keep_format(scorer):
    assert scorer.score(QUESTION).format == 4.0
    # An interjection standing as its own sentence, a name in Latin letters, quotes inside.
    assert scorer.score("Hmm。では君は、幸福とは何だと考えるのかね？").format > 2.0
    assert scorer.score("では君は、SNSで見た幸福とは何だと考えるのかね？").format > 2.0
    assert scorer.score("その「誠実」とは何かね？\n君の言う「約束」と同じものだろうか？").format == 4.0


# --- tone: short in-character questions and bare acknowledgements -----------------------------


@pytest.mark.parametrize("text", [
    "そうなのかね？では君にとって自由とは何だと考えるのかね？",
    "なるほど。では、その「小さな喜び」は何を指しているのかね？",
    "では、その「必要」とは何かね？",
    "ふむ。君の言う正義とは、誰のためのものなのかね？",
])
def test_a_short_in_character_question_reaches_tone_3_5(scorer, text):
    assert scorer.score(text).tone >= 3.5


@pytest.mark.parametrize("text", ["なるほど。", "そうだね。", "ふむ、なるほど。", "ああ、そうか。"])
def test_a_bare_acknowledgement_gets_tone_at_most_1(scorer, text):
    s = scorer.score(text)
    assert s.tone <= 1.0 and "a bare acknowledgement: no content word and no question" in s.explanations


# --- the profile schema -----------------------------------------------------------------------


def test_a_v2_profile_without_the_new_features_still_loads_and_scores(tmp_path):
    import yaml

    data = load_profile().model_dump(exclude_none=True)
    del data["logic"]["degenerate_costs"]
    new = {"format": ("braces", "latin_in_word", "english_in_sentence", "split_ending"),
           "tone": ("in_character_question", "acknowledgement")}
    for axis, names in new.items():
        for name in names:
            del data["combine"][axis]["weights"][name]
    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    profile = load_profile(path)
    assert profile.logic.degenerate_costs["unknown_words"] == 3.0
    s = StyleScorer(profile).score("{{「なるほど。では君は、幸福とは何だと考えるのかね？」}}")
    assert s.format > 2.0  # the new breakers weigh nothing in a profile that does not name them


def test_degenerate_costs_name_logic_features_only(tmp_path):
    import yaml

    from socratune.core.errors import ConfigError

    data = load_profile().model_dump(exclude_none=True)
    data["logic"]["degenerate_costs"] = {"wrapped": 1.0}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError, match="degenerate_costs"):
        load_profile(path)


def test_every_feature_the_scorer_computes_is_listed_with_a_sign(scorer):
    s = scorer.score("「なるほど。では君は、幸福とは何だと考えるのかね？」", "幸福とは何でしょうか。")
    for axis, feats in s.features.items():
        assert set(feats) == set(FEATURES[axis]), axis


@pytest.mark.skipif(not SHARED_DEV.exists(), reason="the shared judged dev half is not on this machine")
def test_calibrate_on_the_dev_half_moves_the_format_weights():
    rows = read_judged(SHARED_DEV)
    default = load_profile()
    fitted = calibrate(rows, default).profile
    assert fitted.combine.format != default.combine.format


def test_style_modules_stay_small():
    """The layout rule for style/: no module over 500 lines, no function over 80."""
    import ast

    for path in sorted((Path(__file__).resolve().parents[1] / "src" / "socratune" / "style").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert len(source.splitlines()) <= 500, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, f"{path.name}: {node.name}"
