"""``socratune serve``: an OpenAI-compatible chat API and a browser chat page for a trained run.

    socratune serve runs/tiny                  # http://127.0.0.1:8000/ (page) and /v1 (API)
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "tiny", "messages": [{"role": "user", "content": "幸福とは何でしょうか？"}]}'

Endpoints: ``POST /v1/chat/completions`` (plain JSON, or server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health``, the page at ``/``
(``assets/chat.html``) and its icon at ``/favicon.ico``. ``HEAD`` works wherever ``GET`` does.

The HTTP side is uvicorn (h11) with Starlette, as vLLM's and LLaMA-Factory's APIs are: HTTP
parsing, keep-alive, streaming, CORS and a clean shutdown come from maintained code. What they
do not bound, this module does (``ServeLimits``): the body is counted as it is read and cut at
the limit, the whole body must arrive within a deadline, the JSON is checked for depth, lone
surrogates and out-of-range numbers before it reaches the model, and every refusal is OpenAI's
error object. Generation is blocking torch work: it runs in a thread of its own, one at a time
(``Engine.hold``), handing text to the event loop, which streams it; a client that hangs up
ends its generation at the next token and frees the model.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .batching import Batcher, default_max_batch
from .errors import ConfigError
from .generate import MIN_DIVISOR, GenParams, prompt_texts

log = logging.getLogger("socratune.serve")

API_KEY_ENV = "SOCRATUNE_API_KEY"


@dataclass(frozen=True)
class ServeLimits:
    """What one client can ask of the server; a request beyond a limit gets a 4xx saying which."""

    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_message_chars: int = 8_000
    max_total_chars: int = 32_000
    max_json_depth: int = 16  # the deepest valid request is 5 levels (body, messages, message, content, part)
    max_tokens: int = 1024  # ceiling for max_tokens; the model's context may leave fewer
    max_generation_s: float = 120.0  # a reply is cut there (finish_reason "length")
    max_waiting: int | None = None  # requests waiting behind the max_batch generating (None: max_batch); more get 429
    max_queue_wait_s: float = 300.0  # a waiting request gives up (503) after this long
    request_deadline_s: float = 30.0  # the whole body must have arrived by then (408), however it trickles
    socket_timeout_s: float = 30.0  # an idle keep-alive connection is closed


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
    # extra="forbid": a misspelt or unsupported parameter (logprobs...) is an error, as with
    # OpenAI, never silently ignored; strict: "0.7" is not a temperature; no inf or nan anywhere.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


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


def _divisor(name: str) -> Callable[[float | None], float | None]:
    def check(value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_DIVISOR:
            raise PydanticCustomError(name, f"must be 0 or at least {MIN_DIVISOR}: sampling divides by it")
        return value
    return check


class ChatRequest(_Strict):
    model: str
    messages: list[Message]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, lt=2**31)
    max_completion_tokens: int | None = Field(None, ge=1, lt=2**31)  # the newer OpenAI name for max_tokens
    repetition_penalty: float | None = Field(None, ge=MIN_DIVISOR, le=2)  # not OpenAI's; vLLM's name for it
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch.manual_seed's range
    stop: str | list[str] | None = None  # as OpenAI: one string or up to 4
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    user: str | None = None

    _temperature = field_validator("temperature")(_divisor("temperature"))

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        strings = [value] if isinstance(value, str) else value or []
        if len(strings) > 4:
            raise PydanticCustomError("stop", "holds at most 4 strings")
        if any(not s or len(s) > 100 for s in strings):
            raise PydanticCustomError("stop", "strings must have 1 to 100 characters")
        return value


@dataclass(frozen=True)
class Completion:
    """A validated request, ready to generate."""

    input_ids: list[int]
    params: GenParams
    seed: int | None
    stream: bool
    include_usage: bool
    stop: tuple[str, ...] = ()

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = len(self.input_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


class _OutOfRange:
    """Stands in, while the body is parsed, for a number no parameter could hold (NaN, Infinity,
    an integer of hundreds of digits), so that the error can name where it was."""

    def __init__(self, text: str):
        self.text = text

    def describe(self) -> str:
        return f"an integer of {len(self.text)} digits" if self.text.lstrip("-").isdigit() else self.text


def _parse_int(text: str) -> int | _OutOfRange:
    return int(text) if len(text) <= 40 else _OutOfRange(text)


def _check_json(value: Any, limits: ServeLimits, path: str = "", depth: int = 1) -> None:
    """Depth and lone surrogates anywhere in the parsed body; the error names where."""
    if depth > limits.max_json_depth:
        raise ApiError(400, f"{path or 'the request body'} nests deeper than {limits.max_json_depth} levels",
                       path or None)
    if isinstance(value, _OutOfRange):
        raise ApiError(400, f"{path or 'the request body'} is {value.describe()}, out of any parameter's range",
                       path or None)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{path or 'a string'} holds a lone surrogate (such as \\ud800), which is not "
                           "text", path or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, limits, path, depth)
            _check_json(item, limits, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, limits, f"{path}.{index}", depth + 1)


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
    """The loaded model and the rules for using it: validation, up to ``max_batch`` replies decoded
    together (``batching.Batcher``), as many again waiting, the rest refused."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, defaults: GenParams,
                 limits: ServeLimits = ServeLimits(), max_batch: int | None = None):
        """``defaults`` apply where a request names no temperature, top_p, max_tokens or penalty.
        ``max_batch``: replies decoded together (default: 8 on CPU, 32 on a GPU); ``limits.max_waiting``
        more may wait for a place (default: as many as ``max_batch``)."""
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.defaults, self.limits = defaults, limits
        self.context_length: int = model.config.max_position_embeddings
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.created = int(time.time())
        # The fast tokenizer is shared by request threads (prompts) and the generating one
        # (streamed text); the Rust object refuses concurrent use ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        self.max_batch = max_batch or default_max_batch(model.device)
        self.max_waiting = self.max_batch if limits.max_waiting is None else limits.max_waiting
        self._places = threading.BoundedSemaphore(self.max_batch)  # rows in the batch
        self._slots = threading.BoundedSemaphore(self.max_batch + self.max_waiting)  # the batch + the waiting
        self._batcher = Batcher(model, tokenizer, self.max_batch, self._tokenizer_lock, self.eos_ids,
                                limits.max_generation_s)

    def parse(self, body: bytes) -> Completion:
        """A request body checked against the schema, the limits and the model's context."""
        try:
            data = json.loads(body, parse_int=_parse_int, parse_constant=_OutOfRange)
        except RecursionError:
            raise ApiError(400, f"the request body nests deeper than {self.limits.max_json_depth} levels") from None
        except ValueError as exc:  # UnicodeDecodeError too
            raise ApiError(400, f"the request body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
        _check_json(data, self.limits)
        try:
            request = ChatRequest.model_validate(data)
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            param = ".".join(str(part) for part in error["loc"])
            raise ApiError(400, f"{param}: {error['msg']}", param) from None
        if request.model != self.model_id:
            raise ApiError(404, f"the model {request.model[:100]!r} does not exist; this server has "
                           f"{self.model_id!r}", "model", "model_not_found")
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
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        return Completion(input_ids, params, request.seed, request.stream, include_usage, stop)

    def reserve(self) -> None:
        """A place in the queue, or a 429 at once when ``max_batch`` requests generate and
        ``max_waiting`` more already wait."""
        if not self._slots.acquire(blocking=False):
            raise ApiError(429, f"the server is busy: {self.max_batch} requests are generating and "
                           f"{self.max_waiting} more are waiting; try again shortly", None, "server_busy",
                           "rate_limit_error")

    def unreserve(self) -> None:
        self._slots.release()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """A row in the batch, after the requests ahead; 503 when that takes ``max_queue_wait_s``.
        A client that hangs up mid-reply gives its row back at the next token."""
        if not self._places.acquire(timeout=self.limits.max_queue_wait_s):
            raise ApiError(503, "the server is busy: timed out waiting for the model", None, "server_busy",
                           "server_error")
        try:
            yield
        finally:
            self._places.release()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """``reserve`` then ``hold``: a row in the batch for one request, from a thread that may block."""
        self.reserve()
        try:
            with self.hold():
                yield
        finally:
            self.unreserve()

    def generate(self, completion: Completion, emit: Callable[[str], None],
                 cancel: threading.Event | None = None) -> tuple[str, int]:
        """Generate the reply, handing ``emit`` each new piece of text; call inside ``hold()``.
        It is decoded in one batch with the other requests generating (``batching``).

        Returns OpenAI's ``finish_reason`` ("stop" at the end-of-turn token or a stop string,
        "length" when cut by max_tokens or the time limit) and the number of generated tokens.
        Setting ``cancel`` ends generation at the next token.
        """
        return self._batcher.generate(completion.input_ids, completion.params, emit, completion.seed,
                                      completion.stop, cancel)


# --- HTTP -----------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (``serve`` wants a key otherwise)."""
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


def _error_response(error: ApiError, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    # The request's body may be unread: close rather than read the rest of it as the next request.
    return JSONResponse(error.body(), error.status, {**(headers or {}), "Connection": "close"})


class _Guard:
    """Outermost ASGI layer of the API: Host check, API key, and the last word on any failure.

    Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, which would buffer streamed
    replies. A failure no handler answered becomes a 500 without its internal text (the log
    gets one line), and a client that left is only logged.
    """

    def __init__(self, app: Any, loopback_only: bool, api_key: str | None):
        self.app, self.loopback_only, self.api_key = app, loopback_only, api_key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        from starlette.requests import ClientDisconnect

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _error_response(refusal, {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None)(
                    scope, receive, tracking_send)
                return
            await self.app(scope, receive, tracking_send)
        except (ClientDisconnect, ConnectionError):
            log.info("client %s left before its answer: %s %s", _client(scope), scope["method"], scope["path"])
        except Exception as exc:  # one broken request must not take the server down, nor show its insides
            log.error("request failed: %s %s: %s: %s", scope["method"], scope["path"], type(exc).__name__, exc)
            log.debug("request failed", exc_info=True)
            if not started:
                await _error_response(ApiError(500, "internal server error; the server's log says more",
                                               kind="server_error"))(scope, receive, send)

    def _refusal(self, scope: dict[str, Any]) -> ApiError | None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        host = headers.get("host", "")
        if self.loopback_only and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            # A page on another site whose name resolves to 127.0.0.1 (DNS rebinding) must not
            # reach a loopback server as if it were same-origin.
            return ApiError(403, f"Host {host[:100]!r} is not served: this server answers to localhost only")
        if self.api_key and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # Both sides as bytes: the header arrived as Latin-1, the key may be any UTF-8.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"),
                                                                     self.api_key.encode()):
                return ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer KEY'", None,
                                "invalid_api_key")
        return None


def _client(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


async def _read_body(request: Any, limits: ServeLimits) -> bytes:
    """The body, counted as it arrives: 413 past the limit (the rest is never read), 408 when it
    has not all arrived within the deadline however slowly it trickles in."""
    import anyio

    length = request.headers.get("content-length")
    if length is None and "transfer-encoding" not in request.headers:
        raise ApiError(411, "send the request body with a Content-Length or chunked")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, f"Content-Length {length[:40]!r} is not a number of bytes")
        if int(length) > limits.max_body_bytes:
            raise ApiError(413, f"the request body has {length} bytes; at most {limits.max_body_bytes} are accepted")
    body = bytearray()
    try:
        with anyio.fail_after(limits.request_deadline_s):
            async for piece in request.stream():
                body += piece
                if len(body) > limits.max_body_bytes:
                    raise ApiError(413, f"the request body exceeds {limits.max_body_bytes} bytes")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.request_deadline_s:g} s") from None
    return bytes(body)


