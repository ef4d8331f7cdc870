"""Data validation: every rejected dialogue is named with file, index, line and reason."""

from __future__ import annotations

import json

import pytest

from socratune.data import load_dialogues, require_usable, write_rejections
from socratune.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "幸福とは？"}, {"role": "model", "content": "君はどう思うかね？"}],
        "source_file": "a.txt", "extract_range": "2-3"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_json_list_keeps_metadata_and_normalises_bot_roles(tmp_path):
    path = tmp_path / "d.json"
    other = {"messages": [{"role": "system", "content": "君はソクラテスだ。"}, {"role": "user", "content": "正義とは？"},
                          {"role": "assistant", "content": "では聞こう、不正とは何かね？"}]}
    path.write_text(json.dumps([GOOD, other], ensure_ascii=False), encoding="utf-8")
    report = load_dialogues(path)
    assert report.rejections == []
    assert [d.id for d in report.kept] == ["0", "1"]
    assert report.kept[0].metadata == {"source_file": "a.txt", "extract_range": "2-3"}
    assert [t.role for t in report.kept[0].turns] == ["user", "assistant"]
    assert report.kept[1].turns[0].role == "system"


@pytest.mark.parametrize("row, reason, fragment", [
    ('{"messages": [', "invalid_json", "not valid JSON at line 2"),
    ("[1, 2]", "not_an_object", "expected an object"),
    ({"text": "x"}, "missing_messages", "'messages'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "bad_role", "role 'bot'; allowed: user, model, assistant"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "model", "content": "かね？"}]}, "empty_content",
     "message 1 (user) has empty content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "not_alternating",
     "turn 2 is user"),
    ({"messages": [{"role": "user", "content": "a"}]}, "not_ending_on_bot", "end on a bot"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "model", "content": "b"}]}, "misplaced_system", "only come first"),
])
def test_each_rejection_names_file_line_index_and_reason(tmp_path, row, reason, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    report = load_dialogues(path)
    assert len(report.kept) == 1
    [rejection] = report.rejections
    assert (rejection.reason, rejection.index, rejection.line) == (reason, 1, 2)
    assert fragment in rejection.message
    assert rejection.where() == "d.jsonl:2 (dialogue 1)"
    assert report.counts() == {"kept": 1, "rejected": 1, reason: 1}
    assert reason in report.summary() and "d.jsonl:2" in report.summary()


def test_blank_lines_count_for_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", "{broken"])
    [rejection] = load_dialogues(path).rejections
    assert rejection.line == 3 and "line 3" in rejection.message


def test_no_usable_dialogue_is_a_data_error_naming_the_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match="no usable dialogue left in .*d.jsonl"):
        require_usable(load_dialogues(path))


def test_malformed_json_list_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"messages": []},\n {"messages": \n]', encoding="utf-8")
    with pytest.raises(DataError, match="d.json: not valid JSON at line 4"):
        load_dialogues(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dialogues(tmp_path / "nope.json")


def test_rejections_file_round_trips(tmp_path):
    report = load_dialogues(write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": [{"role": "user", "content": "a"}]}]))
    out = tmp_path / "run" / "rejected.jsonl"
    write_rejections(report.rejections, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"source": str(tmp_path / "d.jsonl"), "index": 1, "line": 2, "reason": "not_ending_on_bot",
                     "message": "the dialogue must end on a bot (model/assistant) turn"}]
