"""The HTTP side of ``socratune serve``: the ASGI application (Starlette) over an ``Engine``, its
routes, the outermost guard (Host check, API key, the last word on any failure), the body read
within its limits, and a generation run in a thread of its own whose text is streamed as
server-sent events. The folder's overview is in ``serving/__init__.py``."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .engine import Engine
from .schema import ApiError, Completion, ServeLimits

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger("socratune.serve")  # one logger for the whole server, as before the split


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (``serve`` wants a key otherwise)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    assets = resources.files("socratune") / "assets"
    page, icon = (assets / "chat.html").read_bytes(), (assets / "favicon.svg").read_bytes()

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "socratune"}

    routes = [
        Route("/", lambda _: Response(page, media_type="text/html; charset=utf-8"), methods=["GET"]),
        Route("/favicon.ico", lambda _: Response(icon, media_type="image/svg+xml",
                                                 headers={"Cache-Control": "max-age=86400"}), methods=["GET"]),
        Route("/health", lambda _: JSONResponse({"status": "ok", "model": engine.model_id}), methods=["GET"]),
        Route("/v1/models", lambda _: JSONResponse({"object": "list", "data": [model_card()]}), methods=["GET"]),
        Route(f"/v1/models/{engine.model_id}", lambda _: JSONResponse(model_card()), methods=["GET"]),
        Route("/v1/chat/completions", _chat_endpoint(engine), methods=["POST"]),
    ]
    app: Any = _Guard(Starlette(routes=routes, exception_handlers={ApiError: _on_api_error,
                                                                   HTTPException: _on_http_error}),
                      loopback_only, api_key)
    if cors_origins:
        # Outside the guard, so that a refusal (a 401...) reaches an allowed page readable, with
        # its CORS headers; preflights carry no credentials and are answered here.
        app = CORSMiddleware(app, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=["Authorization", "Content-Type"], max_age=600)
    return app


def _chat_endpoint(engine: Engine) -> Callable[[Request], Awaitable[Response]]:
    """``POST /v1/chat/completions`` for ``engine``: plain JSON, or server-sent events when asked."""
    from starlette.responses import JSONResponse, StreamingResponse

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

    return chat


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    if exc.status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    return _error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    from starlette.exceptions import HTTPException

    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return _error_response(ApiError(405, f"{request.method} is not allowed on {path}; use {allowed}",
                                        code="method_not_allowed"), {"Allow": allowed})
    if exc.status_code == 404:
        return _error_response(ApiError(404, f"no such page or endpoint: {path[:200]}", code="not_found"))
    return _error_response(ApiError(exc.status_code, str(exc.detail)))


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
