"""Reply generation shared by the style callback, ``socratune generate``, chat and serve.

Prompts are rendered with the chat template *with* the generation prompt (the opposite of
training text), batched with left padding so every row's reply starts at the same column, and
decoded without special tokens.

    socratune generate runs/tiny "幸福とは何でしょうか？"
    socratune generate runs/tiny --input prompts.jsonl --output replies.jsonl --batch-size 16
    socratune score replies.jsonl

A prompts file holds one JSON object per line: ``{"id": ..., "prompt": "..."}`` or, for a
conversation, ``{"id": ..., "messages": [...]}`` ending on a user turn (``id`` is optional and
defaults to the line number). Replies come out as ``{"id", "text", "prompt"}``, the input format of
``socratune score``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import DataError
from ..data.dialogues import BOT, ROLE_ALIASES, jsonl_lines, read_text_file, refuse_bad_lines
from ..data.template import chat_messages, render, supports_system_role
from .whole_chars import drop_partial_character, whole_character_processor

log = logging.getLogger("socratune.generate")


# Below this a temperature or repetition penalty divides logits into inf/nan (1e-320 does), and a
# temperature so near zero means greedy anyway: 0 is the way to ask for that.
MIN_DIVISOR = 0.01


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy, reproducible
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


def whole_character_kwargs(tokenizer: Any) -> dict[str, Any]:
    """``generate`` arguments that keep every reply in whole characters (``whole_chars``), for
    one call: the processor tracks that call's rows."""
    from transformers import LogitsProcessorList

    processor = whole_character_processor(tokenizer)
    return {"logits_processor": LogitsProcessorList([processor])} if processor is not None else {}


