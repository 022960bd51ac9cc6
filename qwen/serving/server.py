"""What the chat and completion routes share: the backend (model, tokenizer, engine), the served model names,
admission to the engine (all choices or none) and the shutdown that stops admitting."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import queue
import threading
from collections.abc import Sequence

from .. import protocol as api
from ..chat_backend import ChatBackend
from ..engine import EngineStoppedError, PromptTooLongError, QueueFullError
from ..sampling import SamplingParams
from ..token_bounds import min_tokens
from .http import APIError, logger

DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds running requests get to finish after SIGTERM (--shutdown-timeout)


# The size of the request being handled (its body's bytes): the preparation lane's priority, set by the route.
REQUEST_COST: contextvars.ContextVar[int] = contextvars.ContextVar("qwen_request_cost", default=0)


class PreparationLane:
    """One thread running the CPU-heavy part of requests (JSON parsing, prompt building, tokenization), the
    smallest request first: a chat of a few lines waits for at most the one big request being worked on, not
    for every big request queued before it (behind four 8 MB requests a short chat waited 40 s). One thread,
    because tokenizers are not all safe to share between threads, and because json.loads holds the GIL: with
    one parse at a time the event loop (/health, streams) runs between them."""

    def __init__(self):
        self.jobs: queue.PriorityQueue = queue.PriorityQueue()
        self.order = itertools.count()  # FIFO among equal costs
        self.thread = threading.Thread(target=self._work, name="qwen-prepare", daemon=True)
        self.thread.start()

    async def run(self, cost: int, fn, *args):
        """`fn(*args)` on the lane's thread, queued by `cost` (smaller first); the event loop goes on meanwhile."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((cost, next(self.order), fn, args, loop, future))
        return await future

    def close(self) -> None:
        self.jobs.put((float("inf"), -1, None, (), None, None))

    def _work(self) -> None:
        while True:
            _, _, fn, args, loop, future = self.jobs.get()
            if fn is None:
                return
            if future.cancelled():  # its client went away while it waited
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting request
                result, error = None, exc
            loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice number `choice`: seed + choice, so n choices differ reproducibly; wrapped into the
    64-bit range torch.Generator takes, so seed 2**64 - 1 with n = 2 is fine too."""
    if seed is None or choice == 0:
        return seed
    return (seed + choice) % 2**64


class OpenAIServer:
    """The state both routes share: a ChatBackend, the model names served, and whether the server is stopping."""

    def __init__(self, backend: ChatBackend, model_names: Sequence[str], *, accept_any_model: bool = False,
                 shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT):
        self.backend = backend
        self.engine = backend.engine
        self.model_names = list(model_names)
        self.accept_any_model = accept_any_model
        self.shutdown_timeout = shutdown_timeout
        self.stopping = False
        self._token_texts: dict[int, tuple[str, list[int]]] = {}
        self.prepare_lane = PreparationLane()

    async def prepare(self, fn, *args):
        """Run the CPU-heavy `fn(*args)` on the preparation lane, queued by this request's size (REQUEST_COST)."""
        return await self.prepare_lane.run(REQUEST_COST.get(), fn, *args)

    def check_text_fits(self, text: str, param: str) -> None:
        """400 before any tokenizing when `text` alone needs more tokens than the context holds: the bound on its
        tokens (token_bounds) costs microseconds, tokenizing it seconds (an 8 MB text got its 400 after 11-43 s)."""
        if self.engine.max_context is None:
            return
        needed = min_tokens(self.backend.tokenizer, text)
        if needed >= self.engine.max_context:
            raise APIError(400, f"{param}: this text is at least {needed:,} tokens, more than this model's context "
                                f"of {self.engine.max_context:,} tokens; send less",
                           param=param, code="context_length_exceeded")

    def check_model(self, name: str) -> None:
        if not self.accept_any_model and name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server has: {', '.join(self.model_names)}",
                           param="model", code="model_not_found")

    def check_fits(self, generations: int, param: str) -> None:
        """A request needing more generations than the queue can ever hold gets a 400, not a 'busy' 429."""
        if generations > self.engine.max_queue:
            raise APIError(
                400, f"this request needs {generations} generations at once ({param}), but the server holds at "
                f"most {self.engine.max_queue} (its --max-queue); ask for fewer", param=param)

    def begin_shutdown(self) -> None:
        """Stop admitting requests now (503); after shutdown_timeout seconds stop those still running."""
        if self.stopping:
            return
        self.stopping = True
        self.engine.drain()
        logger.info("shutting down: no new requests; running ones get %.0f s to finish", self.shutdown_timeout)
        timer = threading.Timer(self.shutdown_timeout, self.engine.shutdown, kwargs={"reason": "shutdown"})
        timer.daemon = True
        timer.start()

    def request_sampling_params(self, request: api._SamplingRequest, max_new_tokens: int | None, choice: int,
                                logprobs: bool = False, top_logprobs: int = 0) -> SamplingParams:
        """SamplingParams of choice number `choice`: request fields, else the checkpoint's generation_config."""
        try:
            return request.to_sampling_params(
                self.backend.generation_config, max_new_tokens=max_new_tokens, seed=choice_seed(request.seed, choice),
                stop_token_ids=self.backend.stop_token_ids, logprobs=logprobs, top_logprobs=top_logprobs,
            )
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    def submit(self, prompt_ids: list[int], params: Sequence[SamplingParams]) -> list:
        """One engine request per choice; all or none (429 / 400 cancel the ones already queued)."""
        handles = []
        try:
            for p in params:
                handles.append(self.engine.submit(prompt_ids, p))
        except QueueFullError as exc:
            raise APIError(429, str(exc), code="rate_limit_exceeded") from exc
        except EngineStoppedError as exc:
            raise APIError(503, str(exc)) from exc
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from exc
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        finally:
            if len(handles) < len(params):
                for handle in handles:
                    handle.cancel()
        return handles

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and UTF-8 bytes (a piece of a character shows as U+FFFD; its bytes stay exact)."""
        if token_id not in self._token_texts:
            tokenizer = self.backend.tokenizer
            if hasattr(tokenizer, "decode_bytes"):  # QWenTokenizer: exact bytes per token
                data = tokenizer.decode_bytes([token_id])
            else:
                data = tokenizer.decode([token_id]).encode("utf-8")
            self._token_texts[token_id] = (data.decode("utf-8", errors="replace"), list(data))
        return self._token_texts[token_id]
