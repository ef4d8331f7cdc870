"""The generation engine behind the API: the loaded model, a request body turned into a
``Completion`` against the schema, the limits and the model's context, and generation of up to
``max_batch`` replies decoded together (``generation.batching.Batcher``), as many again waiting
for a place (``Engine.hold``), the rest refused with 429."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..generation.batching import Batcher, default_max_batch
from ..generation.generate import GenParams, prompt_texts
from .schema import (
    ApiError,
    ChatRequest,
    Completion,
    OutOfRange,
    ServeLimits,
    check_conversation,
    check_json,
    parse_int,
)

DEFAULT_LIMITS = ServeLimits()  # frozen: one instance is every default engine's


class Engine:
    """The loaded model and the rules for using it: validation, up to ``max_batch`` replies decoded
    together (``batching.Batcher``), as many again waiting, the rest refused."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, defaults: GenParams,
                 limits: ServeLimits = DEFAULT_LIMITS, max_batch: int | None = None):
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
            data = json.loads(body, parse_int=parse_int, parse_constant=OutOfRange)
        except RecursionError:
            raise ApiError(400, f"the request body nests deeper than {self.limits.max_json_depth} levels") from None
        except ValueError as exc:  # UnicodeDecodeError too
            raise ApiError(400, f"the request body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
        check_json(data, self.limits)
        try:
            request = ChatRequest.model_validate(data)
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            param = ".".join(str(part) for part in error["loc"])
            raise ApiError(400, f"{param}: {error['msg']}", param) from None
        if request.model != self.model_id:
            raise ApiError(404, f"the model {request.model[:100]!r} does not exist; this server has "
                           f"{self.model_id!r}", "model", "model_not_found")
        check_conversation(request.messages, self.limits)
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


def model_id_for(run_dir: str | Path, checkpoint: str | None = None, base_only: bool = False) -> str:
    """The name clients pass as ``model``: the run directory's name, plus what was loaded from it."""
    name = Path(run_dir).resolve().name
    if base_only:
        return f"{name}@base"
    return f"{name}@{Path(checkpoint).name}" if checkpoint else name