def prompt_texts(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[str]:
    fold = not supports_system_role(tokenizer)
    return [render(tokenizer, chat_messages(c, fold), add_generation_prompt=True) for c in conversations]


def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    params: GenParams = GenParams(),
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
    synced: bool = False,
) -> list[str]:
    """One reply per conversation (each a list of messages ending on a user turn), in input order.

    Prompts are batched shortest first, so a batch pads its rows to similar lengths instead of
    to the longest prompt of the file. ``on_batch(done, total)`` follows the progress.
    ``synced``: the model is sharded over processes (FSDP, ZeRO-3), so every process calls this
    with the same prompts and each forward is a collective; transformers' ``synced_gpus`` keeps
    them stepping together until all are done.
    """
    import torch

    texts = prompt_texts(tokenizer, conversations)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    replies: list[str] = [""] * len(texts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in rows], add_special_tokens=False, padding=True,
                              return_tensors="pt").to(model.device)
            with torch.no_grad():
                output = model.generate(**batch, **params.generate_kwargs(), **whole_character_kwargs(tokenizer),
                                        pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                replies[i] = drop_partial_character(text.strip())
            if on_batch:
                on_batch(start + len(rows), len(order))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return replies


def delta_streamer(tokenizer: Any, emit: Callable[[str], None], lock: Any = None, stop: tuple[str, ...] = (),
                   cancel: Any = None):
    """A transformers streamer that calls ``emit`` with the reply's new text after every token.

    Not ``TextIteratorStreamer``: it holds text back until a space, newline or CJK ideograph, so
    a Japanese reply in kana would arrive in one piece at the end. Here the whole reply is decoded
    each step (cheap at reply lengths) and what is new is emitted, except a trailing half of a
    multi-byte character (byte-level BPE spells one character over several tokens; the half
    decodes to U+FFFD until the rest arrives, and is dropped if the reply ends there) and trailing
    whitespace, so the pieces add up to exactly the reply that ``generate_replies`` returns.
    ``lock`` guards the tokenizer where other threads use it too (the server).

    ``stop``: strings that end the reply (OpenAI's ``stop``). The reply is cut before the first
    one, ``stopped`` turns true, and the streamer's ``criteria`` (pass it to ``generate`` as
    ``stopping_criteria``) ends generation at that token. Text that could be the start of a stop
    string is held back until it is clear that it is not, so no piece is ever taken back.
    ``cancel``: a ``threading.Event``; once set (a client hung up), ``criteria`` ends generation
    at the next token.
    """
    import torch
    from transformers import StoppingCriteria
    from transformers.generation.streamers import BaseStreamer

    guard = lock if lock is not None else contextlib.nullcontext()

    class DeltaStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.ids: list[int] = []
            self.sent = 0
            self.prompt_seen = False
            self.stopped = False  # a stop string was met
            self.criteria = _FlagCriteria(self)

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() hands the prompt over first
                self.prompt_seen = True
                return
            if self.stopped:
                return
            self.ids.extend(value.reshape(-1).tolist())
            text = self._text()
            if self._cut_at_stop(text):
                return
            if not text.endswith("\ufffd"):
                self._flush(text[: len(text) - _partial_stop_length(text, stop)].rstrip())

        def end(self) -> None:
            if not self.stopped:
                text = self._text()
                if not self._cut_at_stop(text):
                    self._flush(drop_partial_character(text))

        def _cut_at_stop(self, text: str) -> bool:
            found = [i for i in (text.find(s) for s in stop) if i >= 0]
            if not found:
                return False
            self.stopped = True
            self._flush(text[: min(found)].rstrip())
            return True

        def _text(self) -> str:
            with guard:
                return tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

        def _flush(self, text: str) -> None:
            if len(text) > self.sent:
                emit(text[self.sent :])
                self.sent = len(text)

    class _FlagCriteria(StoppingCriteria):
        def __init__(self, streamer: DeltaStreamer) -> None:
            self.streamer = streamer

        def __call__(self, input_ids, scores, **kwargs) -> Any:
            done = self.streamer.stopped or (cancel is not None and cancel.is_set())
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return DeltaStreamer()


def _partial_stop_length(text: str, stop: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


# --- prompt files for `socratune generate --input` ------------------------------------------


@dataclass(frozen=True)
class PromptItem:
    id: Any  # as given in the file, or the 1-based line number
    messages: list[dict[str, str]]  # ends on a user turn; bot roles normalised to "assistant"

    @property
    def prompt(self) -> str:
        """The last user message: what ``score`` checks the reply against."""
        return self.messages[-1]["content"]


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    expected = "user"
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {number} must be an object with a string 'content'"
        given = message.get("role")
        role = ROLE_ALIASES.get(given) if isinstance(given, str) else None
        if role == "system" and number == 1:
            continue
        if role != expected:
            return (f"message {number} has role {given!r}; expected {expected} "
                    "(turns alternate, an optional system message comes first)")
        if not message["content"].strip():
            return f"message {number} is empty"
        expected = BOT if role == "user" else "user"
    if expected != BOT:
        return "the last message must be a user turn (the one to reply to)"
    return None


def _parse_prompt_line(item: Any, number: int) -> PromptItem | str:
    if not isinstance(item, dict):
        return "expected a JSON object with 'prompt' or 'messages'"
    if ("prompt" in item) == ("messages" in item):
        return "give exactly one of 'prompt' (a string) or 'messages' (a conversation ending on a user turn)"
    if "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            return "'prompt' must be a non-empty string"
        messages = [{"role": "user", "content": item["prompt"]}]
    else:
        if problem := _messages_problem(item["messages"]):
            return problem
        messages = [{"role": ROLE_ALIASES[m["role"]], "content": m["content"]} for m in item["messages"]]
    return PromptItem(item.get("id", number), messages)


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Every prompt of a JSONL file; any bad line makes it a DataError naming each ``FILE:LINE``
    and what is wrong, before a model is loaded or a reply generated."""
    path = Path(path)
    text = read_text_file(path, "prompts file")  # a FIFO is refused, not read forever
    items: list[PromptItem] = []
    problems: list[str] = []
    for number, value, problem in jsonl_lines(text):
        parsed = problem or _parse_prompt_line(value, number)
        if isinstance(parsed, str):
            problems.append(f"{path}:{number}: {parsed}")
        else:
            items.append(parsed)
    refuse_bad_lines(problems, path, "nothing was generated")
    if not items:
        raise DataError(f"{path} holds no prompt")
    return items


def reply_records(model: Any, tokenizer: Any, items: list[PromptItem], params: GenParams,
                  batch_size: int) -> list[dict[str, Any]]:
    """``{"id", "text", "prompt"}`` per prompt, in file order: ``socratune score`` input."""
    def progress(done: int, total: int) -> None:
        log.info("generated %d of %d replies", done, total)

    replies = generate_replies(model, tokenizer, [i.messages for i in items], params, batch_size, progress)
    return [{"id": i.id, "text": reply, "prompt": i.prompt} for i, reply in zip(items, replies)]
