"""A small batched generation engine: many concurrent requests share one KV cache and one decode step.

Used by openai_api.py (asyncio) and web_demo.py (threads). One background thread owns the model and loops:
admit waiting requests into free slots of the KV cache (qwen/slot_cache.py), feed prompts in chunks of at most
`prefill_chunk` tokens per step, run ONE decode forward for every row that has a token to feed, sample each row
with its own parameters and generator, and free the slots of rows that finished or were cancelled. Callers never
touch the model; they get events.

Why not transformers' continuous batching (`generate_batch` / `ContinuousBatchingManager`): it packs all
sequences into one row with paged attention, while QWen computes its per-row dynamic NTK / logN scaling from each
row's positions. Here each request keeps its own row, with its own positions (position = cache column), and a
4D mask per forward; that works unchanged for any causal LM taking (input_ids, attention_mask, position_ids,
cache, use_cache); `qwen.compat` names the cache argument as the installed transformers does.

Context limit: a prompt that leaves no room under `max_context` raises PromptTooLongError; otherwise
max_new_tokens is clamped to the room left (the request then finishes with "length").
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import random
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from .compat import cache_kwargs
from .compiled_decode import CompiledDecode, why_not_compilable
from .cpu_kernels import use_cpu_decode_attention
from .errors import EngineStoppedError, PromptTooLongError, QueueFullError
from .sampling import INVALID, SamplerState, SamplingParams, sample
from .slot_cache import SPARE, SlotCache, store_for

log = logging.getLogger(__name__)

# Prompt tokens fed per step, all prefilling requests together: a long prompt is cut into chunks of this many
# tokens, and the running requests get their next token between two chunks. On a CPU a step of 128 prompt tokens
# takes about as long per token as a bigger one, so smaller steps hand out first tokens sooner (a burst of 8
# chats: p50 0.47 s at 128, 0.62 s at 256 on 2 cores); a GPU computes thousands of tokens in one short step.
DEFAULT_PREFILL_CHUNK_CPU = 128
DEFAULT_PREFILL_CHUNK_ACCELERATOR = 2048
# An idle engine keeps its KV cache this long before giving the memory back: allocating and zeroing it again costs a
# burst of new requests hundreds of ms of first-token time (fresh pages are faulted in one by one).
DEFAULT_IDLE_RELEASE_S = 30.0


def _set_soon(loop: asyncio.AbstractEventLoop, events: list[asyncio.Event]) -> None:
    """Set `events` in their `loop`, from another thread."""
    try:
        loop.call_soon_threadsafe(_set_all, events)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
        pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


def model_context_length(model) -> int | None:
    """The longest sequence `model` is configured for: max_position_embeddings, else QWen's seq_length."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", None)


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
            self._engine._wake(loop, wakeup)

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
    sampler: SamplerState
    generated: list[int] = field(default_factory=list)
    slot: int = -1  # the row of the engine's SlotCache this request owns while running
    cached: int = 0  # how many of prompt + generated the cache holds; the rest is fed at the next steps
    chunk: int = 0  # how many tokens the current prefill step feeds

    @property
    def params(self) -> SamplingParams:
        return self.handle.params

    @property
    def total(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def pending(self) -> int:
        """Tokens not in the cache yet: 1 while decoding, more while (re)prefilling."""
        return self.total - self.cached

    @property
    def decoding(self) -> bool:
        """The prompt is in the cache and one sampled token waits to be fed (else: the prompt is being fed)."""
        return self.pending == 1 and self.cached >= len(self.prompt)

    def tokens(self, start: int, stop: int) -> list[int]:
        """(prompt + generated)[start:stop], without building the whole list."""
        n = len(self.prompt)
        return self.prompt[start:stop] + self.generated[max(0, start - n) : max(0, stop - n)]


class Engine:
    """Serve many generation requests at once on one model, from one background thread.

    engine = Engine(model).start(); handle = engine.submit(ids, SamplingParams(...)); for ev in handle: ...
    Without start(), call step() yourself (deterministic tests).
    """

    def __init__(
        self, model, *, max_batch_size: int = 8, max_queue: int = 64, max_context: int | None = None,
        prefill_chunk: int | None = None,
        decodable_tokens: int | None = None, idle_release_s: float = DEFAULT_IDLE_RELEASE_S,
        threads: int | None = None, prefix_cache: bool = True, compile_decode: bool = False,
    ):
        """decodable_tokens: only ids below it are ever sampled, i.e. len(tokenizer). The output layer may have
        more rows than the tokenizer has ids (Qwen's: 151,936 rows for 151,851 ids, padded for speed); the
        rows past the tokenizer are padding that nothing can decode, so they are masked out.
        threads: torch's compute threads on the engine thread, set when it starts (None: as torch is set).
        prefix_cache: a free slot keeps the KV of the tokens its last request had in the cache, and a new request
        whose prompt starts with them takes that slot and computes only the rest (a chat resending its history);
        it costs no memory beyond the slots, and the least recently used slot is the one overwritten first.
        compile_decode: compile the decode step (qwen.compiled_decode: CPU models with packed weights) on a
        background thread from now on; decode steps run eagerly until it is ready (`decode_step` says which)."""
        if max_queue < max_batch_size:
            raise ValueError(f"max_queue ({max_queue}) must be >= max_batch_size ({max_batch_size})")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        use_cpu_decode_attention(model)  # a CPU fp32 model decodes with our attention kernel (sdpa otherwise)
        if prefill_chunk is None:
            cpu = self.device.type == "cpu"
            prefill_chunk = DEFAULT_PREFILL_CHUNK_CPU if cpu else DEFAULT_PREFILL_CHUNK_ACCELERATOR
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.dtype = next(model.parameters()).dtype
        self.prefill_chunk, self.idle_release_s, self.threads = prefill_chunk, idle_release_s, threads
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.decodable_tokens = decodable_tokens
        self.max_batch_size, self.max_queue, self.max_context = max_batch_size, max_queue, max_context
        # only the last position's logits are needed; models that support it skip the rest of the lm_head
        accepts = inspect.signature(model.forward).parameters
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self._recompute_check = getattr(model, "needs_cache_recompute", None)

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active = 0  # submitted and not finished: what max_queue limits
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False  # drain(): no new requests, the running ones go on
        self._stop_reason = "cancelled"  # the FinishEvent reason of requests that shutdown() ends
        # the running batch, owned by whoever runs step(): requests in the order they were admitted, each in a slot
        self._rows: list[_Sequence] = []
        self._slots: list[_Sequence | None] = [None] * max_batch_size
        # a model whose cache depends on how tokens were fed (not only on token and position) says so: no reuse
        self.prefix_cache = prefix_cache and getattr(model, "supports_prefix_cache", True)
        # for each free slot: the tokens whose KV it still holds in columns 0.. (prefix cache), and when it was freed
        self._kept: list[list[int]] = [[] for _ in range(max_batch_size)]
        self._freed_at = [0] * max_batch_size
        self._frees = 0
        self.reused_tokens = 0  # prompt tokens taken from the prefix cache instead of computed (a statistic)
        self.compiled_steps = 0  # decode steps run by the compiled graphs (a statistic)
        self._wakeups: dict | None = None  # while a step emits its tokens: consumer loop -> asyncio events to set
        store = store_for(getattr(model, "config", None))  # int8 when the config asks for a quantized cache
        self._cache = SlotCache(max_batch_size, store=store, max_columns=max_context)
        self._compiled: CompiledDecode | None = None
        if compile_decode:
            reason = why_not_compilable(model, store)
            if reason is None:
                # dynamo guards on the thread count: compile with the one the steps run with (step(): this thread's)
                self.threads = torch.get_num_threads() if threads is None else threads
                self._compiled = CompiledDecode(model)
                self._compiled.warm_up(self.threads)
            else:
                log.info("decoding eagerly: %s", reason)

    @property
    def decode_step(self) -> str:
        """How decode steps run: "eager", "compiling" (eager meanwhile), "compiled", or "failed" (eager)."""
        return "eager" if self._compiled is None else self._compiled.state

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
            self._waiting.append(_Sequence(handle, prompt, max_new_tokens, SamplerState(generator, prompt=prompt)))
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
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._work:
                    holding = bool(self._cache.layers)  # storage exists once a layer was written
                    if not self._work.wait_for(lambda: self._stopping or self._waiting or self._rows,
                                               self.idle_release_s if holding else None):
                        self._release_cache()  # idle for a while: give the memory back
                        continue
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
        for seq in self._rows:
            if seq.cached and self._needs_recompute(seq):
                seq.cached = 0
        with self._lock:
            free = self.max_batch_size - len(self._rows)
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        copies = []  # (running slot, new slot, columns): prefixes the new rows take from running ones
        for seq in admitted:
            seq.slot, seq.cached, source = self._place(seq.prompt)
            self._slots[seq.slot] = seq
            self._kept[seq.slot] = []
            self.reused_tokens += seq.cached
            if source is not None:
                copies.append((source, seq.slot, seq.cached))
        self._rows = self._rows + admitted
        # prefill first: a request whose prompt is then complete gets its first token now, and its second in the
        # decode below, as in a whole-prompt prefill
        prefilling = self._schedule_prefill()  # never empty when a request was admitted: it carries the copies
        if prefilling:
            try:
                self._prefill(prefilling, copies)
            except Exception as exc:  # e.g. out of memory: fail these requests, keep serving the others
                self._fail(prefilling, exc)
                for _, slot, _ in copies:  # copied into some layers or none: those rows start from scratch
                    if self._slots[slot] is not None:
                        self._slots[slot].cached = 0
        decoding = [s for s in self._rows if s.decoding]
        if decoding:
            try:
                self._decode(decoding)
            except Exception as exc:  # fail what took part; the slots of the others hold what they held
                self._fail(decoding, exc)

    def _place(self, prompt: list[int]) -> tuple[int, int, int | None]:
        """(slot, tokens already in it, running slot to copy them from or None) for a new request: the free slot
        that holds the longest prefix of `prompt` (at most all but its last token: the last one's logits are
        needed), else the lowest free slot that keeps nothing (up to max_batch_size slots of storage), else the one
        freed longest ago (LRU). When a running request has computed a longer prefix (chats that share a system
        prompt, one arriving while another runs), the new slot takes a copy of those columns at the step's first
        forward."""
        free = [slot for slot, seq in enumerate(self._slots) if seq is None]
        best, reuse, source = None, 0, None
        if self.prefix_cache:
            for slot in free:
                common = self._common_prefix(self._kept[slot], prompt)
                if common > reuse:
                    best, reuse = slot, common
            for seq in self._rows:
                common = self._common_prefix(seq.tokens(0, seq.cached), prompt)
                if common > reuse:
                    best, reuse, source = None, common, seq.slot
        if best is None:
            empty = [slot for slot in free if not self._kept[slot]]
            best = empty[0] if empty else min(free, key=lambda slot: self._freed_at[slot])
        return best, reuse, source

    def _common_prefix(self, kept: list[int], prompt: list[int]) -> int:
        """How many leading tokens of `prompt` (all but its last) the KV of `kept` serves; 0 where that KV is not
        what a fresh prefill would compute."""
        common = next((i for i, (a, b) in enumerate(zip(kept, prompt[:-1], strict=False)) if a != b),
                      min(len(kept), len(prompt) - 1))  # fmt: skip
        return common if self._prefix_is_current(common, len(kept), len(prompt)) else 0

    def _prefix_is_current(self, common: int, kept: int, total: int) -> bool:
        """Whether the KV of a kept prefix is what a fresh prefill would compute: under dynamic NTK the slot's keys
        were rotated with the alpha of its cached length, which must be the new request's alpha too."""
        check = self._recompute_check
        return check is None or not (check(common, kept) or check(common, total))

    def _release_cache(self) -> None:
        self._cache.release()
        self._kept = [[] for _ in range(self.max_batch_size)]

    def _fail(self, seqs: list[_Sequence], exc: Exception) -> None:
        for seq in seqs:
            if not seq.handle.finished:
                self._finish(seq, "error", f"{type(exc).__name__}: {exc}")
        self._keep([s for s in self._rows if not s.handle.finished])

    def _needs_recompute(self, seq: _Sequence) -> bool:
        """Whether the model wants this row's cache rebuilt before its next token (see needs_cache_recompute)."""
        if self._recompute_check is None:
            return False
        return self._recompute_check(seq.cached, seq.total)

    def _schedule_prefill(self) -> list[_Sequence]:
        """The rows that feed prompt tokens this step, first admitted first, with `chunk` set: at most
        prefill_chunk tokens in all, counting the padding of shorter chunks to the longest."""
        picked, width = [], 0
        for seq in self._rows:
            if seq.decoding:
                continue
            chunk = min(seq.pending, self.prefill_chunk)
            if chunk < seq.pending and seq.cached == 0 and self._chunk_changes_rope(chunk, seq.total):
                chunk = seq.pending  # whole: a chunk under another NTK alpha would be stale (see _prefill)
            if picked and (len(picked) + 1) * max(width, chunk) > self.prefill_chunk:
                break
            seq.chunk, width = chunk, max(width, chunk)
            picked.append(seq)
        return picked

    def _chunk_changes_rope(self, cached: int, total: int) -> bool:
        return self._recompute_check is not None and self._recompute_check(cached, total)

    def _prefill(self, seqs: list[_Sequence], copies: list[tuple[int, int, int]] = ()) -> None:
        """Feed the next `chunk` tokens of each of `seqs` (new requests, or rows to recompute: prompt + generated so
        far); those whose tokens are then all in the cache get their next token.

        Each row's chunk is right-aligned in the step's [n, T] input, so the last position is every row's last
        token (the only logits computed). The padding in front of a shorter chunk is written to the columns just
        after that row's chunk (overwritten later, never seen by a real token) at the row's first new position.
        Under dynamic NTK a chunked prompt is rotated with the alpha of its final length only if its first chunk
        already has that alpha; otherwise the prompt is fed whole (_schedule_prefill).
        """
        width = max(s.chunk for s in seqs)
        input_ids, columns, positions, visible = [], [], [], []
        for seq in seqs:
            start, chunk, pad = seq.cached, seq.chunk, width - seq.chunk
            input_ids.append([0] * pad + seq.tokens(start, start + chunk))
            columns.append([start + chunk + i for i in range(pad)] + [start + i for i in range(chunk)])
            positions.append([start] * pad + [start + i for i in range(chunk)])
            visible.append(columns[-1])
        logits = self._forward([s.slot for s in seqs], input_ids, columns, positions, visible, copies=copies,
                               **self._prefill_kwargs)
        done = []
        for seq in seqs:
            seq.cached += seq.chunk
            done.append(seq.pending == 0)
        if any(done):
            rows = [i for i, d in enumerate(done) if d]
            self._emit_tokens([seqs[i] for i in rows], logits[rows])

    def _decode(self, seqs: list[_Sequence]) -> None:
        """Feed one token to each of `seqs`, in one forward over the slots lowest .. highest busy slot (a view of
        the cache, no copy: one request costs a one-row step whichever slot it holds); the other slots in that range
        take a dummy token that only writes where nothing is kept and sees no column (attention need not read a
        prefilling row's prompt for an output nobody uses)."""
        feeding = {s.slot: s for s in seqs}
        busy = [s.slot for s in self._rows]
        rows = list(range(min(busy), max(busy) + 1))
        input_ids, columns, positions, visible = [], [], [], []
        for slot in rows:
            seq = feeding.get(slot)
            if seq is not None:
                input_ids.append(seq.tokens(seq.cached, seq.cached + 1))
                columns.append([seq.cached])
                positions.append([seq.cached])
                visible.append([seq.cached])
            else:  # a free slot, or a row being prefilled: its next chunk overwrites this column
                busy = self._slots[slot]
                column = busy.cached if busy is not None else SPARE  # a free slot's kept prefix stays intact
                input_ids.append([0])
                columns.append([column])
                positions.append([0])
                visible.append([SPARE])
        logits = self._forward(rows, input_ids, columns, positions, visible)
        for seq in seqs:
            seq.cached += 1
        slots = [s.slot for s in seqs]
        fed = logits if slots == rows else logits[[slot - rows[0] for slot in slots]]  # every row fed: no copy
        self._emit_tokens(seqs, fed)

    def _forward(self, rows, input_ids, columns, positions, visible, copies=(), **kwargs) -> torch.Tensor:
        """One forward over cache slots `rows`: input_ids/columns/positions/visible are [n, T] Python lists
        (token, cache column it is written to, its position, last column it may attend to); `copies`: (from slot,
        to slot, columns) copied first. Last logits [n, V]."""
        plan = self._cache.plan(rows, columns, self.device, copies)
        mask = self._cache.attention_mask(plan, visible, self.dtype, self.device)
        input_ids = torch.tensor(input_ids, device=self.device)
        position_ids = torch.tensor(positions, device=self.device)
        if plan.tokens == 1 and self._compiled is not None and self._compiled.state == "compiled":
            storage = self._cache.storage_of(plan)  # None when it must grow first: the eager step grows it
            logits = None if storage is None else self._compiled(input_ids, position_ids, mask, plan.columns, *storage)
            if logits is not None:
                self.compiled_steps += 1
                return logits.float()
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **cache_kwargs(self._cache),
            **kwargs,
        )
        return out.logits[:, -1].float()

    def _wake(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        """Have `loop` set `event` (an async consumer has events): now, or once the step's tokens are all emitted."""
        if self._wakeups is not None:
            self._wakeups.setdefault(loop, []).append(event)
        else:
            _set_soon(loop, [event])

    def _emit_tokens(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token for each of `seqs` (the last rows of the batch), emit it, drop finished rows. An event
        loop's consumers are woken by one call for the whole step: each call wakes the server thread, which then
        takes a core from the step's next parallel region (8 streams: 8 wake-ups per step otherwise)."""
        self._wakeups = {}
        try:
            self._sample_and_emit(seqs, logits)
        finally:
            wakeups, self._wakeups = self._wakeups, None
            for loop, events in wakeups.items():
                _set_soon(loop, events)

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        if self.decodable_tokens is not None and self.decodable_tokens < logits.shape[-1]:
            logits[:, self.decodable_tokens :] = float("-inf")  # padding rows of the output layer: never sampled
        want_logprobs = any(s.params.logprobs or s.params.top_logprobs for s in seqs)
        logprobs = logits.log_softmax(-1) if want_logprobs else [None] * len(seqs)
        for seq in seqs:
            seq.sampler.observe(seq.params, logits.shape[-1], logits.device)
        try:
            tokens = sample(logits, [s.params for s in seqs], [s.sampler for s in seqs]).tolist()  # one read back
        except Exception:  # find the request that fails (e.g. a device error in one row): fail it, not its batch
            tokens = []
            for seq, row in zip(seqs, logits, strict=True):
                try:
                    tokens.append(int(sample(row[None], [seq.params], [seq.sampler])[0]))
                except Exception as exc:
                    self._fail([seq], exc)
                    tokens.append(None)
        for seq, token, row_logprobs in zip(seqs, tokens, logprobs, strict=True):
            if token is not None:
                self._emit_token(seq, token, row_logprobs)
        self._keep([s for s in self._rows if not s.handle.finished])

    def _emit_token(self, seq: _Sequence, token: int, row_logprobs: torch.Tensor | None) -> None:
        p = seq.params
        if token == INVALID:
            self._fail([seq], FloatingPointError("the sampling distribution is nan / inf (penalties overflowed?)"))
            return
        seq.generated.append(token)
        seq.sampler.record(token)
        if token in p.stop_token_ids and not p.ignore_eos:
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
        """Shrink the running batch to `rows` (a subsequence of the current rows); the others' slots are free."""
        if len(rows) == len(self._rows):
            return
        kept = {id(s) for s in rows}
        for seq in self._rows:
            if id(seq) not in kept:
                self._slots[seq.slot] = None
                self._kept[seq.slot] = seq.tokens(0, seq.cached) if self.prefix_cache else []
                self._frees += 1
                self._freed_at[seq.slot] = self._frees
        self._rows = rows  # the cache keeps its memory: the engine thread releases it after idle_release_s

    def _cancel_rows(self) -> None:
        for seq in self._rows:
            if not seq.handle.finished:
                self._finish(seq, self._stop_reason)
        self._reset_batch()

    def _reset_batch(self) -> None:
        self._rows, self._slots = [], [None] * self.max_batch_size
        self._release_cache()


__all__ = ["Engine", "FinishEvent", "PromptTooLongError", "QueueFullError", "RequestHandle", "SamplingParams",
           "TokenEvent"]
