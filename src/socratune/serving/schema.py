"""What a chat request may hold, and what one client may ask of the server: the request schema
(pydantic, extra keys forbidden, strict types), the limits (``ServeLimits``), the checks on the
parsed JSON (depth, lone surrogates, out-of-range numbers) and on the conversation, and
``ApiError``, every refusal as OpenAI's error object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from ..generation.generate import MIN_DIVISOR, GenParams


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


class OutOfRange:
    """Stands in, while the body is parsed, for a number no parameter could hold (NaN, Infinity,
    an integer of hundreds of digits), so that the error can name where it was."""

    def __init__(self, text: str):
        self.text = text

    def describe(self) -> str:
        return f"an integer of {len(self.text)} digits" if self.text.lstrip("-").isdigit() else self.text


def parse_int(text: str) -> int | OutOfRange:
    return int(text) if len(text) <= 40 else OutOfRange(text)


def check_json(value: Any, limits: ServeLimits, path: str = "", depth: int = 1) -> None:
    """Depth and lone surrogates anywhere in the parsed body; the error names where."""
    if depth > limits.max_json_depth:
        raise ApiError(400, f"{path or 'the request body'} nests deeper than {limits.max_json_depth} levels",
                       path or None)
    if isinstance(value, OutOfRange):
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
            check_json(key, limits, path, depth)
            check_json(item, limits, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json(item, limits, f"{path}.{index}", depth + 1)


def check_conversation(messages: list[Message], limits: ServeLimits) -> None:
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
