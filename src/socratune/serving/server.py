"""The HTTP server: uvicorn serving ``build_app(engine)`` on a socket bound before the model loads,
with a deadline on each request's headers and uvicorn's warnings on one line."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

from ..core.errors import ConfigError
from .app import build_app, is_loopback
from .engine import Engine
from .schema import ApiError

log = logging.getLogger("socratune.serve")  # one logger for the whole server, as before the split


API_KEY_ENV = "SOCRATUNE_API_KEY"


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
