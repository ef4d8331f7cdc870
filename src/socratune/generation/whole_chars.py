"""Generation that never spells a broken character.

A byte-level vocabulary (GPT-2-style BPE, as the built-in tiny model has; Llama 3, Qwen) or one
with byte fallback (Gemma, Llama 2) spells a Japanese character over several tokens, one UTF-8
byte or a few each. Nothing stops a model from following the first byte of a character with a
token that does not continue it; the decoded reply then holds U+FFFD (「恐れを急�？」). A
tokenizer of whole characters would avoid that, but it would also make every character the
tokenizer was not trained on unknown, which real Japanese data is full of; so the vocabulary stays
and decoding is constrained instead.

``whole_character_processor`` gives a logits processor that tracks, per row, where the reply's
bytes stand inside a UTF-8 character and masks every token whose bytes could not come next in
valid UTF-8: a continuation byte where a character starts, a new character where one is half
spelt, an end-of-turn token inside a character, and U+FFFD itself. Cost: a dictionary lookup per
row and step, and one mask per UTF-8 state (there are ten) built once per tokenizer.

A reply cut by ``max_new_tokens``, a time limit or a stop string can still end inside a
character; ``drop_partial_character`` removes that half from the decoded text.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

REPLACEMENT = "\ufffd"


class Utf8State(NamedTuple):
    """Where a byte stream stands inside one UTF-8 character."""

    due: int = 0  # continuation bytes still to come; 0 = between characters
    low: int = 0x80  # the range the next continuation byte must lie in
    high: int = 0xBF
    after_ef: bool = False  # the character so far is EF or EF BF: the start of U+FFFD (EF BF BD)


BETWEEN = Utf8State()


def _lead(byte: int) -> Utf8State | None:
    """The state after the first byte of a character, or None where no character starts so."""
    if byte < 0x80:
        return BETWEEN
    if 0xC2 <= byte <= 0xDF:
        return Utf8State(1)
    if 0xE0 <= byte <= 0xEF:  # E0 forbids overlong forms, ED the surrogates
        return Utf8State(2, 0xA0 if byte == 0xE0 else 0x80, 0x9F if byte == 0xED else 0xBF, byte == 0xEF)
    if 0xF0 <= byte <= 0xF4:  # F0 forbids overlong forms, F4 code points past U+10FFFF
        return Utf8State(3, 0x90 if byte == 0xF0 else 0x80, 0x8F if byte == 0xF4 else 0xBF)
    return None


def advance(state: Utf8State, data: bytes) -> Utf8State | None:
    """The state after ``data``, or None when ``data`` cannot follow ``state`` in valid UTF-8
    (U+FFFD counts as invalid: a reply that holds it is broken whoever spelt it)."""
    for byte in data:
        if state.due == 0:
            next_state = _lead(byte)
        elif not state.low <= byte <= state.high or (state.after_ef and state.due == 1 and byte == 0xBD):
            return None
        else:
            next_state = Utf8State(state.due - 1, after_ef=state.after_ef and byte == 0xBF)
        if next_state is None:
            return None
        state = next_state
    return state


def _byte_level_decoder(decoder: dict[str, Any] | None) -> str | None:
    """``"byte_level"``, ``"byte_fallback"`` or None (tokens are whole strings) for a tokenizers
    decoder description."""
    if not decoder:
        return None
    kinds = [decoder["type"]] + [d["type"] for d in decoder.get("decoders") or []]
    if "ByteLevel" in kinds:
        return "byte_level"
    if "ByteFallback" in kinds:
        return "byte_fallback"
    return None


def token_bytes(tokenizer: Any) -> list[bytes | None] | None:
    """The bytes each token id adds to a decoded reply; None for special and added tokens (they
    mark a boundary and decode to nothing in a reply). None overall when the vocabulary holds no
    partial characters, so there is nothing to guard."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    kind = _byte_level_decoder(json.loads(backend.to_str()).get("decoder"))
    if kind is None:
        return None
    if kind == "byte_level":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

        def spell(token: str) -> bytes | None:
            return bytes(byte_of[c] for c in token) if all(c in byte_of for c in token) else token.encode()
    else:

        def spell(token: str) -> bytes | None:
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                return bytes([int(token[3:5], 16)])
            return token.replace("\u2581", " ").encode()

    boundary = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [None if i in boundary or token is None else spell(token)
            for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))]


