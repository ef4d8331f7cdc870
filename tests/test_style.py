"""Tests for the style scorer (socratune.style) and its shipped Socrates profile.

Offline and fast (one Sudachi dictionary load per session). Run:
    PYTHONPATH=src python -m pytest tests/test_style.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from socratune.core.errors import ConfigError
from socratune.style import (
    StyleScorer,
    available_profiles,
    format_summary_table,
    load_profile,
    score_jsonl,
    score_replies,
    summarize,
)

SOCRATIC = "なるほど。では君は、幸福とは何だと考えるのかね？"
POLITE = "幸福とは心の満足だと思います。いかがでしょうか。"
LECTURE = (
    "幸福とは、人生において心が満たされている状態のことである。まず、健康であることが大切だ。"
    "次に、人間関係を大切にする必要がある。さらに、自分の目標に向かって努力しなければならない。"
    "つまり、幸福は日々の積み重ねによって得られるものなのだ。"
)
PROMPT = "幸福とは何でしょうか。私は心の満足だと思うのですが。"


@pytest.fixture(scope="module")
def scorer() -> StyleScorer:
    return StyleScorer()


def test_socratic_reply_scores_high_on_every_axis_with_evidence(scorer):
    s = scorer.score(SOCRATIC, PROMPT)
    assert s.tone >= 3.5 and s.approach >= 3.5 and s.logic >= 3.5
    assert s.format == 4.0
    assert "sentence 2 ends with 〜かね (tone credit 1.00)" in s.explanations
    assert "address term 君" in s.explanations
    assert set(s.axes()) == {"tone", "approach", "format", "logic", "overall"}


def test_polite_speech_is_not_socratic_and_is_named(scorer):
    polite, socratic = scorer.score(POLITE), scorer.score(SOCRATIC)
    assert polite.tone <= 0.5
    assert socratic.tone - polite.tone >= 3.0
    assert "polite speech ます in sentence 1" in polite.explanations
    # でしょう is found through its dictionary form です, not by its spelling.
    assert "polite speech です in sentence 2" in polite.explanations


def test_tone_gives_partial_credit_by_polite_share_and_ending(scorer):
    all_polite = scorer.score("君の考えは面白いですね。では、幸福とは何でしょうか？")
    half_polite = scorer.score("君の考えは面白いですね。では、幸福とは何かね？")
    plain = scorer.score("君の考えは面白い。では、幸福とは何かね？")
    socratic = scorer.score("君の考えは面白いね。では、幸福とは何だろうか？")
    # plain and socratic both reach the 4.0 ceiling since v3 (a 君 question in character is a
    # judge's 4); below it the order holds.
    assert all_polite.tone < half_polite.tone < plain.tone <= socratic.tone
    # A polite sentence earns half its ending credit (the profile's polite_sentence_credit).
    assert "sentence 1 ends with 〜ね (tone credit 0.38)" in half_polite.explanations
    assert 1.0 <= half_polite.tone <= 3.25


def test_asking_beats_lecturing_on_approach(scorer):
    asking, lecture = scorer.score(SOCRATIC), scorer.score(LECTURE)
    assert lecture.approach <= 1.0
    assert asking.approach - lecture.approach >= 2.5
    assert "0 of 5 sentences ask a question" in lecture.explanations
    assert any(e.startswith("lecturing marker 必要がある") for e in lecture.explanations)


def test_giving_the_answer_then_asking_for_approval_is_half_way(scorer):
    approval = scorer.score(POLITE)
    assert 1.0 <= approval.approach <= 3.0
    assert "answer-giving marker 〜と思う" in approval.explanations


@pytest.mark.parametrize(
    ("text", "evidence"),
    [
        ("<p>君は幸福とは何だと考えるのかね？</p>", "markup '<p>'"),
        ("**君は**幸福とは何だと考えるのかね？", "markup '**君は**'"),
        ("君は幸福とは何だと考え\ufffdるのかね？", "1 U+FFFD replacement character(s) (an invalid byte sequence)"),
        ("君は幸福とは何だと考えるのかね？<end_of_turn>", "special token '<end_of_turn>'"),
        ("<pad>君は幸福とは何だと考えるのかね？<pad>", "special token '<pad>'"),
        ("君は幸福とは[UNK]何だと考えるのかね？", "special token '[UNK]'"),
        ("君は幸福とは何だと考えるのかね？😊", "emoji '😊'"),
        ("hello 君は幸福とは何だと考えるのかね？", "not Japanese: 'hello'"),
        ("君は幸福とは  何だと考えるのかね？", "1 run(s) of spaces inside the text"),
        ("君は幸福とは何だと考えるのかね？\\nでは続けよう。",
         "1 odd line break(s) (mid-sentence, blank runs or a literal \\n)"),
        ("君は幸福とは##何だと考えるのかね？", "stray symbol '#'"),
    ],
)
def test_broken_format_scores_below_clean_and_names_the_problem(scorer, text, evidence):
    clean = scorer.score("君は幸福とは何だと考えるのかね？")
    broken = scorer.score(text)
    assert clean.format == 4.0
    assert broken.format <= 3.5
    assert evidence in broken.explanations


def test_special_tokens_do_not_leak_into_tone_or_approach(scorer):
    s = scorer.score(SOCRATIC + "<end_of_turn>\n<start_of_turn>user")
    assert s.format <= 1.0
    assert s.approach >= 3.0 and s.tone >= 3.0


def test_english_reply_fails_format_and_tone(scorer):
    s = scorer.score("I think happiness is subjective. What do you think?")
    assert s.format == 0.0 and s.tone == 0.0


@pytest.mark.parametrize("text", ["", "   ", "\n\t　", "<pad><pad>"])
def test_empty_or_token_only_text_scores_zero_everywhere(scorer, text):
    s = scorer.score(text)
    assert s.axes() == {"tone": 0.0, "approach": 0.0, "format": 0.0, "logic": 0.0, "overall": 0.0}


def test_repetition_loop_and_cut_off_reply_lose_logic(scorer):
    clean = scorer.score(SOCRATIC)
    loop = scorer.score("君は幸福を何だと考えるかね？" * 5)
    cut = scorer.score("では君は、幸福というものを何によって")
    assert loop.logic <= 1.0 < clean.logic
    assert "4 repeated sentence(s)" in loop.explanations
    assert cut.logic <= clean.logic - 1.0
    assert "cut off mid-sentence after 'て'" in cut.explanations


def test_reply_that_takes_up_the_prompt_is_more_logical(scorer):
    reply = "君は幸福を心の満足だと言うのだね。では、満足した愚か者は幸福なのかね？"
    related = scorer.score(reply, PROMPT)
    unrelated = scorer.score(reply, "昨日の夕食は寿司とラーメンを食べました。")
    assert related.logic - unrelated.logic >= 1.0
    assert any(e.startswith("shares 0 content word") for e in unrelated.explanations)


def test_overall_is_the_profile_weighted_mean(scorer):
    s = scorer.score(POLITE)
    w = load_profile().overall_weights
    expected = (w.tone * s.tone + w.approach * s.approach + w.format * s.format + w.logic * s.logic) / (
        w.tone + w.approach + w.format + w.logic
    )
    assert s.overall == pytest.approx(expected, abs=1e-3)


# Replies rated 0-4 by hand the way the rubric reads (tone, approach, format). The ranking
# of the scorer must follow these, well above what counting 〜かね endings achieves.
RATED = [
    ("なるほど。では君は、幸福とは何だと考えるのかね？", 4, 4, 4),
    ("面白い指摘だね。では、なぜある部分だけが「記憶」として残るのだろう？他の部分は消えてしまうのかね？", 4, 4, 4),
    ("君の言うことはもっともだ。しかし、それは本当に幸福と呼べるものかな？", 4, 3, 4),
    ("友情か。それは興味深い話題だね。君は、友と呼べる者が何人いるかね？", 4, 4, 4),
    ("友情とは互いを思いやる心だよ。君も友を大切にするといい。", 3, 1, 4),
    ("君はどう思う？", 3, 3, 4),
    ("それは違う。勇気とは恐れを知りつつ行動することだ。よく覚えておきなさい。", 2, 0, 4),
    ("君の考えは面白いですね。では、幸福とは何かね？", 2, 3, 4),
    ("なるほど、君はそう考えるのですね。では、正義とは何でしょうか？", 1, 3, 4),
    ("Hello! 幸福とは何だと思う？😊", 1, 3, 1),
    (POLITE, 0, 2, 4),
    (LECTURE.replace("である。", "です。").replace("だ。", "です。"), 0, 0, 4),
    ("素晴らしい質問ですね！アリストテレスは幸福を最高善と考えました。あなたはどう思いますか？", 0, 2, 4),
    ("美しさについて考えてみましょう！🌸 美しさは人それぞれです。**ポイント**: 感性を大切にしましょう。", 0, 1, 0),
    ("<p>幸福とは何かね？</p><end_of_turn>", 3, 3, 0),
    ("なるほど。君は、知識とは何だと考えるのかね? Knowledge is power と言う人もいるが。", 3, 3, 2),
]


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs: list[float]) -> list[float]:
        return [sum(y < x for y in xs) + (sum(y == x for y in xs) - 1) / 2 for x in xs]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def test_scores_rank_hand_rated_replies_like_the_rubric(scorer):
    scores = [scorer.score(text) for text, *_ in RATED]
    kane_count = [text.count("かね") for text, *_ in RATED]
    tone_rho = _spearman([s.tone for s in scores], [r[1] for r in RATED])
    assert tone_rho >= 0.85
    assert tone_rho > _spearman(kane_count, [r[1] for r in RATED]) + 0.2
    assert _spearman([s.approach for s in scores], [r[2] for r in RATED]) >= 0.6
    assert _spearman([s.format for s in scores], [r[3] for r in RATED]) >= 0.75


@pytest.mark.slow
def test_import_loads_neither_torch_nor_the_dictionary():
    code = (
        "import sys, socratune.style as s; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
        "from socratune.style import morphology; assert morphology._dictionary.cache_info().currsize == 0"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": src})


# --- profiles -------------------------------------------------------------------------------


def _shipped() -> dict:
    """The shipped profile as plain data, to derive variants from."""
    return yaml.safe_load((resources.files("socratune") / "profiles" / "socrates.yaml").read_text(encoding="utf-8"))


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "persona.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_shipped_profile_loads_with_a_full_rubric():
    assert "socrates" in available_profiles()
    profile = load_profile("socrates")
    assert set(profile.rubric["tone"]) == {0, 1, 2, 3, 4} and len(profile.rubric) == 4
    assert profile.overall_weights.tone > 0


def test_unknown_key_is_named_with_its_file_and_the_allowed_keys(tmp_path):
    data = _shipped()
    data["tone"]["adress"] = data["tone"].pop("address")
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert err.value.key == "tone.adress"
    assert str(path) in str(err.value) and "unknown key 'tone.adress'" in str(err.value)
    assert "address" in err.value.allowed


def test_unknown_key_inside_a_marker_list_is_named(tmp_path):
    data = _shipped()
    data["tone"]["endings"][0]["tokens"][0]["lemma"] = "か"
    with pytest.raises(ConfigError) as err:
        load_profile(_write(tmp_path, data))
    assert err.value.key == "tone.endings.0.tokens.0.lemma"
    assert "form" in err.value.allowed


def test_wrong_type_is_named(tmp_path):
    data = _shipped()
    data["combine"]["approach"]["weights"]["asks"] = "a lot"
    with pytest.raises(ConfigError) as err:
        load_profile(_write(tmp_path, data))
    assert err.value.key == "combine.approach.weights.asks"
    assert "valid number" in str(err.value)


def test_bad_regex_and_missing_rubric_level_are_errors(tmp_path):
    data = _shipped()
    data["format"]["special_tokens"].append("<(unclosed")
    del data["rubric"]["logic"][2]
    with pytest.raises(ConfigError) as err:
        load_profile(_write(tmp_path, data))
    assert "format.special_tokens" in str(err.value) and "rubric.logic" in str(err.value)


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError) as err:
        load_profile("plato")
    assert err.value.allowed == available_profiles()


def test_custom_profile_changes_the_result(tmp_path):
    data = _shipped()
    # A courteous-sage persona: polite speech allowed, です/ます endings credited.
    data["tone"]["polite"] = []
    data["tone"]["endings"].append({"name": "〜ます", "weight": 1.0, "tokens": [{"form": "ます", "pos": "助動詞"}]})
    data["tone"]["endings"].append({"name": "〜でしょうか", "weight": 1.0, "tokens": [{"form": "です"}, "か"]})
    custom = StyleScorer(load_profile(_write(tmp_path, data)))
    default = StyleScorer()
    assert custom.score(POLITE).tone >= 2.5 > default.score(POLITE).tone
    assert "sentence 1 ends with 〜ます (tone credit 1.00)" in custom.score(POLITE).explanations


# --- batch and JSONL ------------------------------------------------------------------------


def test_score_replies_summarize_and_table():
    scores = score_replies([SOCRATIC, POLITE], prompts=[PROMPT, None])
    summary = summarize(scores)
    assert summary["tone"] == pytest.approx((scores[0].tone + scores[1].tone) / 2, abs=1e-3)
    assert set(summary) == {"tone", "approach", "format", "logic", "overall"}
    assert summarize([]) == {}
    table = format_summary_table(summary, 2)
    assert "2 replies" in table and f"{summary['tone']:.2f}" in table
    with pytest.raises(ValueError):
        score_replies([SOCRATIC], prompts=[])


def test_score_jsonl_reports_bad_lines_and_scores_the_rest_in_order(tmp_path):
    src = tmp_path / "replies.jsonl"
    lines = [
        json.dumps({"id": "a", "text": SOCRATIC, "prompt": PROMPT}, ensure_ascii=False),
        "{not json",
        json.dumps({"id": "c", "prompt": PROMPT}),
        "",
        json.dumps({"id": "d", "text": POLITE}, ensure_ascii=False),
        json.dumps({"text": LECTURE, "prompt": 3}, ensure_ascii=False),
    ]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "scores.jsonl"
    records, bad, summary = score_jsonl(src, out)
    assert [r["id"] for r in records] == ["a", "d"]
    assert bad[0].startswith(f"{src}:2: invalid JSON")
    assert bad[1] == f"{src}:3: missing 'text'"
    assert bad[2] == f"{src}:6: 'prompt' must be a string or null"
    assert records[0]["scores"]["tone"] > records[1]["scores"]["tone"]
    assert summary["tone"] == pytest.approx((records[0]["scores"]["tone"] + records[1]["scores"]["tone"]) / 2, abs=1e-3)
    written = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert written == records
    assert [p.name for p in out.parent.iterdir()] == ["scores.jsonl"]  # no temporary file left


def test_score_jsonl_without_output_writes_nothing(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps({"id": 1, "text": SOCRATIC}, ensure_ascii=False) + "\n", encoding="utf-8")
    records, bad, _ = score_jsonl(src, None)
    assert len(records) == 1 and bad == []
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]
