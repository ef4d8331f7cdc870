"""The split: seeded, stable under reordering and appending, grouped by user prompt, persisted
and verified.

Run: ``PYTHONPATH=src python -m pytest tests/test_split.py -q``
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import pytest

from socratune.core.errors import DataError
from socratune.data.dialogues import Dialogue, Turn, load_dialogues
from socratune.data.split import (
    apply_split,
    load_split,
    save_split,
    split_dialogues,
    verify_split,
)

TOPICS = ("幸福", "正義", "勇気", "友情", "美", "知", "徳", "死", "愛", "節制")


def dialogue(i: int, question: str | None = None, reply: str = "君はどう思うかね？") -> Dialogue:
    question = question or f"{TOPICS[i % len(TOPICS)]}について、その{i}番目の問いを考えたいのです。"
    return Dialogue(str(i), (Turn("user", question), Turn("assistant", reply)))


def sides(split):
    return split.train, split.eval, split.held_out


def side_of(split) -> dict[str, str]:
    return {i: side for side in ("train", "eval", "held_out") for i in getattr(split, side)}


def test_same_seed_gives_an_identical_split_and_a_different_seed_a_different_one():
    data = [dialogue(i) for i in range(200)]
    first = split_dialogues(data, seed=1)
    assert split_dialogues(data, seed=1) == first
    other = split_dialogues(data, seed=2)
    assert set(other.train) != set(first.train)
    assert sorted(other.train + other.eval + other.held_out) == sorted(first.train + first.eval + first.held_out)


def test_proportions_and_eval_cap_follow_the_rules_exactly():
    split = split_dialogues([dialogue(i) for i in range(1000)], seed=0, train_frac=0.8, eval_cap=100)
    assert (len(split.train), len(split.eval), len(split.held_out)) == (800, 100, 100)
    assert sorted(split.train + split.eval + split.held_out, key=int) == [str(i) for i in range(1000)]
    assert set(split.hashes) == {str(i) for i in range(1000)}
    assert [len(s) for s in sides(split_dialogues([dialogue(i) for i in range(10)], seed=0))] == [8, 2, 0]
    assert [len(s) for s in sides(split_dialogues([dialogue(i) for i in range(10)], seed=0, eval_cap=0))] == [8, 0, 2]
    assert [len(s) for s in sides(split_dialogues([dialogue(i) for i in range(10)], 0, train_frac=1))] == [10, 0, 0]


def test_train_takes_whole_groups_until_it_reaches_its_share():
    # 300 prompts asked three times each: train must hold whole groups, at least 80% of 900.
    data = [dialogue(i, question=f"{TOPICS[i % 10]}とは何か、問い{i % 300}") for i in range(900)]
    split = split_dialogues(data, seed=4, train_frac=0.8, eval_cap=100)
    assert len(split.train) == 720 and len(split.eval) == 99 and len(split.held_out) == 81


def test_small_data_still_gets_one_eval_dialogue():
    for n in (2, 3):
        split = split_dialogues([dialogue(i) for i in range(n)], seed=0, train_frac=0.99)
        assert (len(split.train), len(split.eval)) == (n - 1, 1)
    one = split_dialogues([dialogue(0)], seed=0)
    assert sides(one) == (["0"], [], [])


def test_dialogues_all_sharing_one_prompt_all_go_to_train():
    data = [dialogue(i, question="幸福とは何でしょうか？", reply=f"答え{i}かね？") for i in range(5)]
    assert [len(s) for s in sides(split_dialogues(data, seed=0))] == [5, 0, 0]


def test_a_shared_user_prompt_never_lands_on_two_sides():
    data = [dialogue(i, question=f"同じ問い{i % 30}") for i in range(300)]
    for seed in range(5):
        split = split_dialogues(data, seed=seed)
        where = side_of(split)
        by_question: dict[str, set[str]] = {}
        for d in data:
            by_question.setdefault(d.first_user, set()).add(where[d.id])
        assert all(len(found) == 1 for found in by_question.values())
        assert split.train and split.eval


def test_any_shared_user_turn_groups_dialogues_even_through_a_chain_and_whitespace():
    def multi(i: int, *questions: str) -> Dialogue:
        turns = [t for q in questions for t in (Turn("user", q), Turn("assistant", "それはなぜかね？"))]
        return Dialogue(str(i), tuple(turns))

    chained = [
        multi(0, "勇気とは何か", "恐れを 知らないことです"),
        multi(1, "無謀とは\n違うのですか", " 恐れを\u3000知らないことです\n"),  # dialogue 0's turn, other spacing
        multi(2, "無謀とは  違うのですか", "では臆病とは"),  # shares its first turn with dialogue 1
    ]
    others = [dialogue(i) for i in range(3, 40)]
    for seed in range(20):
        where = side_of(split_dialogues(chained + others, seed=seed, train_frac=0.5, eval_cap=10))
        assert where["0"] == where["1"] == where["2"]


@pytest.mark.slow
def test_reordering_the_file_keeps_every_dialogues_side_and_order(tmp_path):
    rows = [{"messages": [{"role": "user", "content": d.turns[0].content},
                          {"role": "model", "content": f"では{i}番目の君に聞こう。なぜそう思うのかね？"}]}
            for i, d in enumerate(dialogue(i, question=f"同じ問い{i % 90}" if i % 3 else None) for i in range(300))]
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    for name, content in (("a.jsonl", rows), ("b.jsonl", shuffled)):
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content),
                                     encoding="utf-8")
    a, b = (load_dialogues(tmp_path / name).kept for name in ("a.jsonl", "b.jsonl"))
    split_a, split_b = split_dialogues(a, seed=7), split_dialogues(b, seed=7)
    for side in ("train", "eval", "held_out"):
        side_a, side_b = getattr(split_a, side), getattr(split_b, side)
        assert [split_a.hashes[i] for i in side_a] == [split_b.hashes[i] for i in side_b]
    assert split_a.train != split_b.train  # the ids did change: the file really was reordered


def test_appending_dialogues_moves_few_of_the_old_ones():
    old = [dialogue(i) for i in range(500)]
    before = split_dialogues(old, seed=11)
    after = split_dialogues(old + [dialogue(i) for i in range(500, 550)], seed=11)
    old_ids = {d.id for d in old}
    train_before, train_after = set(before.train), set(after.train) & old_ids
    # Old dialogues keep their relative order, so one train set contains the other ...
    assert train_before <= train_after or train_after <= train_before
    # ... and the boundary only shifts by a handful (a shuffle over positions would move ~100).
    assert len(train_before ^ train_after) <= 25


def test_save_load_round_trip(tmp_path):
    data = [dialogue(i) for i in range(50)]
    split = split_dialogues(data, seed=3, train_frac=0.7, eval_cap=5)
    path = tmp_path / "run" / "split.json"
    save_split(split, path)
    assert load_split(path) == split
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary file left behind


def test_verify_split_accepts_the_same_data_and_names_every_difference():
    data = [dialogue(i) for i in range(50)]
    split = split_dialogues(data, seed=0)
    assert verify_split(split, list(reversed(data))) == []
    edited = data[:7] + [dialogue(7, reply="違う答えだね？")] + data[8:]
    assert verify_split(split, edited) == ["dialogue 7 changed since the split was made"]
    assert verify_split(split, data[:10] + data[11:]) == ["dialogue 10 is in the split but not in the data"]
    assert verify_split(split, data + [dialogue(50)]) == ["dialogue 50 is new since the split was made"]
    assert verify_split(split, [dialogue(0, reply="別の答え")] + data[1:9] + data[10:]) == [
        "dialogue 9 is in the split but not in the data", "dialogue 0 changed since the split was made"]


def test_apply_split_returns_train_and_eval_dialogues_in_split_order():
    data = [dialogue(i) for i in range(40)]
    split = split_dialogues(data, seed=5)
    train, evaluation = apply_split(split, data)
    assert [d.id for d in train] == split.train and [d.id for d in evaluation] == split.eval
    assert all(isinstance(d, Dialogue) for d in train + evaluation)


@pytest.mark.parametrize("change, fragment", [
    (lambda raw: "not json", "cannot read the split"),
    (lambda raw: [raw], "expected a JSON object"),
    (lambda raw: {k: v for k, v in raw.items() if k != "hashes"}, "missing keys ['hashes']"),
    (lambda raw: {**raw, "eval_frac": 0.2}, "unknown keys ['eval_frac']"),
    (lambda raw: {**raw, "seed": "0"}, "seed and eval_cap must be integers"),
    (lambda raw: {**raw, "train": [0, 1]}, "train must be a list of dialogue ids"),
    (lambda raw: {**raw, "eval": raw["eval"] + raw["train"][:1]}, "appears more than once"),
    (lambda raw: {**raw, "hashes": {}}, "hashes must cover exactly the ids"),
])
def test_a_damaged_split_file_is_a_data_error_naming_the_file(tmp_path, change, fragment):
    raw = asdict(split_dialogues([dialogue(i) for i in range(10)], seed=0))
    changed = change(raw)
    path = tmp_path / "split.json"
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed), encoding="utf-8")
    with pytest.raises(DataError, match="split.json") as caught:
        load_split(path)
    assert fragment in str(caught.value)


def test_a_missing_split_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="split file .*split.json does not exist"):
        load_split(tmp_path / "split.json")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"train_frac": 0}, "train_frac must be in"),
    ({"train_frac": 1.5}, "train_frac must be in"),
    ({"train_frac": float("nan")}, "train_frac must be in"),
    ({"eval_cap": -1}, "eval_cap must be >= 0"),
])
def test_bad_arguments_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        split_dialogues([dialogue(0), dialogue(1)], seed=0, **kwargs)


def test_an_empty_list_cannot_be_split():
    with pytest.raises(ValueError, match="no dialogues to split"):
        split_dialogues([], seed=0)
