
"""Templating and label masks: exactly the bot turns (with their end-of-turn marker) are trained."""

from __future__ import annotations

import copy

import torch

from socratune.data.template import (
    IGNORE_INDEX,
    PaddingCollator,
    chat_messages,
    encode,
    encode_many,
    render,
    show_example,
    supports_system_role,
)

DIALOGUE = [
    {"role": "user", "content": "友情とは何ですか？"},
    {"role": "assistant", "content": "君は友をどう選ぶのかね？"},
    {"role": "user", "content": "気が合う人です。"},
    {"role": "assistant", "content": "では、気が合わぬ者は友になれないのだろうか？"},
]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_training_text_has_no_open_generation_prompt(tiny_tokenizer):
    text = render(tiny_tokenizer, DIALOGUE)
    assert text.endswith("のだろうか？<end_of_turn>\n")
    assert not text.rstrip().endswith("<start_of_turn>model")


def test_label_mask_is_exactly_the_bot_turns_and_their_end_of_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    segments = [  # (text, trained?) in template order
        ("<bos><start_of_turn>user\n友情とは何ですか？<end_of_turn>\n<start_of_turn>model\n", False),
        ("君は友をどう選ぶのかね？<end_of_turn>\n", True),
        ("<start_of_turn>user\n気が合う人です。<end_of_turn>\n<start_of_turn>model\n", False),
        ("では、気が合わぬ者は友になれないのだろうか？<end_of_turn>\n", True),
    ]
    expected_ids, expected_labels = [], []
    for text, trained in segments:
        piece = ids(tok, text)
        expected_ids += piece
        expected_labels += piece if trained else [IGNORE_INDEX] * len(piece)

    example = encode(tok, "0", DIALOGUE)

    assert example.input_ids == expected_ids
    assert example.labels == expected_labels
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    trained_ids = [t for t in example.labels if t != IGNORE_INDEX]
    assert trained_ids.count(end_of_turn) == 2  # the model learns to stop after each reply


def test_full_text_loss_trains_every_token(tiny_tokenizer):
    example = encode(tiny_tokenizer, "0", DIALOGUE, loss_on="all")
    assert example.labels == example.input_ids


def test_system_message_is_folded_into_first_user_turn_for_gemma_style_templates(tiny_tokenizer):
    assert not supports_system_role(tiny_tokenizer)
    messages = chat_messages([{"role": "system", "content": "君はソクラテスだ。"}, *DIALOGUE], fold_system=True)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "君はソクラテスだ。\n\n友情とは何ですか？"
    example = encode(tiny_tokenizer, "0", messages)
    assert "君はソクラテスだ。" in tiny_tokenizer.decode(example.input_ids)
    assert "君はソクラテスだ。" not in tiny_tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_templates_that_render_or_silently_drop_a_system_message_are_told_apart(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert supports_system_role(tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' %}"
                               "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}")
    assert not supports_system_role(tokenizer)


def test_show_example_marks_trained_spans(tiny_tokenizer):
    shown = show_example(tiny_tokenizer, encode(tiny_tokenizer, "0", DIALOGUE))
    assert "⟦君は友をどう選ぶのかね？<end_of_turn>\n⟧" in shown
    assert "⟦では、気が合わぬ者は友になれないのだろうか？<end_of_turn>\n⟧" in shown
    assert shown.count("⟦") == 2


def test_collator_pads_to_longest_in_batch_and_masks_padding():
    batch = PaddingCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_batched_encoding_equals_one_dialogue_at_a_time(tiny_tokenizer):
    """The tokenizer is called per chunk of dialogues; every example still gets its own ids and
    labels, in order, across chunk boundaries."""
    from socratune.data.dialogues import load_dialogues
    from socratune.training.examples import bundled_data_path

    conversations = [(d.id, chat_messages(d.messages(), True)) for d in load_dialogues(bundled_data_path()).kept[:23]]
    batched = encode_many(tiny_tokenizer, conversations, chunk=5)
    assert batched == [encode(tiny_tokenizer, dialogue_id, messages) for dialogue_id, messages in conversations]
    assert len({tuple(e.input_ids) for e in batched}) == len(batched)
