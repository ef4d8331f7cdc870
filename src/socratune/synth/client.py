"""One client for OpenAI-compatible chat endpoints, shared by ``synth`` (both roles) and the LLM judge.

Any server speaking ``POST /v1/chat/completions`` works: a hosted API, vLLM, llama.cpp's
``llama-server``, Ollama or ``socratune serve``. Built on the official ``openai`` package, whose
own machinery does the robustness work: a per-request ``timeout``, and ``max_retries`` retries of
timeouts, dropped connections, 408/409/429 and 5xx with exponential backoff (0.5 s doubling to
8 s) and 0-25 % jitter, honouring a server's ``Retry-After`` up to 60 s. This module adds what
the package does not: base-URL normalisation (a server root, a ``/v1`` base or the full
``/chat/completions`` endpoint all work), credentials from the URL's ``user:password@`` sent as
HTTP basic auth, API keys from environment variables only, a concurrency cap per endpoint (a
semaphore), a start-up check that tells "nothing answers at this URL" from a mid-run failure,
and error messages with every secret redacted.

Keys are never written to a file or a log: ``describe()`` (what records and reports may keep)
says only whether one was sent, and the URL it reports has no user info or query string.
"""

from __future__ import annotations

import base64
import os
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError, EndpointFailed, EndpointUnreachable, quote_capped

# A placeholder key for servers that need none (llama.cpp, vLLM, Ollama, socratune serve):
# the openai package refuses to start without one.
NO_KEY = "EMPTY"
CHECK_TIMEOUT_S = 10.0  # the start-up check: a live server lists its models in well under this


def split_url(url: str, flag: str) -> tuple[str, tuple[str, str] | None, dict[str, str]]:
    """``(base_url ending in the API root, (user, password) or None, query parameters)``.

    The base URL is what the openai client wants (``.../v1``), from a server root
    (``http://h:8080``, which gets ``/v1``), an API base (``/v1``, ``/api/v1``, ``/v1beta/openai``:
    kept) or the full ``.../chat/completions`` endpoint.
    """
    problem = f"{flag} must be an http(s) URL such as http://127.0.0.1:8000/v1, got {quote_capped(url)}"
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port  # raises on a port that is not a number from 0 to 65535
    except ValueError as exc:  # "http://[::1" and other unparsable hosts
        raise ConfigError(f"{problem}: {exc}", key=flag) from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or any(c.isspace() for c in parsed.netloc):
        raise ConfigError(problem, key=flag)
    credentials = None
    if parsed.username is not None or parsed.password is not None:
        credentials = (urllib.parse.unquote(parsed.username or ""), urllib.parse.unquote(parsed.password or ""))
    path = parsed.path.rstrip("/")
    path = path.removesuffix("/chat/completions")
    if not path:
        path = "/v1"  # a server root: every server named above serves its API under /v1
    host = parsed.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port:
        netloc += f":{port}"
    query = dict(urllib.parse.parse_qsl(parsed.query))
    return urllib.parse.urlunsplit((parsed.scheme, netloc, path, "", "")), credentials, query


def chat_completions_url(url: str, flag: str = "--judge") -> str:
    """The full chat endpoint (without credentials) that requests to ``url`` go to."""
    return split_url(url, flag)[0] + "/chat/completions"


def public_url(url: str) -> str:
    """The URL without user info or query string, which may carry credentials: what is saved."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parsed.port:
        netloc += f":{parsed.port}"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


def api_key_from_env(variables: tuple[str, ...]) -> str | None:
    """The first non-empty of ``variables`` in the environment."""
    return next((os.environ[v] for v in variables if os.environ.get(v)), None)


@dataclass(frozen=True)
class ChatReply:
    """One completion: its text, why it stopped, the tokens the server counted, attempts used."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int


