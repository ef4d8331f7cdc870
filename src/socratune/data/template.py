"""Chat templating, label masks and batch collation: the one home of "which tokens are trained".

A dialogue is rendered with the tokenizer's own chat template and *no* trailing generation
prompt (a training text that ends in ``<start_of_turn>model`` teaches the model to open a turn it
never fills). Labels are the input ids on bot turns, including the template's end-of-turn
marker so the model learns to stop, and ``IGNORE_INDEX`` everywhere else.

Bot spans are found by rendering prefixes of the conversation: the text of the conversation up
to a bot turn *with* the generation prompt ends where that turn's content starts, and the text
up to and including the turn ends where it stops. That works for any template whose renderings
are prefixes of each other, which is checked rather than assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import ModelError
from .dialogues import BOT, Dialogue, Rejection

IGNORE_INDEX = -100
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


@dataclass(frozen=True)
class Example:
    """One tokenized dialogue: ids and labels of equal length, ready for the collator."""

    dialogue_id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def supports_system_role(tokenizer: Any) -> bool:
    """Whether the chat template renders a system message (Gemma's raises; some drop it silently)."""
    from jinja2 import TemplateError

    marker = "SYSTEM-ROLE-PROBE"
    probe = [{"role": "system", "content": marker}, {"role": "user", "content": "u"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    except TemplateError:  # what a template's raise_exception(...) raises
        return False
    return marker in rendered


SYSTEM_FOLD_SEPARATOR = "\n\n"  # between a folded system prompt and the first user turn


def chat_messages(messages: list[dict[str, str]], fold_system: bool) -> list[dict[str, str]]:
    """Messages ready for the template; a leading system message is folded into the first user
    turn when the template has no system role, so its text is kept, not dropped."""
    if not (fold_system and messages and messages[0]["role"] == "system"):
        return [dict(m) for m in messages]
    system, first_user, *rest = messages
    merged = {"role": "user", "content": system["content"] + SYSTEM_FOLD_SEPARATOR + first_user["content"]}
    return [merged, *(dict(m) for m in rest)]


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def bot_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full training text and the character spans of every bot turn in it (end-of-turn included)."""
    text = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != BOT:
            continue
        before = render(tokenizer, messages[:index], add_generation_prompt=True)
        through = text if index + 1 == len(messages) else render(tokenizer, messages[: index + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ModelError(
                "the tokenizer's chat template does not render conversations as prefixes of each other, "
                "so bot turns cannot be located for the label mask"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode(tokenizer: Any, dialogue_id: str, messages: list[dict[str, str]], loss_on: str = "bot") -> Example:
    """Tokenize a templated dialogue; labels cover bot turns (``loss_on="bot"``) or all text."""
    return encode_many(tokenizer, [(dialogue_id, messages)], loss_on)[0]


def encode_many(tokenizer: Any, conversations: list[tuple[str, list[dict[str, str]]]], loss_on: str = "bot",
                chunk: int = 512) -> list[Example]:
    """``encode`` for many dialogues, ``chunk`` per tokenizer call: the fast tokenizer then works
    through a batch in native code (on every core) instead of being entered once per dialogue,
    while the character offsets it returns stay bounded in memory."""
    examples = []
    for first in range(0, len(conversations), chunk):
        part = conversations[first : first + chunk]
        rendered = [bot_spans(tokenizer, messages) for _, messages in part]
        encodings = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for (dialogue_id, _), (text, spans), input_ids, offsets in zip(
            part, rendered, encodings["input_ids"], encodings["offset_mapping"]
        ):
            labels = list(input_ids) if loss_on == "all" else _bot_labels(input_ids, offsets, len(text), spans)
            examples.append(Example(dialogue_id, input_ids, labels))
    return examples


def _bot_labels(input_ids: list[int], offsets: list[tuple[int, int]], text_length: int,
                spans: list[tuple[int, int]]) -> list[int]:
    """A token is trained when its first character lies in a bot span (a per-character mask makes
    that one lookup per token)."""
    trained = bytearray(text_length + 1)
    for start, end in spans:
        trained[start:end] = b"\x01" * (end - start)
    return [token if trained[start] else IGNORE_INDEX for token, (start, _) in zip(input_ids, offsets)]


def encode_dialogues(
    tokenizer: Any, dialogues: list[Dialogue], source: str, max_seq_len: int, loss_on: str = "bot"
) -> tuple[list[Example], list[Rejection]]:
    """Encode every dialogue; too long ones and ones with nothing to train are rejected, not cut."""
    fold = not supports_system_role(tokenizer)
    encoded = encode_many(tokenizer, [(d.id, chat_messages(d.messages(), fold)) for d in dialogues], loss_on)
    examples, rejections = [], []
    for dialogue, example in zip(dialogues, encoded):
        index = int(dialogue.id)
        if len(example.input_ids) > max_seq_len:
            rejections.append(
                Rejection(source, index, None, "too_long",
                          f"{len(example.input_ids)} tokens after templating; data.max_seq_len is {max_seq_len}")
            )
        elif example.trained_tokens == 0:
            rejections.append(Rejection(source, index, None, "no_trained_tokens", "no bot token left to train on"))
        else:
            examples.append(example)
    return examples, rejections


def show_example(tokenizer: Any, example: Example) -> str:
    """The rendered text with trained spans marked ⟦like this⟧, for ``--show-example``."""
    pieces, trained_run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if trained_run:
                pieces.append(TRAINED_OPEN + tokenizer.decode(trained_run) + TRAINED_CLOSE)
                trained_run = []
            pieces.append(tokenizer.decode([token]))
        else:
            trained_run.append(token)
    if trained_run:
        pieces.append(TRAINED_OPEN + tokenizer.decode(trained_run) + TRAINED_CLOSE)
    return "".join(pieces)


class PaddingCollator:
    """Pads a batch to its longest example (not to a fixed length): ids with the pad token,
    labels with IGNORE_INDEX, and an attention mask that hides the padding."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids, labels, mask = [], [], []
        for feature in features:
            pad = longest - len(feature["input_ids"])
            ids.append(feature["input_ids"] + [self.pad_token_id] * pad)
            labels.append(feature["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * len(feature["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
