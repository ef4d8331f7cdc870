"""``socratune serve``: an OpenAI-compatible chat API and a browser chat page for a trained run.

    socratune serve runs/tiny                  # http://127.0.0.1:8000/ (page) and /v1 (API)
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "tiny", "messages": [{"role": "user", "content": "幸福とは何でしょうか？"}]}'

Endpoints: ``POST /v1/chat/completions`` (plain JSON, or server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health``, and the page at ``/``
(``assets/chat.html``).

Why the standard library's ``ThreadingHTTPServer``: the model generates one reply at a time
anyway, so an async stack would buy nothing but dependencies; a thread per connection is
enough to stream to a few clients and to answer health checks while a reply is generated.
Requests take turns on one lock (``Engine.turn``), so a greedy reply is the same whatever else
is being served, and the generating thread writes its stream straight to its own socket: a
client that hangs up raises out of ``generate()`` and frees the model for the next one.
Everything a client can make the server do is bounded (``ServeLimits``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .generate import GenParams, delta_streamer, prompt_texts

log = logging.getLogger("socratune.serve")


@dataclass(frozen=True)
class ServeLimits:
    """What one client can ask of the server; a request beyond a limit gets a 4xx saying which."""

    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_message_chars: int = 8_000
    max_total_chars: int = 32_000
    max_tokens: int = 1024  # ceiling for max_tokens; the model's context may leave fewer
    max_generation_s: float = 120.0  # a reply is cut there (finish_reason "length")
    max_waiting: int = 8  # requests waiting behind the one generating; more get 429
    max_queue_wait_s: float = 300.0  # a waiting request gives up (503) after this long
    socket_timeout_s: float = 30.0  # an idle or stalled connection is closed


class ApiError(Exception):
    """A refused request, answered as OpenAI's error object ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# --- request schema -------------------------------------------------------------------------

class _Strict(BaseModel):
    # extra="forbid": a misspelt or unsupported parameter (stop, logprobs...) is an error, as with
    # OpenAI, never silently ignored; strict: "0.7" is not a temperature.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # OpenAI's participant name; accepted, the template has no place for it

    @field_validator("content", mode="wrap")
    @classmethod
    def _one_error(cls, value: Any, handler: Any) -> str | list[TextPart]:
        # One error naming what is allowed, rather than one per member of the union with a
        # parameter path such as "messages.0.content.list[TextPart]".
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("content", 'must be a string or a list of {"type": "text", "text": ...} '
                                      "parts") from None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name for max_tokens
    repetition_penalty: float | None = Field(None, gt=0, le=2)  # not OpenAI's; vLLM's name for it
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch.manual_seed's range
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    user: str | None = None


