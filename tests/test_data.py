"""Data loading and validation: every rejected dialogue is named with file, index, line and reason.

Run: ``PYTHONPATH=src python -m pytest tests/test_data.py -q``
"""

from __future__ import annotations

import hashlib
import json

import pytest

from socratune.core.errors import DataError
from socratune.data.dialogues import (
    REASONS,
    Dialogue,
    Rejection,
    Turn,
    dataset_fingerprint,
    load_dialogues,
    require_usable,
    write_rejections,
)

GOOD = {
    "source_file": "dialogue_kuchohenka_AI10.3_20250111_034149_12.txt",
    "extract_range": "2-3",
    "messages": [
        {"role": "user", "content": "幸せかどうかを判断するには、まず「幸せ」の定義が必要だと思います。"},
        {"role": "model", "content": "なるほど。では、喜びと幸せは何か違いがあるのかね？"},
    ],
}
WITH_SYSTEM = {
    "topic": "正義",
    "messages": [
        {"role": "system", "content": "君はソクラテスだ。答えを教えず、問いで導きなさい。"},
        {"role": "user", "content": "正義とは、強い者の利益のことではないでしょうか。"},
        {"role": "assistant", "content": "ほう。では強い者が自分の利益を見誤ったとき、それも正義かね？"},
        {"role": "user", "content": "それは……正義とは言えないかもしれません。"},
        {"role": "model", "content": "ならば、正義とは何によって決まるのだろうね？"},
    ],
}


def msgs(*pairs: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def write_json_list(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def test_json_list_keeps_metadata_normalises_bot_roles_and_allows_a_first_system_message(tmp_path):
    report = load_dialogues(write_json_list(tmp_path / "d.json", [GOOD, WITH_SYSTEM]))
    assert report.rejections == []
    first, second = report.kept
    assert (first.id, second.id) == ("0", "1")
    assert first.metadata == {"source_file": GOOD["source_file"], "extract_range": "2-3"}
    assert second.metadata == {"topic": "正義"}
    assert [t.role for t in first.turns] == ["user", "assistant"]
    assert [t.role for t in second.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert second.first_user == "正義とは、強い者の利益のことではないでしょうか。"
    assert first.messages() == [{"role": "user", "content": GOOD["messages"][0]["content"]},
                                {"role": "assistant", "content": GOOD["messages"][1]["content"]}]


def test_jsonl_gives_the_same_dialogues_as_a_json_list(tmp_path):
    from_list = load_dialogues(write_json_list(tmp_path / "d.json", [GOOD, WITH_SYSTEM]))
    from_lines = load_dialogues(write_jsonl(tmp_path / "d.jsonl", [GOOD, WITH_SYSTEM]))
    assert from_lines.kept == from_list.kept
    assert [d.metadata for d in from_lines.kept] == [d.metadata for d in from_list.kept]


def test_format_is_chosen_by_content_not_by_name(tmp_path):
    as_txt = write_jsonl(tmp_path / "dialogues.txt", [GOOD, WITH_SYSTEM])
    list_named_jsonl = tmp_path / "list.json.bak"
    write_json_list(list_named_jsonl, [GOOD])
    assert len(load_dialogues(as_txt).kept) == 2
    assert len(load_dialogues(list_named_jsonl).kept) == 1


def test_a_jsonl_file_whose_line_is_a_list_rejects_that_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [[GOOD], GOOD])
    report = load_dialogues(path)
    assert [d.id for d in report.kept] == ["1"]
    assert [(r.reason, r.index, r.line) for r in report.rejections] == [("not_an_object", 0, 1)]
    assert "got a list" in report.rejections[0].message


def test_content_whitespace_is_kept_as_given(tmp_path):
    row = msgs(("user", "  勇気とは何でしょう？\n"), ("model", "君は、恐れを知らぬことが勇気だと思うかね？ "))
    [dialogue] = load_dialogues(write_jsonl(tmp_path / "d.jsonl", [row])).kept
    assert [t.content for t in dialogue.turns] == ["  勇気とは何でしょう？\n",
                                                   "君は、恐れを知らぬことが勇気だと思うかね？ "]


def test_a_byte_order_mark_does_not_hide_a_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD], ensure_ascii=False).encode("utf-8"))
    assert len(load_dialogues(path).kept) == 1


