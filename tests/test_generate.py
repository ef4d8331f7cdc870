"""``socratune generate``: batched replies to a JSONL file that ``socratune score`` reads as they are.

    python -m pytest -q tests/test_generate.py
"""

from __future__ import annotations

import json

from socratune.cli import main

PROMPTS = [
    {"id": "happiness", "prompt": "幸福とは何でしょうか？"},
    {"prompt": "正義とは何でしょうか？"},  # no id: the line number stands in
    {"id": 7, "messages": [{"role": "system", "content": "あなたはソクラテスです。"},
                           {"role": "user", "content": "勇気とは？"},
                           {"role": "model", "content": "君はどう考えるのかね？"},
                           {"role": "user", "content": "恐れないことだと思います。"}]},
]


def _write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")


def test_batched_replies_flow_into_score_and_do_not_depend_on_the_batch_size(default_run, default_model, tmp_path,
                                                                              capsys):
    from socratune.generation.generate import GenParams, generate_replies, read_prompts

    prompts, replies_path, scores = tmp_path / "prompts.jsonl", tmp_path / "replies.jsonl", tmp_path / "scores.jsonl"
    _write_jsonl(prompts, PROMPTS)
    assert main(["generate", str(default_run), "--input", str(prompts), "--output", str(replies_path),
                 "--max-new-tokens", "16", "--batch-size", "2"]) == 0
    assert "socratune score" in capsys.readouterr().err

    replies = [json.loads(line) for line in replies_path.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in replies] == ["happiness", 2, 7]
    assert [r["prompt"] for r in replies] == ["幸福とは何でしょうか？", "正義とは何でしょうか？",
                                              "恐れないことだと思います。"]
    # left padding: a reply is the same whether its prompt shared a batch with a longer one or went alone
    alone = generate_replies(*default_model, [i.messages for i in read_prompts(prompts)], GenParams(max_new_tokens=16),
                             batch_size=1)
    assert [r["text"] for r in replies] == alone and all(alone)

    assert main(["score", str(replies_path), "--output", str(scores)]) == 0
    scored = [json.loads(line) for line in scores.read_text(encoding="utf-8").splitlines()]
    assert [s["id"] for s in scored] == ["happiness", 2, 7]
    assert all(0 <= s["scores"]["overall"] <= 4 for s in scored)


def test_bad_prompt_lines_are_named_by_line_before_anything_is_generated(tmp_path, capsys):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(prompts, [PROMPTS[0], "{not json", {"id": 3}, {"messages": [{"role": "user", "content": "a"},
                                                                            {"role": "model", "content": "b"}]}])
    # the run directory does not even exist: the file is checked before any model is loaded
    assert main(["generate", str(tmp_path / "no-run"), "--input", str(prompts), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "3 bad line(s)" in err
    assert "prompts.jsonl:2: invalid JSON" in err
    assert "prompts.jsonl:3: give exactly one of 'prompt'" in err
    assert "prompts.jsonl:4: the last message must be a user turn" in err
    assert not out.exists()


def test_generate_wants_a_prompt_or_an_input_file(default_run, capsys):
    # the single-prompt form itself is tested in test_train.py (test_generate_prints_a_reply)
    assert main(["generate", str(default_run)]) == 2
    assert "give either a PROMPT or --input" in capsys.readouterr().err
    assert main(["generate", str(default_run), "問い", "--output", "x.jsonl"]) == 2
    assert "--output goes with --input" in capsys.readouterr().err


def _stream(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], object]:
    """Feeds ``text``'s tokens one at a time to the streamer, as generate() does; returns the pieces."""
    import torch

    from socratune.generation.generate import delta_streamer

    pieces: list[str] = []
    streamer = delta_streamer(tokenizer, pieces.append, stop=stop)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt comes first and is not part of the reply
    for token in tokenizer.encode(text, add_special_tokens=False):
        streamer.put(torch.tensor([token]))
        if streamer.criteria(torch.zeros(1, 1, dtype=torch.long), None).item():
            break  # generate() stops at the token where the criteria say so
    streamer.end()
    return pieces, streamer


REPLY = "憂鬱とは何か、君は😀知っているのかね？"


def test_streamed_pieces_never_end_inside_a_character_spelt_over_byte_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("鬱😀", add_special_tokens=False)
    # The tiny byte-level BPE spells each of these characters over three or four tokens: a naive
    # token-by-token decode would show halves of them as U+FFFD.
    assert len(ids) >= 6 and "\ufffd" in tiny_tokenizer.decode(ids[:1])
    pieces, streamer = _stream(tiny_tokenizer, REPLY)
    assert len(pieces) > 5 and "".join(pieces) == REPLY
    assert not any("\ufffd" in piece for piece in pieces)
    assert not streamer.stopped


def test_stop_strings_cut_the_stream_before_them_and_nothing_past_one_is_emitted(tiny_tokenizer):
    pieces, streamer = _stream(tiny_tokenizer, REPLY, stop=("😀",))
    assert "".join(pieces) == "憂鬱とは何か、君は" and streamer.stopped
    pieces, streamer = _stream(tiny_tokenizer, REPLY, stop=("nowhere", "何か、君"))
    assert "".join(pieces) == "憂鬱とは" and streamer.stopped
    # A possible start of a stop string is held back until it is clear, then given out whole.
    pieces, streamer = _stream(tiny_tokenizer, REPLY, stop=("君はX",))
    assert "".join(pieces) == REPLY and not streamer.stopped
    assert not any(piece.endswith("君") for piece in pieces)


def test_sampling_flags_that_would_divide_logits_into_inf_are_refused(capsys):
    for flag, value in (("--temperature", "1e-320"), ("--temperature", "nan"), ("--temperature", "-1"),
                        ("--repetition-penalty", "1e-300"), ("--repetition-penalty", "inf"), ("--top-p", "0")):
        # refused before the (missing) run is even looked at
        assert main(["generate", "no-such-run", "問い", flag, value]) == 2, (flag, value)
        assert f"{flag} must be" in capsys.readouterr().err