@dataclass(frozen=True)
class Completion:
    """A validated request, ready to generate."""

    input_ids: list[int]
    params: GenParams
    seed: int | None
    stream: bool
    include_usage: bool

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = len(self.input_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def _check_conversation(messages: list[Message], limits: ServeLimits) -> None:
    """Count and size limits, and the turn order every chat template here accepts."""
    if not 1 <= len(messages) <= limits.max_messages:
        raise ApiError(400, f"messages must hold 1 to {limits.max_messages} messages, got {len(messages)}",
                       "messages", "too_many_messages" if messages else None)
    sizes = [len(m.text()) for m in messages]
    for index, size in enumerate(sizes):
        if size > limits.max_message_chars:
            raise ApiError(400, f"messages.{index}.content has {size} characters; at most "
                           f"{limits.max_message_chars} are allowed", f"messages.{index}.content")
    if sum(sizes) > limits.max_total_chars:
        raise ApiError(400, f"the messages hold {sum(sizes)} characters; at most {limits.max_total_chars} are "
                       "allowed", "messages", "messages_too_long")
    first = 1 if messages[0].role == "system" else 0
    for index in range(first, len(messages)):
        expected = "user" if (index - first) % 2 == 0 else "assistant"
        if messages[index].role != expected:
            raise ApiError(400, f"messages.{index} has role {messages[index].role!r} where {expected!r} was "
                           "expected: after an optional system message, user and assistant turns alternate, "
                           "starting with user", f"messages.{index}.role")
    if messages[-1].role != "user":
        raise ApiError(400, "the last message must come from the user: there is nothing to reply to", "messages")


# --- the model ------------------------------------------------------------------------------

class Engine:
    """The loaded model and the rules for using it: validation, one generation at a time."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, defaults: GenParams,
                 limits: ServeLimits = ServeLimits()):
        """``defaults`` apply where a request names no temperature, top_p, max_tokens or penalty."""
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.defaults, self.limits = defaults, limits
        self.context_length: int = model.config.max_position_embeddings
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.created = int(time.time())
        # The fast tokenizer is shared by request threads (prompts) and the generating one
        # (streamed text); the Rust object refuses concurrent use ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(limits.max_waiting + 1)  # the generating request + the waiting

    def parse(self, body: bytes) -> Completion:
        """A request body checked against the schema, the limits and the model's context.

        Runs in the request's thread, before taking a turn, so a bad request is answered at once.
        """
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
        try:
            request = ChatRequest.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            param = ".".join(str(part) for part in error["loc"])
            raise ApiError(400, f"{param}: {error['msg']}", param) from exc
        if request.model != self.model_id:
            raise ApiError(404, f"the model {request.model!r} does not exist; this server has {self.model_id!r}",
                           "model", "model_not_found")
        _check_conversation(request.messages, self.limits)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        with self._tokenizer_lock:
            text = prompt_texts(self.tokenizer, [messages])[0]
            input_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        asked = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        if asked is not None and asked > self.limits.max_tokens:
            raise ApiError(400, f"{param} is {asked}; this server allows at most {self.limits.max_tokens}", param)
        room = self.context_length - len(input_ids)
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(400, f"the model's context holds {self.context_length} tokens; the messages take "
                           f"{len(input_ids)} and {asked or 1} more were asked for: shorten the conversation or "
                           f"lower {param}", "messages", "context_length_exceeded")
        d = self.defaults
        params = GenParams(
            max_new_tokens=asked or min(d.max_new_tokens, room),
            temperature=d.temperature if request.temperature is None else request.temperature,
            top_p=d.top_p if request.top_p is None else request.top_p,
            repetition_penalty=request.repetition_penalty or d.repetition_penalty,
        )
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return Completion(input_ids, params, request.seed, request.stream, include_usage)

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the model: waits behind the request generating now, or refuses when too many wait."""
        if not self._slots.acquire(blocking=False):
            raise ApiError(429, f"the server is busy: {self.limits.max_waiting} requests are already waiting; "
                           "try again shortly", None, "server_busy", "rate_limit_error")
        try:
            if not self._model_lock.acquire(timeout=self.limits.max_queue_wait_s):
                raise ApiError(503, "the server is busy: timed out waiting for the model", None, "server_busy",
                               "server_error")
            try:
                yield
            finally:
                self._model_lock.release()
        finally:
            self._slots.release()

    def generate(self, completion: Completion, emit: Callable[[str], None]) -> tuple[str, int]:
        """Generate the reply, handing ``emit`` each new piece of text; call inside ``turn()``.

        Returns OpenAI's ``finish_reason`` ("stop" at the end-of-turn token, "length" when cut
        by max_tokens or the time limit) and the number of generated tokens. An exception from
        ``emit`` (a client that hung up) stops generation.
        """
        import torch

        if completion.seed is not None:
            torch.manual_seed(completion.seed)  # only the lock holder draws from the generator
        input_ids = torch.tensor([completion.input_ids], device=self.model.device)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                **completion.params.generate_kwargs(), pad_token_id=self.tokenizer.pad_token_id,
                max_time=self.limits.max_generation_s,
                streamer=delta_streamer(self.tokenizer, emit, self._tokenizer_lock),
            )
        new_tokens = output[0, input_ids.shape[1]:].tolist()
        finish = "stop" if new_tokens and new_tokens[-1] in self.eos_ids else "length"
        return finish, len(new_tokens)