@pytest.mark.parametrize("row, reason, fragment", [
    ('{"messages": [{"role": "user", "content": "徳は教えられるか"}', "invalid_json", "not valid JSON at line 2: "),
    ("[1, 2]", "not_an_object", "expected an object with 'messages', got a list"),
    ('"幸福とは？"', "not_an_object", "got a string"),
    ({"text": "幸福とは？", "topic": "幸福"}, "missing_messages", "no 'messages' key (keys present: 'text', 'topic')"),
    ({"messages": []}, "missing_messages", "'messages' must be a non-empty list, got an empty list"),
    ({"messages": "幸福とは？"}, "missing_messages", "got a string"),
    (msgs(("user", "幸福とは？"), ("bot", "君はどう思うかね？")), "bad_role",
     "message 2 has role 'bot'; allowed: user, model, assistant, system (first only)"),
    ({"messages": [{"content": "幸福とは？"}, {"role": "model", "content": "かね？"}]}, "bad_role",
     "message 1 has role None"),
    ({"messages": [{"role": ["user"], "content": "幸福とは？"}]}, "bad_role", "message 1 has role ['user']"),
    ({"messages": ["幸福とは？", {"role": "model", "content": "かね？"}]}, "bad_role",
     "message 1 is a string, not an object with role and content"),
    (msgs(("user", " \u3000\n"), ("model", "君はどう思うかね？")), "empty_content",
     "message 1 (user) has empty content"),
    (msgs(("user", "幸福とは？"), ("model", "")), "empty_content", "message 2 (model) has empty content"),
    (msgs(("user", 42), ("model", "かね？")), "empty_content", "message 1 (user) content is a number, not a string"),
    (msgs(("user", "幸福とは？"), ("model", None)), "empty_content", "message 2 (model) content is null"),
    ({"messages": [{"role": "user"}, {"role": "model", "content": "かね？"}]}, "empty_content",
     "message 1 (user) content is missing"),
    (msgs(("user", "幸福とは？"), ("user", "教えてください"), ("model", "かね？")), "not_alternating",
     "message 2 is user where assistant was expected"),
    (msgs(("model", "何を知りたいのかね？"), ("user", "幸福です")), "not_alternating",
     "message 1 is model where user was expected"),
    (msgs(("system", "君はソクラテスだ。"), ("assistant", "何を知りたいのかね？")), "not_alternating",
     "message 2 is assistant where user was expected"),
    (msgs(("user", "幸福とは？"), ("model", "君はどう思うかね？"), ("user", "わかりません")), "not_ending_on_bot",
     "the last message (3) is user; a dialogue must end on a model/assistant turn"),
    (msgs(("system", "君はソクラテスだ。")), "not_ending_on_bot", "the last message (1) is system"),
    (msgs(("user", "幸福とは？"), ("system", "君はソクラテスだ。"), ("model", "かね？")), "misplaced_system",
     "message 2 is a system message; a system message may only come first"),
    (msgs(("system", "君はソクラテスだ。"), ("system", "丁寧に。"), ("user", "幸福とは？"), ("model", "かね？")),
     "misplaced_system", "message 2 is a system message"),
])
def test_each_rejection_names_file_line_index_reason_and_problem(tmp_path, row, reason, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row, WITH_SYSTEM])
    report = load_dialogues(path)
    assert [d.id for d in report.kept] == ["0", "2"]
    [rejection] = report.rejections
    assert (rejection.source, rejection.index, rejection.line, rejection.reason) == (str(path), 1, 2, reason)
    assert reason in REASONS
    assert fragment in rejection.message
    assert rejection.where() == "d.jsonl:2 (dialogue 1)"
    assert report.counts() == {"kept": 2, "rejected": 1, reason: 1}
    assert f"d.jsonl:2 (dialogue 1): {reason}: {rejection.message}" in report.summary()


