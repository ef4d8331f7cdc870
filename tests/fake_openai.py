"""A tiny OpenAI-compatible chat server on loopback for fast tests of the client, judge and synth.

``FakeOpenAI(answer)`` serves ``GET /v1/models`` and ``POST /v1/chat/completions``;
``answer(n, body, headers)`` returns the reply text, or a ``Fault`` (an HTTP status with optional
headers, or a dropped connection). Every request is recorded with its headers (names lower-cased).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Fault:
    status: int | None = None  # None: close the connection without an answer
    headers: dict[str, str] = field(default_factory=dict)
    message: str = "fault"


Answer = Callable[[int, dict[str, Any], dict[str, str]], "str | Fault"]


class FakeOpenAI:
    def __init__(self, answer: Answer, port: int = 0):
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                fake._record("GET", None, self)
                self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                number = fake._record("POST", body, self)
                result = fake.answer(number, body, dict(self.headers))
                if isinstance(result, Fault):
                    if result.status is None:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self._send(result.status, {"error": {"message": f"{result.message} {result.status}"}},
                               result.headers)
                    return
                words = len(result.split())
                self._send(200, {
                    "id": f"c{number}", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": result}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5 + words, "total_tokens": 15 + words},
                })

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None):
                data = json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _record(self, method: str, body: Any, handler: BaseHTTPRequestHandler) -> int:
        with self.lock:
            self.requests.append({"method": method, "path": handler.path, "body": body,
                                  "headers": {k.lower(): v for k, v in handler.headers.items()}})
            return sum(r["method"] == "POST" for r in self.requests)

    def posts(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["method"] == "POST"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
