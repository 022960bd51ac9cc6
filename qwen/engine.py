"""A small batched generation engine: many concurrent requests share one KV cache and one decode step.

Used by openai_api.py (asyncio) and web_demo.py (threads). One background thread owns the model and loops:
admit waiting requests (one left-padded prefill for those arriving together), merge their cache rows into the
running batch, run ONE decode step for every running row, sample each row with its own parameters and
generator, and drop the rows that finished or were cancelled. Callers never touch the model; they get events.

Why not transformers' continuous batching (`generate_batch` / `ContinuousBatchingManager`): it packs all
sequences into one row with paged attention and a 4D mask, while QWen derives position_ids and its per-sample
dynamic NTK / logN scaling from each row's 2D attention mask; a padded batch on a DynamicCache feeds that
faithfully, and works unchanged for any causal LM taking (input_ids, attention_mask, position_ids,
cache, use_cache); `qwen.compat` names the cache argument as the installed transformers does.

Batch layout: row r of the cache holds [padding..., prompt_r, generated_r], right-aligned, so every row's next
token lands in the same column. attention_mask marks padding with 0; position_ids = cumsum(mask) - 1.

Context limit: a prompt that leaves no room under `max_context` raises PromptTooLongError; otherwise
max_new_tokens is clamped to the room left (the request then finishes with "length").
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import random
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from qwen_generation_utils import DEFAULT_MAX_NEW_TOKENS

from .compat import cache_kwargs
from .kv_cache import Int8KVCache, Int8KVLayer

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit
GREEDY_BELOW = 0.01  # as the original: a temperature this small means greedy decoding


class QueueFullError(RuntimeError):
    """Too many requests are waiting or running; the server answers 429."""


class EngineStoppedError(RuntimeError):
    """The engine was shut down (the server is stopping); the server answers 503."""


class PromptTooLongError(ValueError):
    """The prompt does not fit the context window; the server answers 400."""


def model_context_length(model) -> int | None:
    """The longest sequence `model` is configured for: max_position_embeddings, else QWen's seq_length."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", None)


@dataclass
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    repetition_penalty: float = 1.0  # HF semantics: over prompt and generated tokens, divides positive logits
    presence_penalty: float = 0.0  # OpenAI semantics: over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed → same tokens, whatever else shares the batch
    stop_token_ids: tuple[int, ...] = ()  # e.g. eos, <|im_end|>, <|im_start|>; never emitted as a TokenEvent
    logprobs: bool = False  # log-probabilities of the model's raw distribution (before penalties/temperature)
    top_logprobs: int = 0

    def __post_init__(self):
        self.stop_token_ids = tuple(self.stop_token_ids)
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 means off)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 means off)"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, "seed must fit in 64 bits"),  # torch.Generator's
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameters: {message}")

    @classmethod
    def resolve(cls, requested: Mapping[str, Any], checkpoint=None) -> SamplingParams:
        """Each field from the request, else the checkpoint's generation_config, else the built-in default.

        `requested` holds field names of this class (None = unset); `checkpoint` is a GenerationConfig (or None).
        A checkpoint that does not sample means temperature 0, and so does a temperature below GREEDY_BELOW.
        A new sampling option is a field here and a field of the same name in the API schema, nothing more.
        """

        def from_checkpoint(name: str):
            if name == "temperature" and getattr(checkpoint, "do_sample", None) is False:
                return 0.0
            return getattr(checkpoint, name, None)

        values = {}
        for name in (f.name for f in fields(cls)):
            value = requested.get(name)
            value = from_checkpoint(name) if value is None else value
            if value is not None:
                values[name] = value
        if values.get("temperature", 1.0) < GREEDY_BELOW:
            values["temperature"] = 0.0
        return cls(**values)

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # [(token_id, logprob)], most likely first


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" | "length" | "cancelled" | "error" | "shutdown" (see Engine.shutdown)
    prompt_tokens: int
    completion_tokens: int  # includes the stop token, which is not emitted as a TokenEvent
    error: str | None = None


