"""``socratune chat``: the real command in a pseudo-terminal, and the session's cache and context rules.

    python -m pytest -q tests/test_chat.py
"""

from __future__ import annotations

import codecs
import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from socratune.core.errors import DataError

SYSTEM = "あなたはソクラテスです。"
SHORT = "幸福とは何でしょうか？"
LONG = ("勇気とは何でしょうか。危険を前にして退かないことが勇気なのか、"
        "それとも何を恐れるべきかを知っていることが勇気なのか、私には分からなくなりました。")
MAX_NEW = 16


class Terminal:
    """A child process on a pseudo-terminal: what a user at a real terminal would see and type."""

    def __init__(self, argv: list[str], stderr_path: Path):
        self.master, slave = os.openpty()
        env = {**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8"}
        with stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=stderr, env=env, close_fds=True)
        os.close(slave)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.pos = 0
        self.stderr_path = stderr_path

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while not (match := regex.search(self.text, self.pos)):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"no {pattern!r} in terminal output:\n{self.text[self.pos:]}\n"
                                     f"stderr:\n{self.stderr_path.read_text()}")
            if select.select([self.master], [], [], min(remaining, 0.5))[0]:
                try:
                    self.text += self.decoder.decode(os.read(self.master, 4096))
                except OSError:  # the child closed the terminal
                    continue
        self.pos = match.end()
        return match

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode("utf-8"))

    def close(self) -> int:
        code = self.proc.wait(timeout=30)
        os.close(self.master)
        return code


def _context_for_long_question(run: Path) -> int:
    """A context that holds the system prompt plus LONG and a reply, but not any earlier exchange too."""
    from socratune.generation.generate import prompt_texts
    from socratune.model.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(run / "adapter"))
    text = prompt_texts(tokenizer, [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": LONG}]])[0]
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + MAX_NEW + 2


@pytest.mark.slow  # starts a subprocess
def test_chat_in_a_terminal_streams_keeps_history_in_context_and_saves_training_data(default_run, tmp_path):
    from socratune.data.dialogues import load_dialogues

    context = _context_for_long_question(default_run)
    saved, after_reset = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    term = Terminal([sys.executable, "-m", "socratune", "chat", str(default_run), "--max-new-tokens", str(MAX_NEW),
                     "--max-context", str(context)], tmp_path / "stderr.txt")
    try:
        term.expect(r"/reset\s+/system TEXT\s+/save FILE\s+/quit")
        term.expect("you> ")
        term.send(f"/system {SYSTEM}")
        term.expect(r"\[system prompt set")
        term.send(SHORT)
        term.expect("bot> ")
        first = term.expect(r"\[(\d+) tokens in [\d.]+ s, ([\d.]+) tokens/s")
        assert 0 < int(first.group(1)) <= MAX_NEW and float(first.group(2)) > 0
        term.send(LONG)  # with the first exchange it overflows the context
        term.expect(r"\[context full: the oldest 1 exchange\(s\) are dropped\]")
        term.expect(r"tokens/s")
        term.send(f"/save {saved}")
        term.expect(r"\[conversation saved to .*good\.jsonl\]")
        term.send("/reset")
        term.expect(r"\[conversation reset\]")
        term.send(f"/save {after_reset}")
        term.expect(r"\[error: nothing to save yet")
        term.send("/quit")
    finally:
        code = term.close()
    assert code == 0

    report = load_dialogues(saved)  # the training-data loader takes it as it is
    assert report.rejections == [] and len(report.kept) == 1
    messages = report.kept[0].messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == SYSTEM and messages[1]["content"] == LONG  # SHORT was dropped
    assert messages[2]["content"].strip()
    assert not after_reset.exists()


def test_a_turn_reusing_the_cache_replies_as_a_fresh_computation_would(default_model):
    from socratune.generation.generate import GenParams
    from socratune.serving.chat import ChatSession

    model, tokenizer = default_model
    params = GenParams(max_new_tokens=MAX_NEW)
    session = ChatSession(model, tokenizer, params)
    session.reply(session.prepare(SHORT))
    before = list(session.history)
    pieces: list[str] = []
    second = session.reply(session.prepare("なぜそう思うのですか？"), pieces.append)
    assert second.reused_tokens > 0 and second.new_tokens > 0
    assert "".join(pieces) == second.text  # the stream adds up to the reply

    fresh = ChatSession(model, tokenizer, params)
    fresh.history = before
    again = fresh.reply(fresh.prepare("なぜそう思うのですか？"))
    assert again.reused_tokens == 0 and again.text == second.text


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(default_model, tmp_path):
    from socratune.generation.generate import GenParams
    from socratune.serving.chat import ChatSession, run_chat

    model, tokenizer = default_model
    session = ChatSession(model, tokenizer, GenParams(max_new_tokens=8), max_context=40)
    with pytest.raises(DataError, match="exceeds the context of 40 tokens"):
        session.prepare(LONG)
    out = io.StringIO()
    run_chat(session, io.StringIO(f"{LONG}\n{SHORT}\n/frobnicate\n"), out)
    shown = out.getvalue()
    assert "[error: this message takes" in shown
    assert "tokens/s" in shown and "[unknown command /frobnicate" in shown  # the next message is answered
    assert [m["content"] for m in session.history if m["role"] == "user"] == [SHORT]


def test_max_new_tokens_that_leave_no_room_are_refused(default_model):
    from socratune.generation.generate import GenParams
    from socratune.serving.chat import ChatSession

    model, tokenizer = default_model
    with pytest.raises(DataError, match="leaves no room"):
        ChatSession(model, tokenizer, GenParams(max_new_tokens=64), max_context=64)


def test_save_asks_before_writing_a_reply_with_broken_characters(default_model, tmp_path):
    from socratune.generation.generate import GenParams
    from socratune.serving.chat import BrokenTextError, ChatSession, run_chat

    session = ChatSession(*default_model, GenParams(max_new_tokens=8))
    good = [{"role": "user", "content": SHORT}, {"role": "assistant", "content": "君はどう考えるのかね？"}]
    broken = [*good, {"role": "user", "content": "徳とは？"},
              {"role": "assistant", "content": "徳とは\ufffd\ufffdである。"}]
    saved = tmp_path / "saved.jsonl"
    session.history = broken
    with pytest.raises(BrokenTextError, match=r"message\(s\) 4 of this conversation hold U\+FFFD"):
        session.save(saved)
    assert not saved.exists()

    out = io.StringIO()
    run_chat(session, io.StringIO(f"/save {saved}\nn\n/save {saved}\n\n"), out)  # no, then Enter (the default)
    assert out.getvalue().count("[warning: message(s) 4 of this conversation hold U+FFFD") == 2
    assert out.getvalue().count("save it anyway? [y/N] [not saved]") == 2 and not saved.exists()

    out = io.StringIO()
    run_chat(session, io.StringIO(f"/save {saved}\ny\n"), out)  # the user decides to keep it
    assert f"[conversation saved to {saved}]" in out.getvalue()
    session.history = good  # a clean conversation is saved without a question
    out = io.StringIO()
    run_chat(session, io.StringIO(f"/save {saved}\n"), out)
    assert "warning" not in out.getvalue() and "[conversation saved to" in out.getvalue()
    lines = saved.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and "\ufffd" in lines[0] and "\ufffd" not in lines[1]
