"""Continuous batching for ``socratune serve``: the replies of requests that arrive together are
decoded together, one forward pass per token for all of them.

One thread (``Batcher``'s) owns the model. Requests wait in its queue; at every step it decodes
one token for every row with one forward over the batch's KV cache, then takes what waits (up
to ``max_batch`` rows in all) and prefills the newcomers together in one more forward. Rows keep their own sampling
settings (temperature, top_p, repetition penalty), seed, ``stop`` strings, ``max_tokens``, time
limit and stream; a row leaves the batch as soon as it ends (end of turn, a stop string, its
length, its time, or its client hanging up) and the next request waiting joins at the next
step. That is continuous batching; static batches were the fallback and were not needed.

Why not transformers' own continuous batching (``generate_batch``, ``init_continuous_batching``,
checked on transformers 5.25): its sampling mode (greedy or sampled) and RNG are the manager's,
not a request's, so neither a greedy and a sampled request side by side nor a seed per request
is possible; it drops the repetition penalty (``RepetitionPenaltyLogitsProcessor`` is marked
unsupported); and a custom logits processor sees the packed tokens of the whole batch, not each
row's history, so the whole-character guard (``whole_chars``) could not run in it. It also
switches the model's attention to its paged implementation, which our 4-bit PEFT models have
not been tested with.

How the batch is laid out. Rows are left-padded: the KV cache is ``[rows, heads, columns,
dim]`` with every row's tokens ending in the last column and an attention mask of zeros in
front of the shorter rows. Newcomers of one step are prefilled together, left-padded as
``generate_replies`` pads a batch (one newcomer alone is read without padding, exactly as by
``model.generate``); their cache is then padded and stacked onto the batch's. Rows that leave
are dropped from the cache and columns that only padding uses are trimmed. Position
ids are each row's own, so rotary positions are what they would be alone.

Same seed, same reply? Each row samples from its own ``torch.Generator``, seeded from the
request's seed, and draws one number per token whatever else is in the batch, so a seeded
request draws the same numbers alone or batched. The logits it draws with are equal up to
float rounding only: a forward over several rows (matrix products of another shape, attention
over padded columns) may round the last bit differently from one over a single row, on CPU
(oneDNN/MKL pick kernels by shape) and more so on CUDA (cuBLAS tiles and split-K, SDPA with a
padding mask). A greedy near-tie, or a draw that lands on the edge between two tokens, can then
go the other way; from there the replies differ. On the tiny model on CPU the tests see equal
replies; across kernels no framework promises more. A request alone goes the same path (a batch
of one), so the same seed alone gives the same reply every time.

Models with sliding-window attention layers (Gemma 2): a row is only batched while the padded
batch, with every row's remaining tokens, fits inside the window; beyond it the request waits
for the batch to empty and runs alone, as ``model.generate`` would.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .generate import GenParams, delta_streamer
from .whole_chars import whole_character_processor

log = logging.getLogger("socratune.batching")


def default_max_batch(device: Any) -> int:
    """Rows decoded together by default: 8 on CPU (its cores saturate soon after), 32 on a GPU."""
    return 32 if getattr(device, "type", str(device)) == "cuda" else 8


@dataclass(eq=False)
class Request:
    """One reply to generate; ``finish``, ``tokens`` or ``error`` are set when ``done`` is."""

    input_ids: list[int]
    params: GenParams
    emit: Callable[[str], None]
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cancel: threading.Event | None = None
    done: threading.Event = field(default_factory=threading.Event)
    finish: str | None = None
    tokens: int = 0
    error: BaseException | None = None


class _Row:
    """A request inside the batch: its tokens, sampler, streamer and guard."""

    def __init__(self, request: Request, batcher: Batcher):
        import torch

        self.request = request
        self.ids = list(request.input_ids)  # prompt and reply so far: the repetition penalty's view
        self.generated = 0
        self.position = len(request.input_ids)  # the position id of the next token fed
        self.next_token: int | None = None  # picked but not yet fed to the model
        self.started = time.monotonic()
        self.generator = torch.Generator(device=batcher.device)
        if request.seed is not None:
            self.generator.manual_seed(request.seed % 2**64)
        else:
            self.generator.seed()
        self.utf8: Any = None  # where the reply stands inside a UTF-8 character (whole_chars)
        self.streamer = delta_streamer(batcher.tokenizer, request.emit, batcher.tokenizer_lock, request.stop,
                                       request.cancel)
        self.streamer.put(torch.tensor(request.input_ids))  # the streamer skips the prompt
        self.processors = _processors(request.params, batcher.top_k)

    def cancelled(self) -> bool:
        return self.request.cancel is not None and self.request.cancel.is_set()


def _processors(params: GenParams, top_k: int | None) -> list[Any]:
    """The logits warpers ``model.generate`` would apply after the guard, in its order."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if params.temperature <= 0:
        return []
    warpers: list[Any] = []
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=params.top_p))
    return warpers


