"""Style scorer v2: the failure classes found on replies the team did not write, and calibrate.

Offline and fast (no model, no ../shared). Run:
    PYTHONPATH=src python -m pytest tests/test_style_v2.py -q
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import yaml
from scipy.stats import spearmanr

from socratune.cli import main
from socratune.core.errors import ConfigError, DataError
from socratune.style import (
    FEATURES,
    SCORE_KEYS,
    StyleScorer,
    load_profile,
    score_jsonl,
    unwrap,
)
from socratune.style.calibrate import (
    MIN_ROWS,
    calibrate,
    calibrate_file,
    read_judged,
    write_judged_jsonl,
)

SOCRATIC = "なるほど。では君は、幸福とは何だと考えるのかね？"
PROMPT = "幸福とは何でしょうか。私は心の満足だと思うのですが。"


@pytest.fixture(scope="module")
def scorer() -> StyleScorer:
    return StyleScorer()


# --- failure classes -------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [f"「{SOCRATIC}」", f"「{SOCRATIC}", f"  「{SOCRATIC}」 "])
def test_whole_reply_quotes_are_unwrapped_and_read_as_the_replys_own_speech(scorer, wrapped):
    plain, quoted = scorer.score(SOCRATIC, PROMPT), scorer.score(wrapped, PROMPT)
    assert quoted.tone == plain.tone and quoted.approach == plain.approach and quoted.logic == plain.logic
    assert "sentence 2 ends with 〜かね (tone credit 1.00)" in quoted.explanations
    # The wrapping is a format slip, not a change of voice.
    assert plain.format - 1.0 <= quoted.format < plain.format
    assert any("wrapped in quotes" in e for e in quoted.explanations)


def test_template_braces_are_read_through_but_are_a_format_breaker(scorer):
    # {{「…」}} is a template slip the external judge marks down (issue 29, class 3): format <= 2,
    # while the words inside are still read as the reply's own.
    plain, braced = scorer.score(SOCRATIC, PROMPT), scorer.score(f"{{{{「{SOCRATIC}」}}}}", PROMPT)
    assert braced.tone == plain.tone and braced.approach == plain.approach and braced.logic == plain.logic
    assert braced.format <= 2.0 and any("template braces" in e for e in braced.explanations)


def test_quotes_inside_a_reply_are_not_a_wrapper():
    text = "「誠実」とは何かね？ 君の言う「約束」と同じものだろうか？"
    assert unwrap(text) == (text, False)
    assert unwrap("「なるほど。その「誠実」とは何かね？」") == ("なるほど。その「誠実」とは何かね？", True)


@pytest.mark.parametrize("salad", [
    "では景えてしまうものかね？",
    "ね君景えてしまうかねもの、はがだ考えるだろうか？",
    "自由はをね君がだ選択かね意志のはは本当だろうか？",
    "ふむ、それは何の\ufffdを\ufffd感を本当がく、それとも、どちらが兽\ufffdするものだろうか？",  # the tiny model's
])
def test_word_salad_with_socratic_endings_gets_low_logic_and_overall(scorer, salad):
    s, good = scorer.score(salad, "自由とは何でしょうか。"), scorer.score("君の言う自由とは、何でも選べることかね？",
                                                                  "自由とは何でしょうか。")
    assert s.logic <= 2.0 and s.overall <= good.overall - 1.0
    assert any(e.startswith("broken grammar") for e in s.explanations)


def test_real_sentences_have_no_broken_grammar(scorer):
    for text in (SOCRATIC, "では聞くが、それは本当に幸福と呼べるものかな？それとも、別の何かだろうか？",
                 "面白い。君の言う「正しさ」は、誰が決めるのだね？", "考えはしないのかね、それとも考えられないのかね？",
                 "いったい何かなと考えるかね？", "友との約束は、明日への希望へと変わるのだろうか？"):
        assert not any(e.startswith("broken grammar") for e in scorer.score(text).explanations), text


def test_polite_speech_is_tone_one_at_most_and_named_per_sentence(scorer):
    s = scorer.score("なるほど、あなたはそう考えるのですね。では、幸福とは何でしょうか？")
    assert s.tone <= 1.5 and scorer.score(SOCRATIC).tone - s.tone >= 2.0
    assert "polite speech あなた/です in sentence 1" in s.explanations
    assert "polite speech です in sentence 2" in s.explanations


def test_a_plain_imperative_is_plain_speech_and_a_polite_one_is_not(scorer):
    plain = scorer.score("なるほどね。では、その理由を具体的に説明してくれ。", PROMPT)
    polite = scorer.score("なるほどね。では、その理由を具体的に説明してください。", PROMPT)
    assert "sentence 2 ends in plain form (tone credit 0.55)" in plain.explanations
    assert "polite speech ください in sentence 2" in polite.explanations
    assert plain.tone > polite.tone


def test_lecturing_without_a_question_gets_low_approach(scorer):
    s = scorer.score("幸福とは心の平静である。人は欲望を抑えるべきだ。まず自分を知る必要がある。", PROMPT)
    assert s.approach <= 1.0
    assert "0 of 3 sentences ask a question" in s.explanations
    assert "lecturing marker べきだ" in s.explanations


@pytest.mark.parametrize("request_sentence", ["では、その理由を具体的に説明してくれ。", "では最後に聞かせてほしい。",
                                              "自分の経験から考えてみてほしい。", "例を挙げて説明してください。"])
def test_a_request_to_tell_or_think_invites_and_is_not_an_order(scorer, request_sentence):
    # Gemma-2-jpn and the real Socrates ask this way; the judge rated such a reply approach 3,
    # while reading 〜てくれ as an order had given it 0.
    framing = "なるほど、幸福とは欲しい物が手に入ることだと君は言うのだね。"
    s = scorer.score(framing + request_sentence, PROMPT)
    assert "sentence 2 asks the user to tell or think (a request, not an order)" in s.explanations
    assert "invites the user to think along" in s.explanations
    assert not any(e.startswith("lecturing marker") for e in s.explanations)
    assert s.features["approach"]["invitation"] == 1.0 and s.features["approach"]["lecturing"] == 0.0
    # An order with no verb of telling or thinking before it is still an order.
    order = scorer.score(framing + "だから自分を大切にしてくれ。", PROMPT)
    assert not any("asks the user to tell" in e for e in order.explanations)
    assert "lecturing marker 〜てくれ/〜てみろ" in order.explanations
    assert order.approach < s.approach


def test_a_profile_without_requests_reads_none(scorer):
    from socratune.style import StyleScorer
    data = scorer.profile.model_dump(exclude_none=True)
    del data["approach"]["requests"]
    plain = StyleScorer(type(scorer.profile).model_validate(data))
    s = plain.score("なるほど。では、その理由を具体的に説明してくれ。", PROMPT)
    assert not any("asks the user to tell" in e for e in s.explanations)
    assert "lecturing marker 〜てくれ/〜てみろ" in s.explanations

@pytest.mark.parametrize(("text", "evidence"), [
    (SOCRATIC + " What do you think?", "not Japanese: 'What'"),
    ("<b>" + SOCRATIC + "</b>", "markup '<b>'"),
    ("## 幸福について\n" + SOCRATIC, "markup '##'"),
    ("なるほど。  では君は、幸福とは  何だと考えるのかね？", "2 run(s) of spaces inside the text"),
    ("なるほど。では君は、幸\ufffd\ufffdとは何だと考えるのかね？",
     "2 U+FFFD replacement character(s) (an invalid byte sequence)"),
])
def test_format_breakers_lower_format_and_are_named(scorer, text, evidence):
    s = scorer.score(text, PROMPT)
    assert s.format <= 3.0 and evidence in s.explanations
    # They are format's problem: the Japanese around them is still read as Japanese.
    assert not any("unknown to the dictionary" in e for e in s.explanations)


def test_replacement_characters_cost_format_and_logic(scorer):
    # A U+FFFD where a character should be leaves a word no reader can read: a format slip and
    # a garbled spot for logic (named), though every other word is fine.
    clean = scorer.score(SOCRATIC, PROMPT)
    broken = scorer.score(SOCRATIC.replace("幸福", "幸\ufffd"), PROMPT)
    assert broken.format <= clean.format - 1.0 and broken.features["format"]["replacement_char"] == 1.0
    assert broken.logic <= clean.logic - 1.0
    assert "1 garbled spot(s) (U+FFFD) where characters should be" in broken.explanations


def test_features_are_in_unit_range_and_named_by_the_profile_schema(scorer):
    for text in (SOCRATIC, "<p>Hello</p>", "です。" * 10, "君、君、君は" * 3, "\ufffd" * 5 + "かね？"):
        s = scorer.score(text, PROMPT)
        assert set(s.axes()) == set(SCORE_KEYS)
        for axis, values in s.features.items():
            assert set(values) == set(FEATURES[axis]), axis
            assert all(0.0 <= v <= 1.0 for v in values.values()), (axis, values)


def test_profile_refuses_an_unknown_feature_or_a_wrong_sign(tmp_path):
    for axis, name, weight, message in (("tone", "kane_count", 1.0, "unknown feature 'kane_count'"),
                                        ("tone", "polite", 1.0, "wrong sign")):
        data = yaml.safe_load(Path(load_profile.__globals__["resources"].files("socratune")
                                   .joinpath("profiles/socrates.yaml")).read_text(encoding="utf-8"))
        data["combine"][axis]["weights"][name] = weight
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            load_profile(path)


# --- calibrate -------------------------------------------------------------------------------

OPENINGS = ["なるほど。", "そうだね。", "興味深い考えですね。", "それは違います。", "", "ふむ、面白い。"]
ADDRESS = ["君は", "", "あなたは", "友よ、君は"]
TOPICS = ["幸福", "正義", "勇気", "友情", "自由", "美"]
ENDINGS = ["何だと考えるのかね？", "何でしょうか？", "何だろうか？", "大切だと思います。", "何かな？",
           "大切なものだ。", "どういうものだと思いますか？"]


def _synthetic_replies(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        parts = [rng.choice(OPENINGS), rng.choice(ADDRESS) + f"{topic}とは" + rng.choice(ENDINGS)]
        if rng.random() < 0.5:
            parts.append(f"では、{topic}は" + rng.choice(ENDINGS))
        out.append((f"{topic}について教えてください。", "".join(parts)))
    return out


# The synthetic judge: a known function of the scorer's tone features, with weights unlike the
# shipped ones (address counts most, polite speech a lot, ending shares not at all); it stays
# inside 0-4, so the ratings are an exact linear function of the features.
TRUE_TONE = {"intercept": 1.5, "weights": {"address": 1.8, "socratic_count": 0.3, "polite": -1.5, "asks": 0.3}}


def _synthetic_judged(n: int, scorer: StyleScorer) -> list[dict]:
    rows = []
    for i, (prompt, text) in enumerate(_synthetic_replies(n)):
        f = scorer.score(text, prompt).features["tone"]
        tone = TRUE_TONE["intercept"] + sum(w * f[k] for k, w in TRUE_TONE["weights"].items())
        # Only tone is rated: the other axes are missing and must be skipped, not read as 0.
        rows.append({"id": f"dialogue{i // 2}#{i % 2}", "prompt": prompt, "text": text,
                     "judge": {"tone": round(min(4.0, max(0.0, tone)), 3), "approach": None}})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_calibrate_recovers_a_known_judge_and_beats_the_uncalibrated_scorer_held_out(tmp_path, scorer):
    judged = _write_jsonl(tmp_path / "judged.jsonl", _synthetic_judged(160, scorer))
    result = calibrate_file(judged, load_profile(), tmp_path / "fitted.yaml")
    assert result.cv_spearman["tone"] >= result.uncalibrated_cv_spearman["tone"] + 0.05
    assert result.cv_spearman["tone"] >= 0.95
    # The default ridge pulls toward the shipped weights, yet the fit moves toward the judge's.
    fitted, shipped = load_profile(tmp_path / "fitted.yaml").combine.tone.weights, load_profile().combine.tone.weights
    # (polite is not checked: with the ridge, weight it shares with correlated tone features,
    # such as in_character_question, stays on those; without the ridge it is recovered, below.)
    assert fitted["address"] > shipped["address"] + 0.3
    # Axes without enough ratings keep the starting weights and say so.
    assert {"approach", "format", "logic"} <= set(result.kept_axes) and result.rows_per_axis["approach"] == 0
    assert load_profile(tmp_path / "fitted.yaml").combine.format == load_profile().combine.format
    rows = read_judged(judged)
    rescored = StyleScorer(load_profile(tmp_path / "fitted.yaml"))
    rho = spearmanr([rescored.score(r.text, r.prompt).tone for r in rows], [r.judge["tone"] for r in rows]).statistic
    assert rho >= 0.95


def test_without_the_prior_pull_the_fit_recovers_the_judges_weights(tmp_path, scorer):
    rows = read_judged(_write_jsonl(tmp_path / "judged.jsonl", _synthetic_judged(160, scorer)))
    model = calibrate(rows, load_profile(), ridge=1e-6).profile.combine.tone
    assert model.intercept == pytest.approx(TRUE_TONE["intercept"], abs=0.15)
    for name, weight in TRUE_TONE["weights"].items():
        assert model.weights[name] == pytest.approx(weight, abs=0.15), name


def test_calibrated_profile_records_its_source_and_loads_everywhere(tmp_path, scorer):
    judged = _write_jsonl(tmp_path / "judged.jsonl", _synthetic_judged(40, scorer))
    calibrate_file(judged, load_profile(), tmp_path / "fitted.yaml")
    profile = load_profile(str(tmp_path / "fitted.yaml"))
    record = profile.calibration
    assert record.file == "judged.jsonl" and record.rows == 40 and record.base_profile == "socrates"
    assert record.sha256 == hashlib.sha256(judged.read_bytes()).hexdigest()
    assert set(record.cv_spearman) == {"tone", "approach", "format", "logic"} and record.folds == 5
    # score and the scorer API (training callback, evaluate) take it like a shipped profile.
    replies = _write_jsonl(tmp_path / "replies.jsonl", [{"id": "a", "text": SOCRATIC, "prompt": PROMPT}])
    records, bad, _ = score_jsonl(replies, None, str(tmp_path / "fitted.yaml"))
    assert not bad and records[0]["scores"]["tone"] > 0
    from socratune.core.config import load_config

    # Training reads it through the style.profile key (train.py: load_profile(config.style.profile)).
    config = load_config(overrides={"style.profile": str(tmp_path / "fitted.yaml")})
    assert load_profile(config.style.profile) == profile


def test_evaluate_records_round_trip_through_judged_jsonl_into_calibrate(tmp_path, scorer):
    records = []
    for i, (prompt, text) in enumerate(_synthetic_replies(30, seed=1)):
        s = scorer.score(text, prompt)
        judge = {"scores": {"tone": round(s.tone), "approach": round(s.approach), "format": 4.0, "logic": None},
                 "reasons": {}, "error": None, "attempts": 1}
        records.append({"model": "tuned" if i % 2 else "base", "prompt_id": f"p{i // 4}", "turn": i % 2,
                        "user": prompt, "reply": text, "scores": s.axes(), "explanations": [], "judge": judge})
    records.append({**records[0], "judge": {"scores": dict.fromkeys(("tone", "approach", "format", "logic")),
                                            "reasons": {}, "error": "timeout", "attempts": 3}})
    path = tmp_path / "judged.jsonl"
    assert write_judged_jsonl(records, path) == 30  # the reply the judge never rated is left out
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert set(lines[0]) == {"id", "prompt", "text", "judge"} and lines[0]["judge"]["logic"] is None
    assert lines[1]["id"] == "tuned/p0#1" and lines[1]["prompt"] == records[1]["user"]
    rows = read_judged(path)
    assert [r.text for r in rows] == [r["reply"] for r in records[:30]]
    assert main(["calibrate", str(path), "--output", str(tmp_path / "fitted.yaml")]) == 0
    record = load_profile(str(tmp_path / "fitted.yaml")).calibration
    assert record.rows_per_axis == {"tone": 30, "approach": 30, "format": 30, "logic": 0}
    # Every reply rated format 4 says nothing about format: its weights are kept, not flattened.
    assert {"format", "logic"} <= set(record.kept_axes)


def test_calibrate_refuses_too_few_rows_naming_the_file(tmp_path, scorer, capsys):
    judged = _write_jsonl(tmp_path / "few.jsonl", _synthetic_judged(MIN_ROWS - 1, scorer))
    with pytest.raises(DataError, match=f"few.jsonl: {MIN_ROWS - 1} judged replies; calibrate needs at least"):
        calibrate(read_judged(judged), load_profile(), source=str(judged))
    assert main(["calibrate", str(judged), "--output", str(tmp_path / "out.yaml")]) == 2
    assert "few.jsonl" in capsys.readouterr().err and not (tmp_path / "out.yaml").exists()


@pytest.mark.parametrize(("line", "problem"), [
    ('{"id": "a", "text": "君は？"}', "missing 'judge'"),
    ('{"id": "a", "text": "君は？", "judge": {"tone": 5}}', "'judge.tone' must be a number from 0 to 4"),
    ('{"id": "a", "text": "君は？", "judge": {"tonne": 3}}', "unknown axis 'judge.tonne'"),
    ('{"id": "a", "judge": {"tone": 3}}', "missing 'text'"),
    ('{"id": "a", "text": "君は？", "judge": {"tone": null}}', "'judge' has no rating"),
    ("not json", "invalid JSON"),
])
def test_malformed_judged_lines_are_named_by_file_and_line(tmp_path, scorer, capsys, line, problem):
    rows = _synthetic_judged(MIN_ROWS + 5, scorer)
    path = tmp_path / "judged.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:3]) + line + "\n"
                    + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[3:]), encoding="utf-8")
    with pytest.raises(DataError, match=f"judged.jsonl:4: {problem}"):
        read_judged(path)
    assert main(["calibrate", str(path), "--output", str(tmp_path / "out.yaml")]) == 2
    assert f"judged.jsonl:4: {problem}" in capsys.readouterr().err


def test_calibrate_never_overwrites_an_existing_profile(tmp_path, scorer):
    judged = _write_jsonl(tmp_path / "judged.jsonl", _synthetic_judged(30, scorer))
    existing = tmp_path / "mine.yaml"
    existing.write_text("keep me\n", encoding="utf-8")
    assert main(["calibrate", str(judged), "--output", str(existing)]) == 2
    assert existing.read_text(encoding="utf-8") == "keep me\n"


# --- word salad the tiny model really wrote --------------------------------------------------

# tests/data/tiny_salad_ja.jsonl: replies of the default tiny run (`socratune train`, then
# `socratune generate` at checkpoint-160 and 320 greedy, and the final adapter at temperature
# 1.0) to prompts from the shared dialogues; model output, not the team's writing. The prompt
# below is ours and shares no content word with them, as the shared prompts did not.
SALAD_PROMPT = "仕事で成功することが本当の幸せだと思うのですが、どうでしょうか。"
TINY_SALAD = [json.loads(line) for line in
              (Path(__file__).parent / "data" / "tiny_salad_ja.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("row", TINY_SALAD, ids=[r["id"] for r in TINY_SALAD])
def test_tiny_model_word_salad_gets_low_logic_whatever_its_endings(scorer, row):
    s = scorer.score(row["text"], SALAD_PROMPT)
    assert s.logic <= 1.5, (row["text"], s.explanations)
    if "names no content word (about nothing)" not in s.explanations:
        # Not language: tone and approach fall too (degenerate). A well-formed reply about
        # nothing keeps its Socratic tone; only logic says it answers nothing.
        assert s.overall <= 2.5
    # Named: a reader can see why (garbled, broken grammar, a loop, or about nothing).
    assert any(e.startswith(("broken grammar", "kanji outside", "1 garbled", "2 garbled", "names no content"))
               or "(loop)" in e for e in s.explanations), s.explanations


@pytest.mark.parametrize(("text", "prompt"), [
    (SOCRATIC, PROMPT),
    ("なるほど、幸福は心の満足だと君は言うのだね。では、その満足はどこから来るのかね？", PROMPT),
    ("面白い。君の言う「正しさ」は、誰が決めるのだね？", "正しさは社会が決めるものだと思います。"),
    ("その「不便」や「苦労」とは、誰にとってのものなのかね？", "人は不便や苦労を解消したいのです。"),
    ("では聞くが、その満たされる感覚そのものを、君は求めているのだろうか？",
     "人のために行動すると心が満たされる感覚があります。"),
    ("物事を自由に結びつける能力、か。では、それは必ずユーモアを生むのかね？",
     "ユーモアとは物事を自由に結びつける能力です。"),
])
def test_real_socratic_replies_keep_high_logic(scorer, text, prompt):
    s = scorer.score(text, prompt)
    assert s.logic >= 3.0, s.explanations
    assert not any(e.startswith(("broken grammar", "kanji outside")) or "garbled" in e for e in s.explanations)


@pytest.mark.parametrize(("text", "evidence"), [
    ("ふむ、君は、も、何を感じているのかね？", "broken grammar: '、も' (particle with no word before it)"),
    ("では、、君は何を守るのかね？", "broken grammar: '、、' (an empty clause between commas)"),
    ("ふむ、そのまたは、何が大切なのかね？", "broken grammar: 'そのまた' (その/この with nothing to modify)"),
    ("どちらが兛られるかね？", "kanji outside everyday Japanese (JIS X 0208): 兛"),
    ("ふむ、君は何をするものかね？", "names no content word (about nothing)"),
])
def test_salad_signals_are_named(scorer, text, evidence):
    """Each new signal, on a reply broken in that one way, and named as the reader would."""
    assert evidence in scorer.score(text).explanations


def test_a_chinese_sentence_is_another_language_not_a_garbled_word(scorer):
    # 这问题 are outside JIS X 0208 like the tiny model's 兛, but they come as a run: Chinese,
    # which format lowers; logic reads the Japanese around it as before.
    plain = scorer.score(SOCRATIC, PROMPT)
    mixed = scorer.score(SOCRATIC + "这是一个好问题。", PROMPT)
    assert mixed.format < plain.format and mixed.features["logic"]["garbled"] == 0.0
    assert not any(e.startswith("kanji outside") for e in mixed.explanations)
