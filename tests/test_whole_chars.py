"""Replies in whole characters: the UTF-8 state machine, the token byte table, the logits mask,
and a model that would spell broken characters constantly (random weights) never emitting one."""

from __future__ import annotations

import pytest

from socratune.generation.whole_chars import (
    BETWEEN,
    REPLACEMENT,
    Utf8State,
    advance,
    drop_partial_character,
    token_bytes,
    whole_character_processor,
)


def test_advance_follows_utf8_and_refuses_what_is_not():
    assert advance(BETWEEN, "幸せ？a".encode()) == BETWEEN
    first = advance(BETWEEN, "幸".encode()[:1])
    assert first is not None and first.due == 2
    assert advance(first, "幸".encode()[1:]) == BETWEEN
    for broken in (b"\xe3A", b"\xe3\xe3", b"\xe0\x80", b"\xed\xa0", b"\xf4\x90", "\ufffd".encode()):
        state = advance(BETWEEN, broken[:-1])  # a valid start, then the byte that breaks it
        assert state is not None and advance(state, broken[-1:]) is None, broken
    for never_first in (b"\x80", b"\xc0", b"\xc1", b"\xf5", b"\xff"):
        assert advance(BETWEEN, never_first) is None
    assert advance(BETWEEN, b"\xef\xbf\xbc") == BETWEEN  # U+FFFC, next to U+FFFD, is a character
    assert advance(BETWEEN, "\U0001f600".encode()) == BETWEEN


def test_a_cut_reply_loses_its_half_character():
    assert drop_partial_character("君はどう思うかね？ \ufffd") == "君はどう思うかね？"
    assert drop_partial_character("なぜか。") == "なぜか。"


def test_the_tiny_tokenizer_spells_text_in_its_own_bytes(tiny_tokenizer):
    spelled = token_bytes(tiny_tokenizer)
    text = "では、君はどう考えるのかね？ 勇気とは何か。"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(spelled[i] for i in ids) == text.encode()
    assert all(spelled[i] is None for i in tiny_tokenizer.all_special_ids)


def _token_of_byte(tokenizer, byte: int) -> int:
    spelled = token_bytes(tokenizer)
    return spelled.index(bytes([byte]))


def test_the_mask_lets_only_a_continuation_follow_half_a_character(tiny_tokenizer):
    import torch

    processor = whole_character_processor(tiny_tokenizer)
    eos = tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    question = tiny_tokenizer.convert_tokens_to_ids(tiny_tokenizer.tokenize("？"))[0]
    scores = torch.zeros(2, len(tiny_tokenizer))
    scores[:, question] = scores[:, eos] = 10.0
    prompt = torch.tensor([[5, 6], [5, 6]])
    first = processor(prompt, scores.clone())
    assert torch.isfinite(first[:, [question, eos]]).all()  # between characters: anything whole goes

    half = _token_of_byte(tiny_tokenizer, "幸".encode()[0])
    ascii_a = _token_of_byte(tiny_tokenizer, ord("a"))
    masked = processor(torch.tensor([[5, 6, half], [5, 6, ascii_a]]), scores.clone())
    assert masked[0, question] == float("-inf") and masked[0, eos] == float("-inf")
    allowed = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    spelled = token_bytes(tiny_tokenizer)
    assert allowed and all(advance(Utf8State(2), spelled[i]) is not None for i in allowed)
    assert torch.isfinite(masked[1, [question, eos]]).all()  # the other row is between characters


def test_tokens_of_whole_strings_need_no_guard():
    class WordTokenizer:  # a vocabulary without a byte-level or byte-fallback decoder
        backend_tokenizer = None

    assert whole_character_processor(WordTokenizer()) is None


@pytest.mark.slow
@pytest.mark.parametrize("guarded", [True, False])
def test_an_untrained_tiny_model_never_emits_a_broken_character(guarded, monkeypatch):
    """Random weights pick byte tokens at random, so unguarded replies are full of U+FFFD; the
    guarded ones never hold one, whatever max_new_tokens cuts them at. The unguarded run is the
    control that shows this test can fail."""
    import torch

    from socratune.generation import generate
    from socratune.generation.generate import GenParams, generate_replies
    from socratune.model.tiny import build_tiny

    if not guarded:
        monkeypatch.setattr(generate, "whole_character_kwargs", lambda tokenizer: {})
        monkeypatch.setattr(generate, "drop_partial_character", lambda text: text)
    model, tokenizer = build_tiny(seed=3)
    prompts = [[{"role": "user", "content": text}] for text in ("幸福とは？", "勇気とは何だと思いますか？", "なぜ")]
    replies = []
    for max_new_tokens in range(1, 25):
        torch.manual_seed(max_new_tokens)
        params = GenParams(max_new_tokens=max_new_tokens, temperature=1.0)
        replies += generate_replies(model, tokenizer, prompts, params, batch_size=3)
    broken = [reply for reply in replies if REPLACEMENT in reply]
    if guarded:
        assert not broken and sum(map(len, replies)) > 300
    else:
        assert len(broken) > len(replies) // 2


@pytest.mark.slow
def test_a_streamed_reply_cut_inside_a_character_shows_no_half_of_it():
    """Sampled replies cut at every length: the streamed pieces add up to the batch reply drawn
    from the same seed, and neither holds U+FFFD, also when the cut falls inside a character."""
    import torch

    from socratune.generation.generate import (
        GenParams,
        delta_streamer,
        generate_replies,
        prompt_texts,
        whole_character_kwargs,
    )
    from socratune.model.tiny import build_tiny

    model, tokenizer = build_tiny(seed=3)
    conversation = [{"role": "user", "content": "勇気とは何だと思いますか？"}]
    ids = tokenizer(prompt_texts(tokenizer, [conversation]), add_special_tokens=False, return_tensors="pt")
    cut_inside = 0
    for max_new_tokens in range(1, 21):
        params = GenParams(max_new_tokens=max_new_tokens, temperature=1.0)
        pieces: list[str] = []
        torch.manual_seed(max_new_tokens)
        with torch.no_grad():
            output = model.generate(**ids, **params.generate_kwargs(), **whole_character_kwargs(tokenizer),
                                    streamer=delta_streamer(tokenizer, pieces.append),
                                    pad_token_id=tokenizer.pad_token_id)
        raw = tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        cut_inside += raw.endswith(REPLACEMENT)
        torch.manual_seed(max_new_tokens)
        reply = generate_replies(model, tokenizer, [conversation], params)[0]
        assert "".join(pieces) == reply and REPLACEMENT not in reply, (max_new_tokens, raw)
    assert cut_inside  # some lengths did end inside a character


def test_a_byte_fallback_vocabulary_is_spelt_too():
    """Gemma's and Llama 2's kind: whole pieces with ▁ for a space, and <0xHH> tokens for bytes
    outside the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for piece in ("▁", "君", "は", "か", "ね", "？", "▁君"):
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, [("▁", "君")], byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    text = " 君は幸せかね？"  # 幸 and せ are not in the vocabulary: three byte tokens each
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    spelled = token_bytes(tokenizer)
    assert b"".join(spelled[i] for i in ids) == text.encode() and len(ids) == 11
    assert spelled[tokenizer.eos_token_id] is None and whole_character_processor(tokenizer) is not None
