"""The generation engine behind the API: the loaded model, a request body turned into a
``Completion`` against the schema, the limits and the model's context, and generation one
request at a time (``Engine.hold``) in the thread that calls it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..generation.generate import GenParams, delta_streamer, prompt_texts, whole_character_kwargs
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
    """The loaded model and the rules for using it: validation, one generation at a time."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, defaults: GenParams,
                 limits: ServeLimits = DEFAULT_LIMITS):
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
        """A place in the queue, or a 429 at once when ``max_waiting`` requests already wait."""
        if not self._slots.acquire(blocking=False):
            raise ApiError(429, f"the server is busy: {self.limits.max_waiting} requests are already waiting; "
                           "try again shortly", None, "server_busy", "rate_limit_error")

    def unreserve(self) -> None:
        self._slots.release()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """The model itself, after the requests ahead; 503 when that takes ``max_queue_wait_s``."""
        if not self._model_lock.acquire(timeout=self.limits.max_queue_wait_s):
            raise ApiError(503, "the server is busy: timed out waiting for the model", None, "server_busy",
                           "server_error")
        try:
            yield
        finally:
            self._model_lock.release()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """``reserve`` then ``hold``: the model for one request, from a thread that may block."""
        self.reserve()
        try:
            with self.hold():
                yield
        finally:
            self.unreserve()

    def generate(self, completion: Completion, emit: Callable[[str], None],
                 cancel: threading.Event | None = None) -> tuple[str, int]:
        """Generate the reply, handing ``emit`` each new piece of text; call inside ``hold()``.

        Returns OpenAI's ``finish_reason`` ("stop" at the end-of-turn token or a stop string,
        "length" when cut by max_tokens or the time limit) and the number of generated tokens.
        Setting ``cancel`` ends generation at the next token.
        """
        import torch
        from transformers import StoppingCriteriaList

        if completion.seed is not None:
            torch.manual_seed(completion.seed)  # only the lock holder draws from the generator
        input_ids = torch.tensor([completion.input_ids], device=self.model.device)
        streamer = delta_streamer(self.tokenizer, emit, self._tokenizer_lock, completion.stop, cancel)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                **completion.params.generate_kwargs(), **whole_character_kwargs(self.tokenizer),
                pad_token_id=self.tokenizer.pad_token_id,
                max_time=self.limits.max_generation_s, streamer=streamer,
                stopping_criteria=StoppingCriteriaList([streamer.criteria]),
            )
        new_tokens = output[0, input_ids.shape[1]:].tolist()
        # A finished row is padded to the batch's length: count up to the end-of-turn token.
        ended = next((i for i, token in enumerate(new_tokens) if token in self.eos_ids), None)
        count = len(new_tokens) if ended is None else ended + 1
        finish = "stop" if streamer.stopped or ended is not None else "length"
        return finish, count


def model_id_for(run_dir: str | Path, checkpoint: str | None = None, base_only: bool = False) -> str:
    """The name clients pass as ``model``: the run directory's name, plus what was loaded from it."""
    name = Path(run_dir).resolve().name
    if base_only:
        return f"{name}@base"
    return f"{name}@{Path(checkpoint).name}" if checkpoint else name