class _Table:
    """Per tokenizer: each token's bytes, and per UTF-8 state the mask of tokens that may follow."""

    def __init__(self, spelled: list[bytes | None]) -> None:
        self.spelled = spelled
        self.whole: list[bool] = []  # tokens that are whole characters: valid exactly between characters
        for data in spelled:
            try:
                self.whole.append(data is not None and REPLACEMENT not in data.decode("utf-8"))
            except UnicodeDecodeError:
                self.whole.append(False)
        self.partial = [i for i, data in enumerate(spelled) if data is not None and not self.whole[i]]
        self.masks: dict[tuple[Utf8State, int, str], torch.Tensor] = {}

    def after(self, state: Utf8State, token: int) -> Utf8State:
        """The state once ``token`` is appended (an out-of-table or boundary token: between)."""
        data = self.spelled[token] if token < len(self.spelled) else None
        if data is None or (state.due == 0 and self.whole[token]):
            return BETWEEN
        return advance(state, data) or BETWEEN  # only reached when a mask was lifted (see below)

    def mask(self, state: Utf8State, size: int, device: torch.device) -> torch.Tensor:
        """True for each of ``size`` token ids that may come next in ``state``."""
        key = (state, size, str(device))
        if key not in self.masks:
            import torch

            allowed = torch.zeros(size, dtype=torch.bool)
            if state.due == 0:
                allowed[: min(size, len(self.whole))] = torch.tensor(self.whole[:size])
                allowed[[i for i in range(size) if i >= len(self.spelled) or self.spelled[i] is None]] = True
            fitting = [i for i in self.partial if i < size and advance(state, self.spelled[i]) is not None]
            allowed[fitting] = True
            self.masks[key] = allowed.to(device)
        return self.masks[key]


@lru_cache(maxsize=4)
def _table_for(tokenizer: Any) -> _Table | None:
    spelled = token_bytes(tokenizer)
    return _Table(spelled) if spelled is not None else None


class WholeCharacterProcessor:
    """A transformers logits processor (any callable ``(input_ids, scores) -> scores`` is one)
    for one ``generate`` call: the first call sees the prompt, which ends between characters;
    each later call sees one more token per row."""

    def __init__(self, table: _Table) -> None:
        self.table = table
        self.states: list[Utf8State] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import torch

        if self.states is None:
            self.states = [BETWEEN] * input_ids.shape[0]
        else:
            last = input_ids[:, -1].tolist()
            self.states = [self.table.after(state, token) for state, token in zip(self.states, last)]
        masks = torch.stack([self.table.mask(state, scores.shape[-1], scores.device) for state in self.states])
        # A row whose every likely token is masked still has the byte tokens; should a vocabulary
        # lack them, the row goes unmasked rather than produce nothing.
        masks[~masks.any(dim=-1)] = True
        return scores.masked_fill(~masks, float("-inf"))


def whole_character_processor(tokenizer: Any) -> WholeCharacterProcessor | None:
    """A fresh processor for one ``generate`` call, or None where the tokenizer's tokens are
    whole strings (nothing to guard)."""
    table = _table_for(tokenizer)
    return WholeCharacterProcessor(table) if table is not None else None


def drop_partial_character(text: str) -> str:
    """``text`` without the half character a cut reply may end on (it decodes to U+FFFD), and
    without the whitespace before it."""
    return text.rstrip().rstrip(REPLACEMENT).rstrip()
