"""``socratune chat``: talk to a trained run in the terminal.

    socratune chat runs/tiny                       # the tuned model, greedy
    socratune chat runs/tiny --temperature 0.7 --top-p 0.9 --seed 1
    socratune chat runs/tiny --base                # the untuned base, for comparison

Commands inside the chat: ``/reset`` (forget the conversation), ``/system TEXT`` (set the system
prompt; ``/system`` alone clears it), ``/save FILE`` (append the conversation to FILE as one line
``{"messages": [...]}`` in the training format, so good conversations become training data) and
``/quit`` (or end of input, or Ctrl-C at the prompt). A reply holding U+FFFD (bytes the model
produced that are not UTF-8; a byte-level model can) is not saved without asking: training on it
would teach the model to produce more. Ctrl-C while a reply is streaming stops that
reply and forgets the question.

The reply streams as it is generated and is followed by its token count and tokens per second.
The conversation is kept for the model within its context: when the next prompt plus the reply's
token budget would not fit, the oldest exchanges are dropped (the system prompt stays) and a
notice says so. Between turns the key/value cache of the conversation is kept and reused up to
where the newly rendered prompt first differs from it, so a turn costs its new tokens, not a
re-read of the whole history.

The loop reads lines from a text stream and writes to another, so tests drive it with pipes or a
pseudo-terminal and nothing here touches ``sys.stdin``/``sys.stdout`` unless handed them.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..core.errors import DataError, SocratuneError
from ..core.rundir import write_text_atomic
from ..data.dialogues import BOT
from ..generation.generate import GenParams, delta_streamer, prompt_texts, whole_character_kwargs
from ..generation.whole_chars import REPLACEMENT, drop_partial_character

HELP = "commands: /reset  /system TEXT  /save FILE  /quit"
USER_PROMPT = "you> "
BOT_PROMPT = "bot> "


@dataclass(frozen=True)
class Prompt:
    """A user message made ready to answer: the prompt's token ids after fitting the context."""

    user_text: str
    ids: list[int]
    dropped_exchanges: int  # oldest user/bot pairs left out so that this turn fits the context


@dataclass(frozen=True)
class Reply:
    text: str
    new_tokens: int
    seconds: float
    reused_tokens: int  # prompt tokens served from the kept cache instead of recomputed

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class BrokenTextError(DataError):
    """The conversation holds U+FFFD, so saving it as training data needs the user's say-so."""