class ChatClient:
    """Chat completions from one model at one endpoint; thread-safe, ``concurrency`` requests at once.

    ``chat`` raises ``EndpointFailed`` (with ``status`` and ``attempts``) when the request failed
    after the openai client's retries; the caller decides whether that ends a run.
    """

    def __init__(self, url: str, model: str, *, key_variables: tuple[str, ...], flag: str = "--url",
                 timeout: float = 60.0, max_retries: int = 3, concurrency: int = 4, api_key: str | None = None,
                 role: str = "endpoint"):
        if not model:
            raise ConfigError(f"{flag} needs a model name for the server to use", key=flag)
        if not timeout > 0 or max_retries < 0 or concurrency < 1:
            raise ConfigError(f"{flag}: the timeout must be > 0, retries >= 0 and concurrency >= 1", key=flag)
        from openai import OpenAI

        base_url, credentials, query = split_url(url, flag)
        self.role, self.model, self.flag = role, model, flag
        self.base_url, self.timeout, self.max_retries = base_url, timeout, max_retries
        self.key_variables = key_variables
        self._key = api_key if api_key is not None else api_key_from_env(key_variables)
        self._secrets = [s for s in (self._key, *(credentials or ()), *query.values()) if s]
        headers = {}
        if credentials is not None:
            # user:password in the URL is HTTP basic auth; it replaces the bearer key, which would
            # otherwise be sent in the same Authorization header.
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        self.auth = "basic" if credentials else ("bearer" if self._key else "none")
        self._client = OpenAI(base_url=base_url, api_key=self._key or NO_KEY, timeout=timeout,
                              max_retries=max_retries, default_headers=headers or None,
                              default_query=query or None)
        self._slots = threading.BoundedSemaphore(concurrency)

    def describe(self) -> dict[str, Any]:
        """What a record or report may say about this endpoint: no key, no credentials."""
        return {"url": self.base_url, "model": self.model, "timeout_s": self.timeout,
                "retries": self.max_retries, "auth": self.auth}

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def check(self) -> None:
        """Raise ``EndpointUnreachable`` unless a server answers at the base URL (``GET /models``).

        A server without a models list (any other HTTP answer) still counts as up: it answered.
        """
        import openai

        quick = self._client.with_options(max_retries=0, timeout=min(self.timeout, CHECK_TIMEOUT_S))
        try:
            quick.models.list()
        except openai.APIConnectionError as exc:
            raise EndpointUnreachable(self.redact(
                f"the {self.role} endpoint {self.base_url} does not answer ({_reason(exc)}): is the server "
                f"running, and are the scheme, host, port and path of {self.flag} right?")) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise EndpointUnreachable(self.redact(
                f"the {self.role} endpoint {self.base_url} refused the credentials (HTTP {exc.status_code}); "
                f"set {' or '.join(self.key_variables)} (read from the environment only), or put "
                "user:password@ in the URL for basic auth")) from None
        except openai.APIStatusError:
            pass

    def chat(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
             seed: int | None = None) -> ChatReply:
        import openai

        extra: dict[str, Any] = {} if seed is None else {"seed": seed}
        attempts = self.max_retries + 1
        with self._slots:
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens, **extra)
                completion = raw.parse()
            except openai.APITimeoutError:
                raise EndpointFailed(f"timed out after {self.timeout:g} s ({attempts} attempts)",
                                     attempts=attempts) from None
            except openai.APIConnectionError as exc:
                raise EndpointFailed(self.redact(f"cannot reach {self.base_url}: {_reason(exc)} ({attempts} attempts)"),
                                     attempts=attempts) from None
            except openai.APIStatusError as exc:
                retried = exc.status_code in (408, 409, 429) or exc.status_code >= 500
                tries = attempts if retried else 1
                detail = _status_detail(exc)
                raise EndpointFailed(
                    self.redact(f"HTTP {exc.status_code}{detail} ({tries} attempt{'s' * (tries > 1)})"),
                                     status=exc.status_code, attempts=tries) from None
            except (openai.APIError, ValueError) as exc:  # a 200 whose body is not a chat completion
                raise EndpointFailed(self.redact(f"not a chat completion: {str(exc)[:200]}"), attempts=1) from None
        try:
            choice = completion.choices[0]
        except (IndexError, TypeError, AttributeError):
            raise EndpointFailed("not a chat completion: no choices in the answer", attempts=1) from None
        usage = getattr(completion, "usage", None)
        content = choice.message.content if choice.message is not None else None
        return ChatReply(
            text=content if isinstance(content, str) else "",
            finish_reason=choice.finish_reason,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            attempts=raw.retries_taken + 1,
        )


def _reason(exc: Exception) -> str:
    """The innermost cause of a connection error, which names what went wrong (refused, reset...)."""
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return str(cause)[:200] or type(cause).__name__


def _status_detail(exc: Any) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    message = error.get("message") if isinstance(error, dict) else None
    return f": {str(message)[:200]}" if message else ""
