"""One dialogue between the student and Socrates through the endpoint client.

The student opens with the planned question; Socrates (its system prompt + the conversation)
answers; the student (its persona prompt + the transcript so far, as one user message that any
chat template accepts) speaks again; ``turns`` exchanges in all.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import EndpointFailed
from .client import ChatClient, ChatReply
from .profile import Persona, SynthProfile, request_seed

# A request that failed with one of these ends the run: the endpoint is gone or refuses us, and
# every later dialogue would fail the same way. Any other 4xx (a prompt too long, say) rejects
# only the dialogue it happened in.
_RUN_ENDING_STATUS = {401, 403, 404, 408, 409, 429}


STUDENT_TURN = ("これまでの対話:\n{transcript}\n\n"
                "ソクラテスの最後の言葉に、あなた（{name}）として次の発言だけを書いてください。")


def _student_view(persona: Persona, messages: list[dict[str, str]]) -> str:
    """The transcript as one user message: every chat template accepts it, whatever its role rules."""
    speakers = {"user": f"{persona.name}", "assistant": "ソクラテス"}
    transcript = "\n".join(f"{speakers[m['role']]}: {m['content']}" for m in messages)
    return STUDENT_TURN.format(transcript=transcript, name=persona.name)


def strip_speaker(text: str, speaker: str) -> str:
    """The reply without a leading "name:" label: models continuing a transcript often add one."""
    text = text.strip()
    for colon in (":", "："):
        if text.startswith(speaker + colon):
            return text[len(speaker) + 1:].strip()
    return text


class Dropped(Exception):
    """Ctrl-C or a failed run: a dialogue in flight stops before its next request."""


@dataclass
class Conversation:
    index: int
    question: str
    persona: Persona
    messages: list[dict[str, str]] = field(default_factory=list)
    replies: list[ChatReply] = field(default_factory=list)
    judge: list[Any] = field(default_factory=list)  # Verdicts, one per Socrates reply
    failure: str | None = None  # a request refused for this dialogue only


def converse(index: int, question: str, persona: Persona, profile: SynthProfile, turns: int, seed: int,
             student: ChatClient, socrates: ChatClient, stop: threading.Event) -> Conversation:
    """One dialogue of ``turns`` exchanges; raises EndpointFailed for a run-ending failure."""
    talk = Conversation(index, question, persona, [{"role": "user", "content": question}])
    student_system = profile.student.system_prompt_template.format(**persona.model_dump())
    for turn in range(turns):
        for role in ("socrates", "student") if turn < turns - 1 else ("socrates",):
            if stop.is_set():
                raise Dropped
            step = 2 * turn + (role == "student")
            if role == "socrates":
                client, spec = socrates, profile.socrates
                request = [{"role": "system", "content": spec.system_prompt}, *talk.messages]
            else:
                client, spec = student, profile.student
                request = [{"role": "system", "content": student_system},
                           {"role": "user", "content": _student_view(persona, talk.messages)}]
            try:
                reply = client.chat(request, temperature=spec.temperature, max_tokens=spec.max_tokens,
                                    seed=request_seed(seed, index, step))
            except EndpointFailed as exc:
                if exc.status is None or exc.status >= 500 or exc.status in _RUN_ENDING_STATUS:
                    raise
                talk.failure = f"request_failed: {role}: {exc}"
                return talk
            talk.replies.append(reply)
            speaker = "ソクラテス" if role == "socrates" else persona.name
            talk.messages.append({"role": "assistant" if role == "socrates" else "user",
                                  "content": strip_speaker(reply.text, speaker)})
    return talk