class RequestHandle:
    """The caller's side of one request: iterate it (sync or async) for events, cancel() to stop it.

    Events are consumed once, by one consumer. Leaving an iteration early cancels the request.
    """

    def __init__(self, engine: Engine, request_id: int, prompt_tokens: int, params: SamplingParams):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.cancelled = False
        self.finished = False
        self._engine = engine
        self._events: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step and a FinishEvent("cancelled") follows."""
        if not self.finished:
            self.cancelled = True
            self._engine._cancel(self)

    def _emit(self, event: TokenEvent | FinishEvent) -> None:
        """Called from the engine thread; never blocks on the consumer."""
        with self._lock:
            self._events.append(event)
            self.finished = self.finished or isinstance(event, FinishEvent)
            self._ready.notify_all()
            loop, wakeup = self._loop, self._wakeup
        if loop is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    def __iter__(self) -> Iterator[TokenEvent | FinishEvent]:
        done = False
        try:
            while not done:
                with self._ready:
                    self._ready.wait_for(lambda: self._events)
                    event = self._events.popleft()
                done = isinstance(event, FinishEvent)
                yield event
        finally:
            if not done:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        with self._lock:
            self._loop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
        done = False
        try:
            while not done:
                with self._lock:
                    event = self._events.popleft() if self._events else None
                    if event is None:
                        self._wakeup.clear()  # the engine's next _emit schedules set() after this
                if event is None:
                    await self._wakeup.wait()
                    continue
                done = isinstance(event, FinishEvent)
                yield event
        finally:
            if not done:
                self.cancel()

    def result(self) -> tuple[list[int], FinishEvent]:
        """Block until the request finishes; return (generated token ids, final event)."""
        tokens = []
        for event in self:
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
        return tokens, event


@dataclass
class _Sequence:
    """Engine-side state of one request."""

    handle: RequestHandle
    prompt: list[int]
    max_new_tokens: int
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None  # per-token counts of generated tokens, for penalties
    prompt_seen: torch.Tensor | None = None  # bool mask of prompt tokens, for repetition_penalty

    @property
    def params(self) -> SamplingParams:
        return self.handle.params


# ---- cache helpers: DynamicCache rows are [batch, heads, seq, head_dim] tensors in cache.layers[i] ----


def _check_cache(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, Int8KVLayer):
            raise NotImplementedError(
                f"the engine batches DynamicLayer and Int8KVLayer caches only, the model produced {type(layer).__name__}"
            )


def _layer_tensors(layer) -> list[torch.Tensor]:
    """A layer's stored tensors, each [batch, ..., seq, ...]: keys/values, or the int8 cache's data/scale/zero."""
    return layer.row_tensors() if isinstance(layer, Int8KVLayer) else [layer.keys, layer.values]


def _set_layer_tensors(layer, tensors: list[torch.Tensor]) -> None:
    if isinstance(layer, Int8KVLayer):
        layer.set_row_tensors(tensors)
    else:
        layer.keys, layer.values = tensors


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _cache_map(cache: DynamicCache, fn) -> None:
    for layer in cache.layers:
        _set_layer_tensors(layer, [fn(t) for t in _layer_tensors(layer)])


def _cache_merge(a: DynamicCache, a_mask: torch.Tensor, b: DynamicCache, b_mask: torch.Tensor):
    """Stack b's rows under a's, left-padding the shorter one along the sequence."""
    width = max(a_mask.shape[1], b_mask.shape[1])
    pad_a, pad_b = width - a_mask.shape[1], width - b_mask.shape[1]

    def stack(ta, tb):
        return torch.cat([_left_pad(ta, pad_a, 2), _left_pad(tb, pad_b, 2)])

    merged = [
        [stack(ta, tb) for ta, tb in zip(_layer_tensors(la), _layer_tensors(lb), strict=True)]
        for la, lb in zip(a.layers, b.layers, strict=True)
    ]
    for layer, tensors in zip(a.layers, merged, strict=True):  # assigned only once all succeeded
        _set_layer_tensors(layer, tensors)
    return a, torch.cat([_left_pad(a_mask, pad_a, 1), _left_pad(b_mask, pad_b, 1)])


def _cache_select(cache: DynamicCache, mask: torch.Tensor, rows: torch.Tensor):
    """Keep `rows`, then drop leading columns that are padding in every kept row."""
    mask = mask.index_select(0, rows)
    start = int(mask.any(0).int().argmax())
    _cache_map(cache, lambda t: t.index_select(0, rows)[:, :, start:])
    return cache, mask[:, start:]


# ---- sampling ----


def _apply_penalties(logits: torch.Tensor, seq: _Sequence) -> torch.Tensor:
    p = seq.params
    counts = seq.counts
    if p.repetition_penalty != 1:
        seen = seq.prompt_seen | (counts > 0)
        penalized = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    # OpenAI: logits - count * frequency_penalty - (count > 0) * presence_penalty
    return logits - counts * p.frequency_penalty - (counts > 0).float() * p.presence_penalty


def _sample(logits: torch.Tensor, seq: _Sequence) -> int:
    p = seq.params
    if p.uses_penalties:
        logits = _apply_penalties(logits, seq)
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        # keep the smallest set of most likely tokens whose mass reaches top_p
        probs, order = torch.sort(logits.softmax(-1), descending=True)
        drop = (probs.cumsum(-1) - probs) > p.top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=seq.generator))


class Engine:
    """Serve many generation requests at once on one model, from one background thread.

    engine = Engine(model).start(); handle = engine.submit(ids, SamplingParams(...)); for ev in handle: ...
    Without start(), call step() yourself (deterministic tests).
    """

    def __init__(
        self, model, *, max_batch_size: int = 8, max_queue: int = 64, max_context: int | None = None,
        decodable_tokens: int | None = None,
    ):
        """decodable_tokens: only ids below it are ever sampled, i.e. len(tokenizer). The output layer may have
        more rows than the tokenizer has ids (Qwen's: 151,936 rows for 151,851 ids, padded for speed); the
        rows past the tokenizer are padding that nothing can decode, so they are masked out."""
        if max_queue < max_batch_size:
            raise ValueError(f"max_queue ({max_queue}) must be >= max_batch_size ({max_batch_size})")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.decodable_tokens = decodable_tokens
        self.max_batch_size, self.max_queue, self.max_context = max_batch_size, max_queue, max_context
        # only the last position's logits are needed; models that support it skip the rest of the lm_head
        accepts = inspect.signature(model.forward).parameters
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self._recompute_check = getattr(model, "needs_cache_recompute", None)
        # the model's own cache kind: int8 rows when config.use_cache_quantization (qwen.kv_cache)
        int8 = getattr(model.config, "use_cache_quantization", False)
        self._new_cache = (lambda: Int8KVCache(model.config)) if int8 else DynamicCache

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active = 0  # submitted and not finished: what max_queue limits
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False  # drain(): no new requests, the running ones go on
        self._stop_reason = "cancelled"  # the FinishEvent reason of requests that shutdown() ends
        # the running batch, owned by whoever runs step()
        self._rows: list[_Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None

    # ---- caller side (any thread) ----

    @property
    def num_running(self) -> int:
        """Requests taken from the queue and not finished (a request being prefilled counts)."""
        with self._lock:
            return self._active - len(self._waiting)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> RequestHandle:
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if not 0 <= min(prompt) <= max(prompt) < self.vocab_size:
            raise ValueError(
                f"the prompt has token ids outside the model's vocabulary [0, {self.vocab_size})"
            )
        max_new_tokens = params.max_new_tokens
        if self.max_context is not None:
            room = self.max_context - len(prompt)
            if room < 1:
                raise PromptTooLongError(
                    f"the prompt has {len(prompt)} tokens but the context window is {self.max_context}; "
                    "shorten the prompt or the history"
                )
            max_new_tokens = min(max_new_tokens, room)
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        else:
            generator = torch.Generator(self.device).manual_seed(random.getrandbits(63))
        with self._lock:
            if self._stopping or self._draining:
                raise EngineStoppedError("the server is shutting down; retry on another instance or later")
            if self._active >= self.max_queue:
                raise QueueFullError(
                    f"the server is busy ({self._active} requests waiting or running); retry later"
                )
            self._active += 1
            self._next_id += 1
            handle = RequestHandle(self, self._next_id, len(prompt), params)
            self._waiting.append(_Sequence(handle, prompt, max_new_tokens, generator))
            self._work.notify()
        return handle

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            waiting = next((s for s in self._waiting if s.handle is handle), None)
            if waiting is not None:
                self._waiting.remove(waiting)
        if waiting is not None:
            self._finish(waiting, "cancelled")
        # a running row is dropped by the engine at its next step

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qwen-engine", daemon=True)
            self._thread.start()
        return self

    def drain(self) -> None:
        """Admit no new requests (submit raises EngineStoppedError); those already submitted go on."""
        with self._lock:
            self._draining = True

    def shutdown(self, timeout: float | None = None, reason: str = "cancelled") -> None:
        """Stop the thread; every request not yet finished ends with FinishEvent(`reason`)."""
        with self._lock:
            self._stopping = True
            self._stop_reason = reason
            self._work.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for seq in waiting:
            self._finish(seq, reason)
        # the running batch belongs to the engine thread: a thread still in a (long) step cancels it on exit
        if self._thread is None or not self._thread.is_alive():
            self._cancel_rows()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- engine side (the engine thread, or a test calling step()) ----

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._work:
                    self._work.wait_for(lambda: self._stopping or self._waiting or self._rows)
                    stopping = self._stopping
                if stopping:
                    self._cancel_rows()
                    return
                try:
                    self._step()
                except Exception as exc:  # last line of defence: fail what runs, keep the thread alive
                    self._fail(self._rows, exc)
                    self._reset_batch()

    def step(self) -> None:
        """Run one iteration by hand (admit, prefill, decode); only when the thread is not started."""
        if self._thread is not None:
            raise RuntimeError("the engine thread is running; step() is for engines that were not start()ed")
        with torch.inference_mode():
            self._step()

    def _step(self) -> None:
        self._keep([s for s in self._rows if not self._finish_if_cancelled(s)])
        # rows whose cache the model says is stale (QWen's dynamic NTK alpha changed) are prefilled again
        stale = [s for s in self._rows if self._needs_recompute(s)]
        if stale:
            self._keep([s for s in self._rows if s not in stale])
        with self._lock:
            free = self.max_batch_size - len(self._rows) - len(stale)
            admitted = stale + [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as exc:  # e.g. out of memory: fail these requests, keep serving the others
                self._fail(admitted, exc)
        if self._rows:
            try:
                self._decode(self._rows)
            except Exception as exc:  # the batch cache may be half-updated: fail every running request
                self._fail(self._rows, exc)
                self._reset_batch()

    def _fail(self, seqs: list[_Sequence], exc: Exception) -> None:
        for seq in seqs:
            if not seq.handle.finished:
                self._finish(seq, "error", f"{type(exc).__name__}: {exc}")
        self._keep([s for s in self._rows if not s.handle.finished])

    def _needs_recompute(self, seq: _Sequence) -> bool:
        """Whether the model wants this row's cache rebuilt before its next token (see needs_cache_recompute)."""
        if self._recompute_check is None:
            return False
        total = len(seq.prompt) + len(seq.generated)
        return self._recompute_check(total - 1, total)  # the newest token is not in the cache yet

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Compute the cache of `seqs` (new requests, or rows to recompute: prompt + generated so far)."""
        tokens = [s.prompt + s.generated for s in seqs]
        width = max(len(t) for t in tokens)
        input_ids = torch.tensor([[0] * (width - len(t)) + t for t in tokens], device=self.device)
        mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tokens], device=self.device)
        cache = self._new_cache()
        logits = self._forward(input_ids, mask, cache, **self._prefill_kwargs)
        _check_cache(cache)
        if self._rows:
            self._cache, self._mask = _cache_merge(self._cache, self._mask, cache, mask)
        else:
            self._cache, self._mask = cache, mask
        self._rows = self._rows + seqs
        self._emit_tokens(seqs, logits)

    def _decode(self, seqs: list[_Sequence]) -> None:
        input_ids = torch.tensor([[s.generated[-1]] for s in seqs], device=self.device)
        mask = F.pad(self._mask, (0, 1), value=1)
        logits = self._forward(input_ids, mask, self._cache)
        self._mask = mask
        self._emit_tokens(seqs, logits)

    def _forward(self, input_ids, mask, cache, **kwargs) -> torch.Tensor:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **cache_kwargs(cache),
            **kwargs,
        )
        return out.logits[:, -1].float()

    def _emit_tokens(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token for each of `seqs` (the last rows of the batch), emit it, drop finished rows."""
        if self.decodable_tokens is not None and self.decodable_tokens < logits.shape[-1]:
            logits[:, self.decodable_tokens :] = float("-inf")  # padding rows of the output layer: never sampled
        want_logprobs = any(s.params.logprobs or s.params.top_logprobs for s in seqs)
        logprobs = logits.log_softmax(-1) if want_logprobs else [None] * len(seqs)
        for seq, row_logits, row_logprobs in zip(seqs, logits, logprobs, strict=True):
            try:
                self._emit_token(seq, row_logits, row_logprobs)
            except Exception as exc:  # e.g. one request's penalties overflow to NaN: fail it, not its batch
                self._fail([seq], exc)
        self._keep([s for s in self._rows if not s.handle.finished])

    def _emit_token(self, seq: _Sequence, row_logits: torch.Tensor, row_logprobs: torch.Tensor | None) -> None:
        p = seq.params
        if p.uses_penalties and seq.counts is None:
            seq.counts = torch.zeros_like(row_logits)
            seq.prompt_seen = torch.zeros_like(row_logits, dtype=torch.bool)
            seq.prompt_seen[torch.tensor(seq.prompt, device=self.device)] = True
        token = _sample(row_logits, seq)
        seq.generated.append(token)
        if seq.counts is not None:
            seq.counts[token] += 1
        if token in p.stop_token_ids:
            self._finish(seq, "stop")
            return
        event = TokenEvent(token)
        if p.logprobs or p.top_logprobs:
            top = None
            if p.top_logprobs:
                values, indices = torch.topk(row_logprobs, p.top_logprobs)
                top = list(zip(indices.tolist(), values.tolist(), strict=True))
            event = TokenEvent(token, float(row_logprobs[token]), top)
        seq.handle._emit(event)
        if len(seq.generated) >= seq.max_new_tokens:
            self._finish(seq, "length")

    def _finish_if_cancelled(self, seq: _Sequence) -> bool:
        if seq.handle.cancelled and not seq.handle.finished:
            self._finish(seq, "cancelled")
        return seq.handle.finished

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        with self._lock:
            self._active -= 1
        seq.handle._emit(FinishEvent(reason, len(seq.prompt), len(seq.generated), error))

    def _keep(self, rows: list[_Sequence]) -> None:
        """Shrink the running batch to `rows` (a subsequence of the current rows)."""
        if len(rows) == len(self._rows):
            return
        if not rows:
            self._reset_batch()
            return
        index = {id(s): i for i, s in enumerate(self._rows)}
        keep = torch.tensor([index[id(s)] for s in rows], device=self.device)
        self._cache, self._mask = _cache_select(self._cache, self._mask, keep)
        self._rows = rows

    def _cancel_rows(self) -> None:
        for seq in self._rows:
            if not seq.handle.finished:
                self._finish(seq, self._stop_reason)
        self._reset_batch()

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask = [], None, None


__all__ = [
    "Engine",
    "FinishEvent",
    "PromptTooLongError",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
]