# --- HTTP -----------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (``serve`` warns otherwise)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_id_for(run_dir: str | Path, checkpoint: str | None = None, base_only: bool = False) -> str:
    """The name clients pass as ``model``: the run directory's name, plus what was loaded from it."""
    name = Path(run_dir).resolve().name
    if base_only:
        return f"{name}@base"
    return f"{name}@{Path(checkpoint).name}" if checkpoint else name


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive between JSON requests; a stream ends by closing
    server: ChatServer

    def setup(self) -> None:
        self.timeout = self.server.engine.limits.socket_timeout_s
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch()

    # Every method is routed, so a wrong one gets a 405 in OpenAI's shape rather than the
    # stdlib's HTML 501. HEAD is left to the stdlib: its answer may not carry a body.
    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        engine = self.server.engine
        routes: dict[str, dict[str, Callable[[], None]]] = {
            "/": {"GET": self._page},
            "/health": {"GET": lambda: self._json(200, {"status": "ok", "model": engine.model_id})},
            "/v1/models": {"GET": lambda: self._json(200, {"object": "list", "data": [self._model_card()]})},
            f"/v1/models/{engine.model_id}": {"GET": lambda: self._json(200, self._model_card())},
            "/v1/chat/completions": {"POST": self._chat},
        }
        path = urlsplit(self.path).path
        try:
            if self.server.loopback_only and not is_loopback(urlsplit(f"//{self.headers.get('Host', '')}").hostname
                                                             or ""):
                # A page on another site whose name resolves to 127.0.0.1 (DNS rebinding) must not
                # reach a loopback server as if it were same-origin.
                raise ApiError(403, f"Host {self.headers.get('Host')!r} is not served: this server answers to "
                               "localhost only")
            if path not in routes:
                raise ApiError(404, f"no such page or endpoint: {path}", code="not_found")
            if self.command not in routes[path]:
                allowed = ", ".join(routes[path])
                self._json(405, ApiError(405, f"{self.command} is not allowed on {path}; use {allowed}",
                                         code="method_not_allowed").body(), {"Allow": allowed})
                return
            routes[path][self.command]()
        except ApiError as exc:
            self._json(exc.status, exc.body())
        except (ConnectionError, TimeoutError):  # the client hung up or stalled: nobody to answer
            self.close_connection = True
        except Exception as exc:  # one broken request must not take the server down
            log.exception("request failed: %s %s", self.command, path)
            self._json(500, ApiError(500, f"internal error: {exc}", kind="server_error").body())

    def _page(self) -> None:
        self._send(200, "text/html; charset=utf-8", self.server.page)

    def _model_card(self) -> dict[str, Any]:
        engine = self.server.engine
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "socratune"}

    def _chat(self) -> None:
        engine = self.server.engine
        completion = engine.parse(self._body())
        with engine.turn():
            (self._stream if completion.stream else self._complete)(completion)

    def _body(self) -> bytes:
        limit = self.server.engine.limits.max_body_bytes
        if "Transfer-Encoding" in self.headers:
            raise ApiError(411, "send the request body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a Content-Length header is required") from None
        if length > limit:
            raise ApiError(413, f"the request body has {length} bytes; at most {limit} are accepted")
        body = self.rfile.read(length)
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, "send the request as JSON with Content-Type: application/json "
                           f"(got {content_type or 'none'!r})")
        return body

    def _complete(self, completion: Completion) -> None:
        pieces: list[str] = []
        finish, tokens = self.server.engine.generate(completion, pieces.append)
        self._json(200, {
            **self._envelope("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "logprobs": None, "finish_reason": finish}],
            "usage": completion.usage(tokens),
        })

    def _stream(self, completion: Completion) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the end of the stream is the end of the connection
        self.end_headers()
        envelope = self._envelope("chat.completion.chunk")

        def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            return {**envelope, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        self._event(chunk({"role": "assistant", "content": ""}))
        try:
            finish, tokens = self.server.engine.generate(completion, lambda text: self._event(chunk({"content": text})))
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # the status line is already sent: the error travels as an event
            log.exception("generation failed")
            self._event(ApiError(500, f"generation failed: {exc}", kind="server_error").body())
        else:
            self._event(chunk({}, finish))
            if completion.include_usage:
                self._event({**envelope, "choices": [], "usage": completion.usage(tokens)})
        self.wfile.write(b"data: [DONE]\n\n")

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.server.engine.model_id}

    def _event(self, data: dict[str, Any]) -> None:
        self.wfile.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())
        self.wfile.flush()

    def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        if status >= 400:
            # The request's body may be unread: close rather than parse it as the next request.
            headers = {**(headers or {}), "Connection": "close"}
        self._send(status, "application/json", json.dumps(body, ensure_ascii=False).encode(), headers)

    def _send(self, status: int, content_type: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class ChatServer(ThreadingHTTPServer):
    """The HTTP server: a thread per connection, all sharing one ``Engine``.

    Binds in the constructor and is given its engine by ``serve``, so a busy port is reported
    before a model spends minutes loading.
    """

    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up shutdown
    engine: Engine

    def __init__(self, host: str = "127.0.0.1", port: int = 8000):
        self.loopback_only = is_loopback(host)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.page = (resources.files("socratune") / "assets" / "chat.html").read_bytes()
        try:
            super().__init__((host, port), _Handler)
        except (OSError, OverflowError) as exc:  # OverflowError: a port beyond 65535
            raise ConfigError(f"cannot listen on {host}:{port}: {exc}", "--port") from exc

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve(self, engine: Engine) -> None:
        """Answer requests with ``engine`` until ``shutdown()`` (from another thread) or Ctrl+C."""
        self.engine = engine
        self.serve_forever()