def test_blank_lines_are_skipped_but_counted_for_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", "   ", "{broken", GOOD])
    report = load_dialogues(path)
    assert [d.id for d in report.kept] == ["0", "2"]
    [rejection] = report.rejections
    assert (rejection.index, rejection.line, rejection.reason) == (1, 4, "invalid_json")
    assert rejection.message.startswith("not valid JSON at line 4: ")


def test_rejections_in_a_json_list_carry_the_line_where_the_record_starts(tmp_path):
    bad = msgs(("user", "幸福とは？"), ("user", "教えてください"))
    path = tmp_path / "d.json"
    # Hand-laid-out so the expected lines are plain to see.
    path.write_text("[\n" + json.dumps(GOOD, ensure_ascii=False) + ",\n\n"
                    + json.dumps(bad, ensure_ascii=False, indent=1) + " ,\n"
                    + json.dumps("ただの文字列", ensure_ascii=False) + "\n]\n", encoding="utf-8")
    report = load_dialogues(path)
    assert [(r.index, r.line, r.reason) for r in report.rejections] == [(1, 4, "not_alternating"),
                                                                        (2, 16, "not_an_object")]
    assert report.rejections[0].where() == "d.json:4 (dialogue 1)"


def test_an_empty_file_loads_as_nothing_and_require_usable_refuses_it(tmp_path):
    for text in ("", "\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text, encoding="utf-8")
        report = load_dialogues(path)
        assert (report.kept, report.rejections) == ([], [])
        with pytest.raises(DataError, match="no usable dialogue left in .*empty.jsonl"):
            require_usable(report)


def test_no_usable_dialogue_is_a_data_error_carrying_every_rejection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": []}, msgs(("user", "幸福とは？"))])
    report = load_dialogues(path)
    with pytest.raises(DataError, match=r"no usable dialogue left in .*d.jsonl") as caught:
        require_usable(report)
    assert caught.value.rejections == report.rejections and len(caught.value.rejections) == 2
    assert "missing_messages 1, not_ending_on_bot 1" in str(caught.value)
    assert "d.jsonl:2 (dialogue 1)" in str(caught.value)


def test_require_usable_accepts_a_report_with_one_dialogue(tmp_path):
    require_usable(load_dialogues(write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": []}])))


def test_malformed_json_list_is_a_data_error_naming_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"messages": []},\n {"messages": \n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json: not valid JSON at line 4 column 1: Expecting value"):
        load_dialogues(path)


def test_a_file_that_is_not_json_at_all_is_a_data_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("role,content\nuser,幸福とは？\nmodel,かね？\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv is neither a JSON list nor JSON Lines: not valid JSON at line 1"):
        load_dialogues(path)


def test_a_single_pretty_printed_object_is_a_data_error_saying_what_is_expected(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"dialogues": [GOOD]}, ensure_ascii=False, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json holds an object; expected a JSON list of dialogues"):
        load_dialogues(path)


def test_a_missing_or_undecodable_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"data file .*nope.json does not exist"):
        load_dialogues(tmp_path / "nope.json")
    shift_jis = tmp_path / "sjis.jsonl"
    shift_jis.write_bytes(json.dumps(GOOD, ensure_ascii=False).encode("shift_jis"))
    with pytest.raises(DataError, match="data file .*sjis.jsonl is not UTF-8 text"):
        load_dialogues(shift_jis)


def test_add_rejections_moves_dialogues_from_kept_to_rejected_by_index(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": []}, WITH_SYSTEM, GOOD])
    report = load_dialogues(path)
    report.add_rejections([Rejection(str(path), 3, None, "no_trained_tokens", "no bot token left to train on"),
                           Rejection(str(path), 2, None, "too_long", "900 tokens after templating; max 512")])
    assert [d.id for d in report.kept] == ["0"]
    assert [(r.index, r.reason) for r in report.rejections] == [(1, "missing_messages"), (2, "too_long"),
                                                                (3, "no_trained_tokens")]
    assert report.counts() == {"kept": 1, "rejected": 3, "missing_messages": 1, "too_long": 1,
                               "no_trained_tokens": 1}
    assert "d.jsonl (dialogue 2): too_long: 900 tokens" in report.summary()


def test_summary_shows_the_first_rejections_and_counts_the_rest(tmp_path):
    rows = [GOOD] + [msgs(("user", f"問い{i}")) for i in range(12)]
    summary = load_dialogues(write_jsonl(tmp_path / "d.jsonl", rows)).summary(shown=10)
    lines = summary.splitlines()
    assert lines[0] == f"{tmp_path / 'd.jsonl'}: 1 dialogues kept, 12 rejected (not_ending_on_bot 12)"
    assert lines[1].startswith("  d.jsonl:2 (dialogue 1): not_ending_on_bot: ")
    assert len(lines) == 12 and lines[-1] == "  ... and 2 more"


def test_rejections_file_round_trips_and_replaces_the_old_one_atomically(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, msgs(("user", "徳とは？")), "{oops"])
    report = load_dialogues(path)
    out = tmp_path / "run" / "rejected.jsonl"
    write_rejections([Rejection("old", 0, None, "too_long", "old")], out)
    write_rejections(report.rejections, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"source": str(path), "index": 1, "line": 2, "reason": "not_ending_on_bot",
         "message": "the last message (1) is user; a dialogue must end on a model/assistant turn"},
        {"source": str(path), "index": 2, "line": 3, "reason": "invalid_json",
         "message": report.rejections[1].message},
    ]
    assert [Rejection(**row) for row in rows] == report.rejections
    assert [p.name for p in out.parent.iterdir()] == ["rejected.jsonl"]  # no temporary file left behind


def test_content_hash_follows_the_turns_only():
    base = Dialogue("0", (Turn("user", "幸福とは？"), Turn("assistant", "君はどう思うかね？")), {"topic": "幸福"})
    same_turns = Dialogue("7", base.turns, {"topic": "別"})
    edited = Dialogue("0", (Turn("user", "幸福とは？"), Turn("assistant", "君はどう思うかね?")))
    assert len(base.content_hash) == 64
    assert base.content_hash == same_turns.content_hash
    assert base.content_hash != edited.content_hash


def test_model_and_assistant_files_hash_the_same(tmp_path):
    as_model = write_jsonl(tmp_path / "model.jsonl", [GOOD])
    as_assistant = write_jsonl(tmp_path / "assistant.jsonl", [
        {**GOOD, "messages": [GOOD["messages"][0], {**GOOD["messages"][1], "role": "assistant"}]}])
    [a], [b] = load_dialogues(as_model).kept, load_dialogues(as_assistant).kept
    assert a.content_hash == b.content_hash


def test_dataset_fingerprint_is_the_sha256_of_the_file_bytes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    before = dataset_fingerprint(path)
    assert before == hashlib.sha256(path.read_bytes()).hexdigest()
    write_jsonl(path, [GOOD, WITH_SYSTEM])
    assert dataset_fingerprint(str(path)) != before
