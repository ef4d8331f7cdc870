"""Reply generation shared by the style callback, ``socratune generate`` and later chat/serve.

Prompts are rendered with the chat template *with* the generation prompt (the opposite of
training text), batched with left padding so every row's reply starts at the same column, and
decoded without special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .template import chat_messages, render, supports_system_role


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


def prompt_texts(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[str]:
    fold = not supports_system_role(tokenizer)
    return [render(tokenizer, chat_messages(c, fold), add_generation_prompt=True) for c in conversations]


def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    params: GenParams = GenParams(),
    batch_size: int = 8,
) -> list[str]:
    """One reply per conversation (each a list of messages ending on a user turn)."""
    import torch

    texts = prompt_texts(tokenizer, conversations)
    replies: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], add_special_tokens=False, padding=True,
                              return_tensors="pt").to(model.device)
            with torch.no_grad():
                output = model.generate(**batch, **params.generate_kwargs(), pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            replies.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return replies