def _internal(exc: Exception, during: str) -> ApiError:
    """``exc`` as the client may see it: an ApiError as it is, anything else as a bare 500 (and
    one line in the log, where its text belongs)."""
    if isinstance(exc, ApiError):
        return exc
    log.error("%s failed: %s: %s", during, type(exc).__name__, exc)
    return ApiError(500, f"internal server error during {during}; the server's log says more", kind="server_error")


def _envelope(engine: Engine, kind: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": engine.model_id}


def _event(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(engine: Engine, loopback_only: bool = True, api_key: str | None = None,
              cors_origins: tuple[str, ...] = ()) -> Any:
    """The ASGI application serving ``engine``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    assets = resources.files("socratune") / "assets"
    page, icon = (assets / "chat.html").read_bytes(), (assets / "favicon.svg").read_bytes()

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "socratune"}

    async def chat(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, "send the request as JSON with Content-Type: application/json "
                           f"(got {content_type[:60] or 'none'!r})")
        body = await _read_body(request, engine.limits)
        try:
            completion = await asyncio.to_thread(engine.parse, body)
        except Exception as exc:  # noqa: BLE001 - _internal logs it
            raise _internal(exc, "parsing the request") from None
        engine.reserve()
        updates: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()
        threading.Thread(target=_generate_in_thread, args=(engine, completion, updates, asyncio.get_running_loop(),
                                                           cancel), daemon=True).start()
        kind, value = await updates.get()  # "start" once the model is ours, or the refusal
        if kind == "error":
            raise _internal(value, "waiting for the model")
        if completion.stream:
            return StreamingResponse(_stream(engine, completion, updates, cancel, _client(request.scope)),
                                     media_type="text/event-stream; charset=utf-8",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces: list[str] = []
        while (update := await updates.get())[0] == "text":
            pieces.append(update[1])
        kind, value = update
        if kind == "error":
            raise _internal(value, "generation")
        finish, tokens = value
        return JSONResponse({
            **_envelope(engine, "chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "logprobs": None, "finish_reason": finish}],
            "usage": completion.usage(tokens),
        })

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return _error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return _error_response(ApiError(405, f"{request.method} is not allowed on {path}; use {allowed}",
                                            code="method_not_allowed"), {"Allow": allowed})
        if exc.status_code == 404:
            return _error_response(ApiError(404, f"no such page or endpoint: {path[:200]}", code="not_found"))
        return _error_response(ApiError(exc.status_code, str(exc.detail)))

    routes = [
        Route("/", lambda _: Response(page, media_type="text/html; charset=utf-8"), methods=["GET"]),
        Route("/favicon.ico", lambda _: Response(icon, media_type="image/svg+xml",
                                                 headers={"Cache-Control": "max-age=86400"}), methods=["GET"]),
        Route("/health", lambda _: JSONResponse({"status": "ok", "model": engine.model_id}), methods=["GET"]),
        Route("/v1/models", lambda _: JSONResponse({"object": "list", "data": [model_card()]}), methods=["GET"]),
        Route(f"/v1/models/{engine.model_id}", lambda _: JSONResponse(model_card()), methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    app: Any = _Guard(Starlette(routes=routes, exception_handlers={ApiError: on_api_error,
                                                                   HTTPException: on_http_error}),
                      loopback_only, api_key)
    if cors_origins:
        # Outside the guard, so that a refusal (a 401...) reaches an allowed page readable, with
        # its CORS headers; preflights carry no credentials and are answered here.
        app = CORSMiddleware(app, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=["Authorization", "Content-Type"], max_age=600)
    return app


def _generate_in_thread(engine: Engine, completion: Completion, updates: asyncio.Queue,
                        loop: asyncio.AbstractEventLoop, cancel: threading.Event) -> None:
    """Wait for the model, generate, and post ("start"), ("text", piece)... ("done", (finish,
    tokens)) or ("error", exception) to the event loop."""
    def post(kind: str, value: Any = None) -> None:
        try:
            loop.call_soon_threadsafe(updates.put_nowait, (kind, value))
        except RuntimeError:  # the server has shut down: nobody is listening any more
            cancel.set()

    try:
        with engine.hold():
            post("start")
            post("done", engine.generate(completion, lambda text: post("text", text), cancel))
    except Exception as exc:  # noqa: BLE001 - handed to the event loop, which answers and logs it
        post("error", exc)
    finally:
        engine.unreserve()


async def _stream(engine: Engine, completion: Completion, updates: asyncio.Queue, cancel: threading.Event,
                  client: str) -> Any:
    """Server-sent events from the generating thread; ends it when the client goes away."""
    envelope = _envelope(engine, "chat.completion.chunk")

    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        return {**envelope, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    finished = False
    sent = 0
    try:
        yield _event(chunk({"role": "assistant", "content": ""}))
        while True:
            kind, value = await updates.get()
            if kind == "text":
                sent += 1
                yield _event(chunk({"content": value}))
                continue
            if kind == "done":
                finish, tokens = value
                yield _event(chunk({}, finish))
                if completion.include_usage:
                    yield _event({**envelope, "choices": [], "usage": completion.usage(tokens)})
            else:  # the status line is already sent: the error travels as an event, without internals
                yield _event(_internal(value, "generation").body())
            finished = True
            yield _event("[DONE]")
            return
    finally:
        if not finished:
            cancel.set()  # frees the model at the next token
            log.info("client %s hung up mid-stream after %d pieces; its generation stopped", client, sent)


class _OneLine(logging.Filter):
    """uvicorn's own warnings (a malformed request...) as one line each, never a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.msg = f"{record.getMessage()}: {record.exc_info[1]}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def _header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline on a request's head, which uvicorn has not: a
    client that starts a request and sends its headers a byte at a time is answered 408 and
    cut off, instead of holding a connection for as long as it likes; one that connects and
    sends nothing is closed. (The body has its own deadline, in ``_read_body``.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    error = ApiError(408, f"the request headers did not arrive within {seconds:g} s").body()
    answer = json.dumps(error).encode()
    timeout_response = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
                        b"Content-Length: " + str(len(answer)).encode() + b"\r\n\r\n" + answer)

    class HeaderDeadline(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _received = False  # any byte yet on this connection

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(seconds, self._head_too_slow)

        def data_received(self, data: bytes) -> None:
            self._received = True
            if self._head_timer is None and self._between_requests():
                self._head_timer = self.loop.call_later(seconds, self._head_too_slow)
            super().data_received(data)
            if self._head_timer is not None and not self._between_requests():  # the head is complete
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self._between_requests() and not self.transport.is_closing():
                if self._received:
                    log.info("a client took over %g s to send a request's headers; answered 408", seconds)
                    self.transport.write(timeout_response)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return HeaderDeadline


class ChatServer:
    """The HTTP server: uvicorn serving ``build_app(engine)`` on a socket bound in the constructor.

    Binding first means a busy port is reported before a model spends minutes loading.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 cors_origins: tuple[str, ...] = ()):
        self.loopback_only = is_loopback(host)
        for origin in cors_origins:
            parts = urlsplit(origin)
            # A browser's Origin is exactly scheme://host[:port]; anything more would never match.
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc
                                  or origin != f"{parts.scheme}://{parts.netloc}"):
                raise ConfigError(f"--cors-origin {origin[:100]!r} is not an origin: give scheme://host[:port] "
                                  "with no path or trailing slash, e.g. https://app.example.com", "--cors-origin")
        self.api_key, self.cors_origins = api_key, tuple(cors_origins)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            # Listening from now on: a client that connects before uvicorn has started waits in
            # the backlog instead of being refused.
            self._socket.listen(1024)
        except (OSError, OverflowError) as exc:  # OverflowError: a port beyond 65535
            self._socket.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc}", "--port") from exc
        self.server_address: tuple[Any, ...] = self._socket.getsockname()
        self._uvicorn: Any = None
        self._ready, self._stopped = threading.Event(), threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve(self, engine: Engine) -> None:
        """Answer requests with ``engine`` until ``shutdown()`` (from another thread) or Ctrl+C,
        which uvicorn turns into a graceful stop and then raises again as KeyboardInterrupt."""
        import uvicorn

        self.engine = engine
        for name in ("uvicorn", "uvicorn.error"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _OneLine) for f in logger.filters):
                logger.addFilter(_OneLine())
        app = build_app(engine, self.loopback_only, self.api_key, self.cors_origins)
        # No limit_concurrency: uvicorn would answer a burst with plain-text 503s; the queue's
        # 429 is the limit, and the listen backlog holds a burst until it is accepted.
        config = uvicorn.Config(app, http=_header_deadline_protocol(engine.limits.request_deadline_s), ws="none",
                                lifespan="off", log_config=None, access_log=False,
                                timeout_keep_alive=math.ceil(engine.limits.socket_timeout_s),
                                timeout_graceful_shutdown=5, backlog=1024, server_header=False)
        self._uvicorn = uvicorn.Server(config)
        self._ready.set()
        try:
            self._uvicorn.run(sockets=[self._socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve`` (running in another thread) and wait for it to return."""
        if self._ready.wait(30):  # serve() may still be on its way in its thread
            self._uvicorn.should_exit = True
            self._stopped.wait(30)

    def server_close(self) -> None:
        self._socket.close()