class Batcher:
    """The generating thread and its queue. ``generate`` blocks its caller until the reply is done.

    ``max_batch``: rows decoded together; more requests wait in the queue, joining as rows leave.
    ``tokenizer_lock`` guards the tokenizer where other threads use it too. ``max_generation_s``
    cuts a reply (finish "length") that has taken that long.
    """

    def __init__(self, model: Any, tokenizer: Any, max_batch: int, tokenizer_lock: Any = None,
                 eos_ids: set[int] | None = None, max_generation_s: float = 120.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.tokenizer_lock = tokenizer_lock
        self.max_generation_s = max_generation_s
        if eos_ids is None:
            eos = model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.eos_ids = eos_ids
        self.device = model.device
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos_ids))  # masked out: any id does
        self.top_k = getattr(model.generation_config, "top_k", None)
        config = model.config.get_text_config(decoder=True)
        self.config = model.config
        sliding = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or []
        windowed = sliding and (not layer_types or "sliding_attention" in layer_types)
        self.window: int | None = sliding if windowed else None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        try:
            accepted = set(inspect.signature(base.forward).parameters)
        except (TypeError, ValueError):
            accepted = set()
        self._logits_to_keep = "logits_to_keep" in accepted  # as generate: the last position's logits only
        # transformers 5.2x renamed past_key_values to cache (the old name warns until it goes)
        self._cache_name = "cache" if "cache" in accepted else "past_key_values"
        self._queue: deque[Request] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # The batch: rows, their cache and its attention mask (1 = a token, 0 = left padding).
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None
        self.steps = 0  # forwards over the batch so far; with ``widest`` for tests and logs
        self.widest = 0  # the most rows decoded in one forward

    # --- the callers' side ---------------------------------------------------------------------

    def generate(self, input_ids: list[int], params: GenParams, emit: Callable[[str], None],
                 seed: int | None = None, stop: tuple[str, ...] = (),
                 cancel: threading.Event | None = None) -> tuple[str, int]:
        """The reply to ``input_ids``, streamed to ``emit`` piece by piece (the pieces add up to
        what ``generate_replies`` returns); returns OpenAI's ``finish_reason`` and the number of
        generated tokens. Setting ``cancel`` ends it at the next step; one still waiting leaves
        the queue at once."""
        request = Request(list(input_ids), params, emit, seed, tuple(stop), cancel)
        self.submit(request)
        while not request.done.wait(0.05):
            if cancel is not None and cancel.is_set() and self._withdraw(request):
                return "length", 0
        if request.error is not None:
            raise request.error
        assert request.finish is not None
        return request.finish, request.tokens

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="socratune-batcher", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _withdraw(self, request: Request) -> bool:
        with self._wake:
            if request in self._queue:
                self._queue.remove(request)
                return True
        return False

    def waiting(self) -> int:
        with self._wake:
            return len(self._queue)

    def running(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        """Stop the thread after the current step; requests still waiting fail."""
        with self._wake:
            self._closed = True
            self._wake.notify()

    # --- the generating thread ---------------------------------------------------------------

    def _run(self) -> None:
        import torch

        while True:
            with self._wake:
                while not self._queue and not self._rows and not self._closed:
                    self._wake.wait()
                if self._closed:
                    left = list(self._queue) + [row.request for row in self._rows]
                    self._queue.clear()
                    break
                joining = self._admit()
            try:
                with torch.no_grad():
                    self._step(joining)
            except Exception as exc:  # noqa: BLE001 - each caller raises it in its own thread
                failed = dict.fromkeys([row.request for row in self._rows] + joining)
                self._rows, self._cache, self._mask = [], None, None
                for request in failed:
                    if not request.done.is_set():
                        self._finish(request, error=exc)
        for request in left:
            self._finish(request, error=RuntimeError("the server is shutting down"))

    def _admit(self) -> list[Request]:
        """The requests that join at this step (called under ``_wake``)."""
        joining: list[Request] = []
        while self._queue and len(self._rows) + len(joining) < self.max_batch:
            request = self._queue[0]
            if self.window is not None and (self._rows or joining) and not self._fits(joining + [request]):
                break
            joining.append(self._queue.popleft())
        return joining

    def _fits(self, requests: list[Request]) -> bool:
        """Whether the batch with ``requests`` stays inside the sliding window to its end."""
        width = max([self._mask.shape[1] if self._mask is not None else 0]
                    + [len(r.input_ids) for r in requests])
        left = max([row.request.params.max_new_tokens - row.generated for row in self._rows]
                   + [r.params.max_new_tokens for r in requests])
        return width + left < self.window

    def _step(self, joining: list[Request]) -> None:
        # Rows already in the batch get their next token; then newcomers are prefilled together
        # (one forward, left-padded) and join.
        for row in [r for r in self._rows if r.cancelled() or self._timed_out(r)]:
            self._end(row, "length")
        self._drop_finished()
        if self._rows:
            self._decode()
            self._drop_finished()
        for request in joining:
            if request.cancel is not None and request.cancel.is_set():
                self._finish(request, "length", 0)
        joining = [r for r in joining if not r.done.is_set()]
        if joining:
            self._join(*self._prefill(joining))
            self._drop_finished()

    def _timed_out(self, row: _Row) -> bool:
        return time.monotonic() - row.started >= self.max_generation_s

    def _forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any) -> Any:
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        kwargs[self._cache_name] = cache
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, **kwargs)
        return output.logits[:, -1, :].float()

    def _prefill(self, requests: list[Request]) -> tuple[list[_Row], Any, Any]:
        """The rows of ``requests`` with their first token, their cache and its mask. One request
        is read without padding, as ``model.generate`` reads it; several are left-padded."""
        import torch
        from transformers import DynamicCache

        rows = [_Row(request, self) for request in requests]
        width = max(len(r.input_ids) for r in requests)
        pad = self.pad_id
        ids = torch.tensor([[pad] * (width - len(r.input_ids)) + r.input_ids for r in requests], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in requests],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config)
        logits = self._forward(ids, mask, positions, cache)
        self.steps += 1
        self.widest = max(self.widest, len(rows))
        for row, token in zip(rows, self._pick(rows, logits, fresh=True)):
            try:
                self._accept(row, token)
            except Exception as exc:  # noqa: BLE001 - one row's failure (its emit...) ends that row only
                self._end(row, error=exc)
        return rows, cache, mask

    def _decode(self) -> None:
        import torch

        rows = self._rows
        ids = torch.tensor([[row.next_token] for row in rows], device=self.device)
        positions = torch.tensor([[row.position] for row in rows], device=self.device)
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=self._mask.dtype, device=self.device)], dim=1)
        logits = self._forward(ids, mask, positions, self._cache)
        self._mask = mask
        self.steps += 1
        self.widest = max(self.widest, len(rows))
        for row, token in zip(rows, self._pick(rows, logits, fresh=False)):
            row.position += 1
            try:
                self._accept(row, token)
            except Exception as exc:  # noqa: BLE001 - one row's failure (its emit...) ends that row only
                self._end(row, error=exc)

    def _pick(self, rows: list[_Row], logits: Any, fresh: bool) -> list[int]:
        """The next token of each row from its logits (``[rows, vocab]``): repetition penalty,
        whole-character guard, then greedy or sampled with the row's own generator, in
        ``model.generate``'s order. ``fresh``: the rows were just prefilled (no token of theirs
        yet). One guard call for all rows and one device-to-host copy at the end, so that a GPU
        waits twice a step, not twice a row."""
        import torch
        from transformers import RepetitionPenaltyLogitsProcessor

        scores = logits
        penalised = [i for i, row in enumerate(rows) if row.request.params.repetition_penalty != 1.0]
        if penalised:
            scores = scores.clone()
            for i in penalised:
                penalty = RepetitionPenaltyLogitsProcessor(rows[i].request.params.repetition_penalty)
                scores[i: i + 1] = penalty(torch.tensor([rows[i].ids], device=self.device), scores[i: i + 1])
        guard = whole_character_processor(self.tokenizer)
        if guard is not None:
            # The processor follows its rows' UTF-8 states from call to call; here the rows change
            # between steps, so each row keeps its own state and lends it for the call.
            if not fresh:
                guard.states = [row.utf8 for row in rows]
            scores = guard(torch.tensor([[row.ids[-1]] for row in rows]), scores)
            for row, state in zip(rows, guard.states):
                row.utf8 = state
        tokens = scores.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.request.params.temperature > 0:
                sampled = scores[i: i + 1]
                for warper in row.processors:
                    sampled = warper(None, sampled)
                tokens[i] = torch.multinomial(torch.softmax(sampled, dim=-1), 1, generator=row.generator)[0, 0]
        return tokens.tolist()

    def _accept(self, row: _Row, token: int) -> None:
        """``token`` appended to ``row``: streamed, and the row ended where it should."""
        import torch

        row.ids.append(token)
        row.generated += 1
        row.next_token = token
        row.streamer.put(torch.tensor([token]))
        if token in self.eos_ids or row.streamer.stopped:
            self._end(row, "stop")
        elif row.generated >= row.request.params.max_new_tokens or self._timed_out(row):
            self._end(row, "length")

    def _end(self, row: _Row, finish: str = "length", error: BaseException | None = None) -> None:
        if row.request.done.is_set():
            return
        if error is None:
            try:
                row.streamer.end()  # the text held back (a possible stop string's start...)
            except Exception as exc:  # noqa: BLE001
                error = exc
        self._finish(row.request, finish, row.generated, error)

    @staticmethod
    def _finish(request: Request, finish: str | None = None, tokens: int = 0,
                error: BaseException | None = None) -> None:
        request.finish, request.tokens, request.error = finish, tokens, error
        request.done.set()

    # --- the batch's cache -------------------------------------------------------------------

    def _layers(self, cache: Any) -> list[tuple[Any, Any]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _rebuild(self, layers: list[tuple[Any, Any]]) -> Any:
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers, config=self.config)

    def _join(self, rows: list[_Row], cache: Any, mask: Any) -> None:
        """``rows`` (prefilled into ``cache``, padded as ``mask`` says) stacked onto the batch,
        both left-padded to one width."""
        import torch
        import torch.nn.functional as F

        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        total = max(mask.shape[1], self._mask.shape[1])
        pad_batch, pad_new = total - self._mask.shape[1], total - mask.shape[1]

        def left(tensor: Any, pad: int) -> Any:
            return F.pad(tensor, (0, 0, pad, 0)) if pad else tensor

        layers = [(torch.cat([left(bk, pad_batch), left(nk, pad_new)]),
                   torch.cat([left(bv, pad_batch), left(nv, pad_new)]))
                  for (bk, bv), (nk, nv) in zip(self._layers(self._cache), self._layers(cache))]
        self._mask = torch.cat([F.pad(self._mask, (pad_batch, 0)), F.pad(mask, (pad_new, 0))])
        self._cache = self._rebuild(layers)
        self._rows = self._rows + rows

    def _drop_finished(self) -> None:
        """Rows that ended leave the cache; columns only padding still uses are cut off."""
        import torch

        keep = [i for i, row in enumerate(self._rows) if not row.request.done.is_set()]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0, 0])
        self._mask = mask[:, first:]
        self._cache = self._rebuild([(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                                     for k, v in self._layers(self._cache)])
        self._rows = [self._rows[i] for i in keep]
