"""Optional LLM judge: an OpenAI-compatible chat endpoint rates replies 0-4 on the style axes.

Any server speaking ``POST /v1/chat/completions`` works: llama.cpp's ``llama-server``, vLLM,
Ollama, or a hosted API. The rubric is the style profile's own (the same text a human reads
in ``profiles/*.yaml``), so scorer and judge rate against one definition. Requests go through
``client.ChatClient`` (the official ``openai`` package), shared with ``synth``.

The API key comes only from the environment (``SOCRATUNE_JUDGE_API_KEY``, else
``OPENAI_API_KEY``); a URL with ``user:password@`` is sent as HTTP basic auth instead. Neither is
logged, saved or put in an error message. Timeouts, dropped connections, 429 and 5xx are
retried by the openai client (exponential backoff with jitter, ``Retry-After`` honoured); a
reply that is not valid scores is recorded as missing (with why), so one bad answer never costs
the rest of an evaluation. Authentication and not-found errors stop further requests: every
later reply is missing with that reason. A judge that rated no reply at all raises
``JudgeFailed`` rather than leave an empty column.

Tests: ``pytest tests/test_evaluate.py -k judge`` and ``tests/test_judge.py`` (local stub servers).
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import ConfigError, EndpointFailed, JudgeFailed
from ..style import AXES, StyleProfile
from ..synth.client import ChatClient, chat_completions_url, public_url

logger = logging.getLogger("socratune")

__all__ = ["Judge", "Verdict", "chat_completions_url", "parse_verdict", "public_url"]

API_KEY_VARIABLES = ("SOCRATUNE_JUDGE_API_KEY", "OPENAI_API_KEY")
_FATAL_STATUS = {401, 403, 404}  # the same for every request: asking again only repeats it
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
JUDGE_MAX_TOKENS = 512  # four scores with one-sentence reasons


def rubric_prompt(profile: StyleProfile) -> str:
    """System message: the persona, the profile's rubric level by level, and the answer format."""
    lines = [
        ("You rate replies of a Japanese chatbot that should speak and think like this persona: "
        f"{profile.description or profile.name}"),
        "Rate the reply on each axis with an integer from 0 to 4, following this rubric.",
    ]
    for axis in AXES:
        lines.append(f"\n{axis}:")
        lines.extend(f"  {level}: {text}" for level, text in sorted(profile.rubric[axis].items()))
    example = ", ".join(f'"{a}": {{"score": 0, "reason": "..."}}' for a in AXES)
    lines.append(f"\nAnswer with one JSON object and nothing else: {{{example}}}. "
                 "Each reason is one short sentence naming what you saw in the reply.")
    return "\n".join(lines)


def user_prompt(reply: str, user_message: str | None) -> str:
    said = user_message if user_message else "(not given)"
    return f"User message:\n{said}\n\nReply to rate:\n{reply}"


@dataclass
class Verdict:
    """The judge's scores for one reply; an axis it did not validly score is None."""

    scores: dict[str, float | None]
    reasons: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # why some or all scores are missing
    attempts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "reasons": self.reasons, "error": self.error, "attempts": self.attempts}


def _missing(error: str, attempts: int) -> Verdict:
    return Verdict({a: None for a in AXES}, error=error, attempts=attempts)


def parse_verdict(content: str) -> Verdict:
    """Scores from the judge's message: a JSON object (code fences and chatter around it are
    tolerated) with ``{"score": n, "reason": "..."}`` or a bare number per axis."""
    match = _JSON_OBJECT.search(content or "")
    try:
        data = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return _missing(f"answer is not a JSON object: {content[:120]!r}", 0)
    scores: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    problems = []
    for axis in AXES:
        item = data.get(axis)
        value = item.get("score") if isinstance(item, dict) else item
        if isinstance(item, dict) and isinstance(item.get("reason"), str):
            reasons[axis] = item["reason"]
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 4:
            scores[axis] = float(value)
        else:
            scores[axis] = None
            problems.append(f"{axis}: {'no score' if value is None else f'not a score 0-4 ({value!r})'}")
    return Verdict(scores, reasons, "; ".join(problems) or None)


class Judge:
    """A client for one judge model; ``rate`` never raises for a failed request."""

    def __init__(self, url: str, model: str, profile: StyleProfile, *, timeout: float = 60.0, retries: int = 3,
                 api_key: str | None = None, concurrency: int = 4):
        if not model:
            raise ConfigError("--judge needs --judge-model NAME (the model the server should use)",
                              key="--judge-model")
        if not timeout > 0 or retries < 0:
            raise ConfigError("--judge-timeout must be > 0 and --judge-retries >= 0", key="--judge-timeout")
        self.client = ChatClient(url, model, key_variables=API_KEY_VARIABLES, flag="--judge", timeout=timeout,
                                 max_retries=retries, concurrency=concurrency, api_key=api_key, role="judge")
        self.endpoint = chat_completions_url(url)
        self.model = model
        self.system = rubric_prompt(profile)
        self.timeout, self.retries = timeout, retries
        self._fatal: str | None = None

    def describe(self) -> dict[str, Any]:
        """What a report may say about the judge (no key, no credentials in the URL)."""
        return {"url": public_url(self.endpoint), "model": self.model, "timeout_s": self.timeout,
                "retries": self.retries, "api_key_sent": self.client.auth != "none"}

    def check(self) -> None:
        """Fail now, before hours of generation, when the judge server does not answer."""
        self.client.check()

    def rate(self, reply: str, user_message: str | None = None) -> Verdict:
        if self._fatal:
            return _missing(self._fatal, 0)
        messages = [{"role": "system", "content": self.system},
                    {"role": "user", "content": user_prompt(reply, user_message)}]
        try:
            answer = self.client.chat(messages, temperature=0, max_tokens=JUDGE_MAX_TOKENS)
        except EndpointFailed as exc:
            if exc.status in _FATAL_STATUS:
                self._fatal = f"judge stopped after {exc}"
                logger.warning("LLM judge: %s; no further requests are made", exc)
            return _missing(str(exc), exc.attempts)
        verdict = parse_verdict(answer.text)
        verdict.error = self.client.redact(verdict.error) if verdict.error else None
        verdict.attempts = answer.attempts
        return verdict

    def rate_many(self, items: list[tuple[str, str | None]], workers: int = 4) -> list[Verdict]:
        """Rate ``(reply, user_message)`` pairs, ``workers`` requests in flight; input order kept.

        Raises ``JudgeFailed`` when not one reply got a single score: an empty judge column is a
        failure to report, not a result.
        """
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            verdicts = list(pool.map(lambda item: self.rate(*item), items))
        missing = sum(v.error is not None for v in verdicts)
        if verdicts and all(all(s is None for s in v.scores.values()) for v in verdicts):
            raise JudgeFailed(f"the LLM judge at {public_url(self.endpoint)} scored none of the {len(verdicts)} "
                              f"replies; first error: {verdicts[0].error}. Check --judge, --judge-model and the "
                              "judge's key (SOCRATUNE_JUDGE_API_KEY or OPENAI_API_KEY)")
        if missing:
            logger.warning("LLM judge: %d of %d replies have missing scores (see evaluation.json)",
                           missing, len(verdicts))
        return verdicts