class ChatSession:
    """One conversation with a loaded model: history, system prompt, context budget, cache."""

    def __init__(self, model: Any, tokenizer: Any, params: GenParams | None = None, max_context: int | None = None):
        params = params or GenParams()
        context = model.config.max_position_embeddings
        self.max_context = min(max_context, context) if max_context else context
        if params.max_new_tokens >= self.max_context:
            raise DataError(f"max_new_tokens {params.max_new_tokens} leaves no room for the conversation in a "
                            f"context of {self.max_context} tokens")
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.system: str | None = None
        self.history: list[dict[str, str]] = []  # complete user/assistant exchanges only
        self._cache: Any = None
        self._cache_ids: list[int] = []

    def reset(self) -> None:
        self.history = []

    def messages(self, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.history if history is None else history)

    def prepare(self, user_text: str) -> Prompt:
        """The prompt for the history plus ``user_text``, oldest exchanges dropped until the
        prompt and the reply's token budget fit the context."""
        history = [*self.history, {"role": "user", "content": user_text}]
        dropped = 0
        while True:
            text = prompt_texts(self.tokenizer, [self.messages(history)])[0]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) + self.params.max_new_tokens <= self.max_context:
                return Prompt(user_text, ids, dropped)
            if len(history) == 1:
                raise DataError(f"this message takes {len(ids)} tokens with the system prompt; with room for a "
                                f"{self.params.max_new_tokens}-token reply that exceeds the context of "
                                f"{self.max_context} tokens: shorten it")
            history = history[2:]
            dropped += 1

    def _reusable_cache(self, ids: list[int]) -> tuple[Any, int]:
        """The kept cache cut back to the longest prefix it shares with ``ids`` (at least one
        token is left to compute), or a fresh cache."""
        from transformers import DynamicCache

        cache, cached = self._cache, self._cache_ids
        self._cache, self._cache_ids = None, []  # only a finished reply hands a cache back
        limit = min(len(cached), len(ids) - 1)
        keep = next((i for i in range(limit) if cached[i] != ids[i]), limit)
        if cache is not None and keep > 0:
            try:
                cache.crop(keep - cache.get_seq_length())
                return cache, keep
            except RuntimeError:  # sliding-window layers (Gemma-2) past their window cannot roll back
                pass
        return DynamicCache(config=self.model.config), 0

    def reply(self, prompt: Prompt, on_text=lambda piece: None) -> Reply:
        """Answer a prepared prompt, streaming the reply through ``on_text``; the exchange joins
        the history (and the dropped exchanges leave it) only when the reply is complete."""
        import torch

        ids = prompt.ids
        cache, reused = self._reusable_cache(ids)
        input_ids = torch.tensor([ids], device=self.model.device)
        started = time.perf_counter()
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), cache=cache,
                streamer=delta_streamer(self.tokenizer, on_text), pad_token_id=self.tokenizer.pad_token_id,
                **self.params.generate_kwargs(), **whole_character_kwargs(self.tokenizer),
            )
        seconds = time.perf_counter() - started
        new_tokens = output[0, len(ids) :]
        text = drop_partial_character(self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
        self._cache, self._cache_ids = cache, output[0, : cache.get_seq_length()].tolist()
        self.history = [*self.history[2 * prompt.dropped_exchanges :], {"role": "user", "content": prompt.user_text},
                        {"role": BOT, "content": text}]
        return Reply(text, len(new_tokens), seconds, reused)

    def save(self, path: str | Path, keep_broken: bool = False) -> Path:
        """Append the conversation to ``path`` as one JSONL line in the training format (what
        ``load_dialogues`` reads), so a file of saved conversations is training data.

        Raises ``BrokenTextError``, writing nothing, when a message holds U+FFFD, unless
        ``keep_broken``."""
        path = Path(path)
        if not self.history:
            raise DataError("nothing to save yet: the conversation is empty")
        if any(not m["content"].strip() for m in self.history):
            raise DataError("a reply in this conversation is empty, which training data may not hold: /reset")
        broken = [number for number, m in enumerate(self.messages(), 1) if REPLACEMENT in m["content"]]
        if broken and not keep_broken:
            raise BrokenTextError(f"message(s) {', '.join(map(str, broken))} of this conversation hold U+FFFD "
                                  "(\ufffd: bytes the model produced that are not valid UTF-8); as training data "
                                  "they would teach the model to produce more")
        existing = path.read_text(encoding="utf-8") if path.exists() else ""
        if existing.lstrip().startswith("["):
            raise DataError(f"{path} is a JSON list; /save appends JSON Lines: name a .jsonl file")
        if existing and not existing.endswith("\n"):
            existing += "\n"
        line = json.dumps({"messages": self.messages()}, ensure_ascii=False)
        write_text_atomic(path, existing + line + "\n")
        return path


def _reader(stdin: TextIO, stdout: TextIO):
    """Line reader: ``input()`` on the real terminal (line editing and history through readline),
    plain ``readline`` on any other stream. Returns None at end of input."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        import readline  # noqa: F401  (imported for its effect on input())

        def read(prompt: str) -> str | None:
            try:
                return input(prompt)
            except EOFError:
                return None
        return read

    def read_stream(prompt: str) -> str | None:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        return line.rstrip("\n") if line else None
    return read_stream


def run_chat(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
    """The interactive loop: read a line, run a command or answer it, until /quit or end of input."""
    read = _reader(stdin, stdout)

    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    def stream(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    say(HELP)
    while True:
        try:
            line = read(USER_PROMPT)
        except KeyboardInterrupt:
            line = None
        if line is None:
            say("")
            return
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        try:
            if command == "/quit":
                return
            if command == "/reset":
                session.reset()
                say("[conversation reset]")
            elif command == "/system":
                session.system = argument or None
                say(f"[system prompt set: {argument}]" if argument else "[system prompt cleared]")
            elif command == "/save":
                if not argument:
                    say("[usage: /save FILE]")
                    continue
                try:
                    saved = session.save(argument)
                except BrokenTextError as exc:
                    say(f"[warning: {exc}]")
                    answer = read("save it anyway? [y/N] ")
                    if (answer or "").strip().lower() not in ("y", "yes"):
                        say("[not saved]")
                        continue
                    saved = session.save(argument, keep_broken=True)
                say(f"[conversation saved to {saved}]")
            elif command.startswith("/"):
                say(f"[unknown command {command}; {HELP}]")
            else:
                prompt = session.prepare(line)
                if prompt.dropped_exchanges:
                    say(f"[context full: the oldest {prompt.dropped_exchanges} exchange(s) are dropped]")
                stream(BOT_PROMPT)
                try:
                    reply = session.reply(prompt, stream)
                except KeyboardInterrupt:
                    say("\n[reply interrupted; the question is forgotten]")
                    continue
                say("")
                say(f"[{reply.new_tokens} tokens in {reply.seconds:.1f} s, {reply.tokens_per_s:.1f} tokens/s"
                    + (f", {reply.reused_tokens} prompt tokens reused from the cache]" if reply.reused_tokens else "]"))
        except (SocratuneError, OSError) as exc:
            say(f"[error: {exc}]")
