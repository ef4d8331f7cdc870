"""Optional LLM judge: an OpenAI-compatible chat endpoint rates replies 0-4 on the style axes.

Any server speaking ``POST /v1/chat/completions`` works: llama.cpp's ``llama-server``, vLLM,
Ollama, or a hosted API. The rubric is the style profile's own (the same text a human reads
in ``profiles/*.yaml``), so scorer and judge rate against one definition. Plain ``urllib``:
one JSON request per reply needs no client library.

The API key comes only from the environment (``SOCRATUNE_JUDGE_API_KEY``, else
``OPENAI_API_KEY``); it is sent as a bearer token and never logged, saved or put in an error
message (any text echoing it is redacted). Network failures, timeouts, HTTP 429 and 5xx are
retried with exponential backoff; a reply that is not valid scores is recorded as missing (with
why), so one bad answer never costs the rest of an evaluation. Authentication and not-found
errors stop further requests: every later reply is missing with that reason.

Tests: ``pytest tests/test_evaluate.py -k judge`` (a local stub server).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .style import AXES, StyleProfile

logger = logging.getLogger("socratune")

API_KEY_VARIABLES = ("SOCRATUNE_JUDGE_API_KEY", "OPENAI_API_KEY")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_FATAL_STATUS = {401, 403, 404}  # the same for every request: asking again only repeats it
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def chat_completions_url(url: str) -> str:
    """The full endpoint from a server root, a ``/v1`` base or the endpoint itself."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"--judge must be an http(s) URL, got {url!r}", key="--judge")
    path = parsed.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions" if path.endswith("/v1") else "/v1/chat/completions"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, parsed.query, ""))


def public_url(url: str) -> str:
    """The URL without user info or query string, which may carry credentials: what is saved."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parsed.port:
        netloc += f":{parsed.port}"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


def api_key_from_env() -> str | None:
    return next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)


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
                 backoff: float = 1.0, api_key: str | None = None):
        if not model:
            raise ConfigError("--judge needs --judge-model NAME (the model the server should use)",
                              key="--judge-model")
        if timeout <= 0 or retries < 0:
            raise ConfigError("--judge-timeout must be > 0 and --judge-retries >= 0", key="--judge-timeout")
        self.endpoint = chat_completions_url(url)
        self.model = model
        self.system = rubric_prompt(profile)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._key = api_key if api_key is not None else api_key_from_env()
        self._fatal: str | None = None

    def describe(self) -> dict[str, Any]:
        """What a report may say about the judge (no key, no credentials in the URL)."""
        return {"url": public_url(self.endpoint), "model": self.model, "timeout_s": self.timeout,
                "retries": self.retries, "api_key_sent": self._key is not None}

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def rate(self, reply: str, user_message: str | None = None) -> Verdict:
        if self._fatal:
            return _missing(self._fatal, 0)
        body = json.dumps({
            "model": self.model,
            "temperature": 0,
            "messages": [{"role": "system", "content": self.system},
                         {"role": "user", "content": user_prompt(reply, user_message)}],
        }).encode("utf-8")
        error = "no attempt made"
        for attempt in range(1, self.retries + 2):
            if attempt > 1:
                time.sleep(self.backoff * 2 ** (attempt - 2))
            try:
                answer = self._post(body)
            except urllib.error.HTTPError as exc:
                error = self._redact(f"HTTP {exc.code} {exc.reason}")
                if exc.code in _FATAL_STATUS:
                    self._fatal = f"judge stopped after {error}"
                    logger.warning("LLM judge: %s; no further requests are made", error)
                    return _missing(error, attempt)
                if exc.code not in _RETRY_STATUS:
                    return _missing(error, attempt)
                continue
            except TimeoutError:
                error = f"timed out after {self.timeout:g} s"
                continue
            except urllib.error.URLError as exc:
                error = (f"timed out after {self.timeout:g} s" if isinstance(exc.reason, TimeoutError)
                         else self._redact(f"cannot reach the judge: {exc.reason}"))
                continue
            except (ValueError, OSError) as exc:  # bad JSON or bytes, a dropped connection
                error = self._redact(f"unreadable response: {exc}")
                continue
            try:
                content = answer["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                return _missing(self._redact(f"not a chat completion: {json.dumps(answer)[:120]}"), attempt)
            verdict = parse_verdict(content if isinstance(content, str) else "")
            verdict.error = self._redact(verdict.error) if verdict.error else None
            verdict.attempts = attempt
            return verdict
        return _missing(f"{error} ({self.retries + 1} attempts)", self.retries + 1)

    def rate_many(self, items: list[tuple[str, str | None]], workers: int = 4) -> list[Verdict]:
        """Rate ``(reply, user_message)`` pairs, ``workers`` requests in flight; input order kept."""
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            verdicts = list(pool.map(lambda item: self.rate(*item), items))
        missing = sum(v.error is not None for v in verdicts)
        if missing:
            logger.warning("LLM judge: %d of %d replies have missing scores (see evaluation.json)",
                           missing, len(verdicts))
        return verdicts
