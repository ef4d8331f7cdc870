"""The split: seeded, stable under reordering, grouped by user prompt, persisted and verified."""

from __future__ import annotations

import random

import pytest

from socratune.data import Dialogue, Turn
from socratune.split import apply_split, load_split, save_split, split_dialogues, verify_split


def dialogue(i: int, question: str | None = None, reply: str = "君はどう思うかね？") -> Dialogue:
    return Dialogue(str(i), (Turn("user", question or f"質問その{i}は何でしょうか"), Turn("assistant", reply)))


def ids(split):
    return split.train, split.eval, split.held_out


def test_same_seed_same_split_and_different_seed_different_split():
    data = [dialogue(i) for i in range(200)]
    assert ids(split_dialogues(data, seed=1)) == ids(split_dialogues(data, seed=1))
    assert split_dialogues(data, seed=1).train != split_dialogues(data, seed=2).train


def test_proportions_and_eval_cap():
    split = split_dialogues([dialogue(i) for i in range(1000)], seed=0, train_frac=0.8, eval_cap=100)
    assert (len(split.train), len(split.eval), len(split.held_out)) == (800, 100, 100)
    assert set(split.train) | set(split.eval) | set(split.held_out) == {str(i) for i in range(1000)}
    assert len(split_dialogues([dialogue(i) for i in range(10)], seed=0).eval) == 2


def test_a_shared_user_prompt_never_lands_on_both_sides():
    data = [dialogue(i, question=f"同じ問い{i % 30}") for i in range(300)]
    for seed in range(5):
        split = split_dialogues(data, seed=seed)
        questions = {side: {d.first_user for d in data if d.id in set(getattr(split, side))}
                     for side in ("train", "eval", "held_out")}
        assert not questions["train"] & questions["eval"]
        assert not questions["train"] & questions["held_out"]


def test_reordering_the_file_keeps_each_dialogues_side():
    data = [dialogue(i) for i in range(300)]
    shuffled = data[:]
    random.Random(3).shuffle(shuffled)
    a, b = split_dialogues(data, seed=7), split_dialogues(shuffled, seed=7)
    assert set(a.train) == set(b.train) and set(a.eval) == set(b.eval)


def test_save_load_round_trip_and_verification(tmp_path):
    data = [dialogue(i) for i in range(50)]
    split = split_dialogues(data, seed=0)
    save_split(split, tmp_path / "split.json")
    loaded = load_split(tmp_path / "split.json")
    assert loaded == split
    assert verify_split(loaded, data) == []
    changed = data[:-1] + [dialogue(49, reply="違う答えだね？")]
    assert verify_split(loaded, changed) == ["dialogue 49 changed since the split was made"]
    assert verify_split(loaded, data[1:]) == ["dialogue 0 is in the split but not in the data"]
    train, evaluation = apply_split(loaded, data)
    assert [d.id for d in train] == split.train and [d.id for d in evaluation] == split.eval


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="train_frac"):
        split_dialogues([dialogue(0)], seed=0, train_frac=0)
