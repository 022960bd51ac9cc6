"""The OpenAI-compatible HTTP API (FastAPI) in front of the batched engine; openai_api.py only wires it up.

One request flows:  JSON body → pydantic model (qwen.protocol) → tools and messages folded into the ReAct /
ChatML prompt (qwen.react, qwen_generation_utils) → Engine.submit() per choice → token events →
incremental detokenizer → stop strings cut (held back while they may be starting) → ReAct parser when tools
are on → one JSON response, or server-sent events.

The engine runs on its own thread, and the CPU-heavy part of a request (JSON parsing and validation, prompt
building, tokenization) runs on worker threads, so no request blocks the event loop: /health and every stream
keep answering. A client that goes away cancels its requests (the stream's `finally`, or a disconnect watcher
for non-streamed calls), which frees their slots.
Errors use the OpenAI error body: a client mistake is a 4xx naming the field; a 500 never shows internal
details (they go to the log). Auth (Bearer key and/or Basic user:pass) is checked per route, inside CORS, so
browser preflights (OPTIONS) are answered without credentials; cross-origin access is off unless origins are
listed. On SIGTERM (serve()) the server admits nothing new, gives running requests a grace period, then stops
them with an error event that says so.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hmac
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_generation_utils import encode_plain, make_continuation_context

from . import protocol as api
from . import react
from .chat_backend import ChatBackend, GenerationError, ServerShutdownError, chat_engine
from .engine import (
    Engine,
    EngineStoppedError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    TokenEvent,
)

logger = logging.getLogger(__name__)

# HTTP status → OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
# Limits of one request (openai_api.py's --max-request-bytes / --max-messages) and of JSON nesting: a
# request's JSON is walked, so its depth is bounded (a tool's parameter schema needs a handful of levels).
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
DEFAULT_MAX_MESSAGES = 100_000
MAX_JSON_DEPTH = 64
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds running requests get to finish after SIGTERM (--shutdown-timeout)
RETRY_AFTER_SECONDS = "1"  # sent with 429 and 503
AUTH_REALM = "Qwen API"
# what a 500 says; the exception itself is logged, never sent (it may name files, tensors, settings)
INTERNAL_ERROR = "internal server error; the server log has the details"
GENERATION_FAILED = "the model failed while generating this answer (the server log has the details); retry"
# how a tool call is reported: `tools` requests get tool_calls, legacy `functions` requests get function_call
CALL_FINISH_REASONS = {False: "tool_calls", True: "function_call"}


class APIError(Exception):
    """An error answered with the OpenAI error body and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        if status in (429, 503):
            self.headers.setdefault("Retry-After", RETRY_AFTER_SECONDS)

    def response(self) -> JSONResponse:
        body = api.ErrorResponse.of(self.message, ERROR_TYPES.get(self.status, "invalid_request_error"),
                                    self.param, self.code)
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers or None)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice number `choice`: seed + choice, so n choices differ reproducibly; wrapped into the
    64-bit range torch.Generator takes, so seed 2**64 - 1 with n = 2 is fine too."""
    if seed is None or choice == 0:
        return seed
    return (seed + choice) % 2**64


# ----------------------------------------------------------------------------------------- generation


@dataclass
class ChatPlan:
    """What a chat request turned into: prompt ids, sampling per choice, and how to read the output."""

    prompt_ids: list[int]
    params: list[SamplingParams]
    stops: list[str]
    react: bool  # output is ReAct text: parse tool calls
    in_thought: bool  # the prompt ends in "Thought:" (continuing after a tool result)
    legacy_functions: bool  # the request used `functions`: answer with function_call


async def _merge(streams: Sequence[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come, tagged with the iterator's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((index, exc))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _cancel_on_disconnect(request: Request, handles) -> None:
    """Cancel `handles` when the client of a non-streamed request goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for handle in handles:
                handle.cancel()
            return


async def _answer_unless_disconnected(request: Request, handles, response: Awaitable[dict]) -> dict:
    """Await a non-streamed response; the requests are cancelled if the client goes away, and always at the end."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
    try:
        return await response
    finally:
        watcher.cancel()
        for handle in handles:
            handle.cancel()


class OpenAIServer(ChatBackend):
    """The serving logic: turns validated requests into engine requests and engine events into API objects."""

    def __init__(self, model, tokenizer, engine: Engine, model_names: Sequence[str], *,
                 accept_any_model: bool = False, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT):
        super().__init__(model, tokenizer, engine)
        self.model_names = list(model_names)
        self.accept_any_model = accept_any_model
        self.shutdown_timeout = shutdown_timeout
        self.stopping = False
        self._token_texts: dict[int, tuple[str, list[int]]] = {}
        # Prompt building and tokenization run here, off the event loop, one request at a time (tokenizers
        # are not all safe to share between threads).
        self.prepare_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qwen-prepare")

    async def prepare(self, fn, *args):
        """Run the CPU-heavy `fn(*args)` on the preparation thread; the event loop goes on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.prepare_pool, fn, *args)

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
                                stop_token_ids: Sequence[int], logprobs: bool = False,
                                top_logprobs: int = 0) -> SamplingParams:
        """SamplingParams of choice number `choice`: request fields, else the checkpoint's generation_config."""
        try:
            return request.to_sampling_params(
                self.generation_config, max_new_tokens=max_new_tokens, seed=choice_seed(request.seed, choice),
                stop_token_ids=stop_token_ids, logprobs=logprobs, top_logprobs=top_logprobs,
            )
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    # ---- chat

    def plan_chat(self, request: api.ChatCompletionRequest) -> ChatPlan:
        legacy = request.functions is not None
        try:
            functions = react.normalize_tools(
                [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None,
                request.functions,
            )
            choice = request.function_call if legacy else request.tool_choice
            if hasattr(choice, "model_dump"):
                choice = choice.model_dump()
            tools = react.select_tools(functions, choice)
            query, history, system = react.parse_messages(request.messages, tools)
        except react.ReActError as exc:
            raise APIError(400, str(exc)) from exc
        continuing = query is react.TEXT_COMPLETION
        if continuing and self.chat_format != "chatml":
            raise APIError(400, "continuing after a tool result needs a chat model (chat_format chatml)")
        if continuing:
            _, prompt_ids = make_continuation_context(self.tokenizer, history, system, self.max_window_size)
        else:
            prompt_ids = self.chat_prompt(query, history, system)
        use_react = bool(tools) or continuing
        stops = request.stop_list() + self.chat_stop_texts + react.stop_words_for(use_react)  # truthy: ReAct output
        params = [
            self.request_sampling_params(request, request.max_new_tokens, i, self.stop_token_ids,
                                 request.logprobs, request.top_logprobs or 0)
            for i in range(request.n)
        ]
        return ChatPlan(prompt_ids, params, stops, use_react, continuing, legacy)

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

    async def chat_events(self, handle, plan: ChatPlan) -> AsyncIterator[dict]:
        """One choice of a chat completion as delta dicts: {"content"}, {"tool_call"} and a final {"finish"}."""
        parser = react.ReActStreamParser(in_thought=plan.in_thought) if plan.react else None
        called = False
        async for piece in self.pieces(handle, plan.stops):
            logprobs = self.chat_logprobs(piece.tokens) if handle.params.logprobs else None
            if parser is None:
                events = [react.ContentDelta(piece.text)] if piece.text else []
            else:
                events = parser.feed(piece.text) + (parser.finish() if piece.finish_reason else [])
                if parser.done and not piece.finish_reason:
                    handle.cancel()  # past the answer: the model started a new step
            content = "".join(e.text for e in events if isinstance(e, react.ContentDelta))
            if content or logprobs:
                yield {"content": content, "logprobs": logprobs}
            for event in events:
                if isinstance(event, react.ToolCallEvent):
                    called = True
                    yield {"tool_call": api.FunctionCall(name=event.name, arguments=event.arguments)}
            if piece.finish_reason:
                reason = piece.finish_reason
                if called and reason == "stop":
                    reason = CALL_FINISH_REASONS[plan.legacy_functions]
                yield {"finish": reason, "usage": (piece.prompt_tokens, piece.completion_tokens)}

    def chat_logprobs(self, tokens: list[TokenEvent]) -> list[dict]:
        entries = []
        for event in tokens:
            text, data = self.token_text(event.token_id)
            top = [
                {"token": t, "logprob": lp, "bytes": b}
                for t, b, lp in ((*self.token_text(i), lp) for i, lp in event.top_logprobs or [])
            ]
            entries.append({"token": text, "logprob": event.logprob, "bytes": data, "top_logprobs": top})
        return entries

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and UTF-8 bytes (a piece of a character shows as U+FFFD; its bytes stay exact)."""
        if token_id not in self._token_texts:
            if hasattr(self.tokenizer, "decode_bytes"):  # QWenTokenizer: exact bytes per token
                data = self.tokenizer.decode_bytes([token_id])
            else:
                data = self.tokenizer.decode([token_id]).encode("utf-8")
            self._token_texts[token_id] = (data.decode("utf-8", errors="replace"), list(data))
        return self._token_texts[token_id]

    async def chat_completion(self, request: api.ChatCompletionRequest, http_request: Request):
        self.check_model(request.model)
        self.check_fits(request.n, "n")
        plan = await self.prepare(self.plan_chat, request)
        handles = self.submit(plan.prompt_ids, plan.params)
        streams = [self.chat_events(h, plan) for h in handles]
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            chunks = self.chat_chunks(streams, request.model, len(plan.prompt_ids), include_usage, plan)
            return _event_stream(chunks, handles)
        response = self.chat_response(streams, request.model, len(plan.prompt_ids), plan)
        return await _answer_unless_disconnected(http_request, handles, response)

    async def chat_response(self, streams, model: str, prompt_tokens: int, plan: ChatPlan) -> dict:
        n = len(streams)
        content = [""] * n
        calls: list[list[api.FunctionCall]] = [[] for _ in range(n)]
        logprobs: list[list[dict]] = [[] for _ in range(n)]
        finish = [None] * n
        completion_tokens = 0
        async for i, delta in _merge(streams):
            content[i] += delta.get("content") or ""
            logprobs[i] += delta.get("logprobs") or []
            if "tool_call" in delta:
                calls[i].append(delta["tool_call"])
            if "finish" in delta:
                finish[i] = delta["finish"]
                completion_tokens += delta["usage"][1]
        choices = []
        for i in range(n):
            message = api.ChatCompletionMessage(content=content[i] or (None if calls[i] else ""))
            if calls[i] and plan.legacy_functions:
                message.function_call = calls[i][0]
            elif calls[i]:
                message.tool_calls = [api.ToolCall(function=call) for call in calls[i]]
            choice_logprobs = api.ChoiceLogprobs(content=logprobs[i]) if plan.params[i].logprobs else None
            choices.append(api.ChatCompletionChoice(index=i, message=message, finish_reason=finish[i],
                                                    logprobs=choice_logprobs))
        usage = api.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        body = api.ChatCompletionResponse(model=model, choices=choices, usage=usage).model_dump(exclude_none=True)
        for choice in body["choices"]:
            choice["message"].setdefault("content", None)  # OpenAI sends null content beside tool calls
        return body

    async def chat_chunks(self, streams, model: str, prompt_tokens: int, include_usage: bool,
                          plan: ChatPlan) -> AsyncIterator[dict]:
        chunk_id = api.chat_completion_id()
        usage = None if not include_usage else api.Usage(prompt_tokens=prompt_tokens)
        call_counts = [0] * len(streams)

        def chunk(index: int, delta: api.DeltaMessage, **fields) -> dict:
            choice = api.ChatCompletionChunkChoice(index=index, delta=delta, **fields)
            body = api.ChatCompletionChunk(id=chunk_id, model=model, choices=[choice]).model_dump(exclude_none=True)
            body["choices"][0].setdefault("finish_reason", None)
            return body

        for i in range(len(streams)):
            yield chunk(i, api.DeltaMessage(role="assistant", content=""))
        async for i, delta in _merge(streams):
            if delta.get("content") or delta.get("logprobs"):
                logprobs = api.ChoiceLogprobs(content=delta["logprobs"]) if delta.get("logprobs") else None
                yield chunk(i, api.DeltaMessage(content=delta["content"]), logprobs=logprobs)
            if "tool_call" in delta:
                call = delta["tool_call"]
                function = api.DeltaFunctionCall(name=call.name, arguments=call.arguments)
                if plan.legacy_functions:
                    yield chunk(i, api.DeltaMessage(function_call=function))
                else:
                    tool_call = api.DeltaToolCall(index=call_counts[i], id=api.tool_call_id(), type="function",
                                                  function=function)
                    call_counts[i] += 1
                    yield chunk(i, api.DeltaMessage(tool_calls=[tool_call]))
            if "finish" in delta:
                yield chunk(i, api.DeltaMessage(), finish_reason=delta["finish"])
                if usage is not None:
                    usage.completion_tokens += delta["usage"][1]
        if usage is not None:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield api.ChatCompletionChunk(id=chunk_id, model=model, choices=[], usage=usage).model_dump(
                exclude_none=True
            )

    # ---- text completions

    def encode_prompt(self, text: str, allow_special_tokens: bool) -> list[int]:
        if allow_special_tokens:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return encode_plain(self.tokenizer, text)

    async def completion(self, request: api.CompletionRequest, http_request: Request):
        self.check_model(request.model)
        prompts = request.prompt_list()
        self.check_fits(request.n * len(prompts), "n × prompts" if len(prompts) > 1 else "n")
        encoded = await self.prepare(lambda: [self.encode_prompt(p, request.allow_special_tokens) for p in prompts])
        want_logprobs = request.logprobs is not None
        params = [
            self.request_sampling_params(request, request.max_tokens, j, self.stop_token_ids, want_logprobs,
                                         request.logprobs or 0)
            for j in range(request.n)
        ]
        handles = []
        try:
            for ids in encoded:
                handles += self.submit(ids, params)
        except APIError:
            for handle in handles:
                handle.cancel()
            raise
        stops = request.stop_list()
        streams = [self.pieces(h, stops) for h in handles]
        echoes = [prompts[k // request.n] if request.echo else "" for k in range(len(handles))]
        prompt_tokens = sum(len(ids) for ids in encoded)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            chunks = self.completion_chunks(streams, echoes, request.model, prompt_tokens, include_usage,
                                            want_logprobs)
            return _event_stream(chunks, handles)
        response = self.completion_response(streams, echoes, request.model, prompt_tokens, want_logprobs)
        return await _answer_unless_disconnected(http_request, handles, response)

    def completion_logprobs(self, tokens: list[TokenEvent], offset: int) -> api.CompletionLogprobs:
        result = api.CompletionLogprobs()
        for event in tokens:
            text = self.token_text(event.token_id)[0]
            result.tokens.append(text)
            result.token_logprobs.append(event.logprob)
            result.top_logprobs.append({self.token_text(i)[0]: lp for i, lp in event.top_logprobs or []} or None)
            result.text_offset.append(offset)
            offset += len(text)
        return result

    async def completion_response(self, streams, echoes, model, prompt_tokens, want_logprobs) -> dict:
        texts = list(echoes)
        tokens: list[list[TokenEvent]] = [[] for _ in streams]
        finish = [None] * len(streams)
        completion_tokens = 0
        async for i, piece in _merge(streams):
            texts[i] += piece.text
            tokens[i] += piece.tokens
            if piece.finish_reason:
                finish[i] = piece.finish_reason
                completion_tokens += piece.completion_tokens
        choices = [
            api.CompletionChoice(
                index=i, text=texts[i], finish_reason=finish[i],
                logprobs=self.completion_logprobs(tokens[i], len(echoes[i])) if want_logprobs else None,
            )
            for i in range(len(streams))
        ]
        usage = api.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        return api.CompletionResponse(model=model, choices=choices, usage=usage).model_dump(exclude_none=True)

    async def completion_chunks(self, streams, echoes, model, prompt_tokens, include_usage,
                                want_logprobs) -> AsyncIterator[dict]:
        chunk_id = api.completion_id()
        offsets = [len(e) for e in echoes]
        usage = None if not include_usage else api.Usage(prompt_tokens=prompt_tokens)

        def chunk(index: int, text: str, **fields) -> dict:
            choice = api.CompletionChoice(index=index, text=text, **fields)
            body = api.CompletionChunk(id=chunk_id, model=model, choices=[choice]).model_dump(exclude_none=True)
            body["choices"][0].setdefault("finish_reason", None)
            return body

        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo)
        async for i, piece in _merge(streams):
            logprobs = self.completion_logprobs(piece.tokens, offsets[i]) if want_logprobs else None
            offsets[i] += len(piece.text)
            if piece.text or piece.finish_reason:
                yield chunk(i, piece.text, logprobs=logprobs, finish_reason=piece.finish_reason)
            if piece.finish_reason and usage is not None:
                usage.completion_tokens += piece.completion_tokens
        if usage is not None:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield api.CompletionChunk(id=chunk_id, model=model, choices=[], usage=usage).model_dump(exclude_none=True)


def _error_for(exc: Exception) -> APIError:
    """The APIError to answer `exc` with; internal failures are logged and answered without their details."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ServerShutdownError):
        return APIError(503, str(exc), code="server_shutdown")
    if isinstance(exc, GenerationError):
        logger.error("%s", exc)
        return APIError(500, GENERATION_FAILED)
    logger.error("unexpected error while answering", exc_info=exc)
    return APIError(500, INTERNAL_ERROR)


def _event_stream(chunks: AsyncIterator[dict], handles) -> StreamingResponse:
    """Server-sent events of `chunks`, then [DONE]; an error mid-stream becomes an error event."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except Exception as exc:  # whatever failed, the client gets an error event and [DONE]
            error = _error_for(exc)
            body = api.ErrorResponse.of(error.message, ERROR_TYPES.get(error.status, "server_error"),
                                        error.param, error.code)
            yield f"data: {json.dumps(body.model_dump(), ensure_ascii=False)}\n\n"
        finally:  # also when the client disconnected and the task is cancelled: free the slots
            for handle in handles:
                handle.cancel()
            with contextlib.suppress(Exception):
                await chunks.aclose()
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


# ------------------------------------------------------------------------------------------------ auth


def basic_credentials(header: str) -> str | None:
    """'user:pass' from an 'Authorization: Basic ...' header value, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def bearer_token(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def make_auth_check(api_key: str | None, api_auth: str | None):
    """A route dependency accepting `Authorization: Bearer <api_key>` and/or `Basic <user:pass>`."""
    # header reader → the secret it must match; compared in constant time
    accepted = [(read, secret) for read, secret in ((bearer_token, api_key), (basic_credentials, api_auth))
                if secret is not None]
    challenges = ", ".join(
        f'Bearer realm="{AUTH_REALM}"' if read is bearer_token else f'Basic realm="{AUTH_REALM}", charset="UTF-8"'
        for read, _ in accepted
    )

    async def check(request: Request) -> None:
        if not accepted:
            return
        header = request.headers.get("authorization", "")
        matches = [hmac.compare_digest((read(header) or "").encode(), secret.encode()) for read, secret in accepted]
        if not any(matches):
            kinds = " or ".join(("an 'Authorization: Bearer <key>' header" if read is bearer_token else
                                 "HTTP Basic credentials") for read, _ in accepted)
            raise APIError(401, f"invalid or missing credentials: this server needs {kinds}",
                           code="invalid_api_key", headers={"WWW-Authenticate": challenges})

    return check


def check_secrets(api_key: str | None, api_auth: str | None) -> None:
    """Refuse settings that would silently weaken auth: an empty key, or a Basic login without user/password."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty, which would turn authentication off; give a key, or none at all")
    if api_auth is not None:
        user, colon, password = api_auth.partition(":")
        if not colon or not user or not password:
            raise ValueError("the Basic login must be USER:PASSWORD with neither part empty")


# ------------------------------------------------------------------------------------------- requests


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is larger than `max_bytes`."""
    too_large = APIError(413, f"the request body is larger than this server's limit of {max_bytes:,} bytes "
                              "(--max-request-bytes); send less, e.g. a shorter history", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_json(data) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH and text with unpaired UTF-16 surrogates ("\\ud800", which
    JavaScript strings can hold but UTF-8 cannot encode), naming where; iterative, so any depth is safe."""
    stack = [(data, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep", param=where)
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise APIError(400, f"{where or 'body'}: the text has an unpaired UTF-16 surrogate (e.g. "
                                        "\\ud800), which is not valid Unicode; send well-formed text",
                                   param=where or None) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, where, depth))
                stack.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))


def parse_request(body: bytes, model_class, max_messages: int = DEFAULT_MAX_MESSAGES):
    """A request body → a validated `model_class`; raises APIError(400) naming what is wrong."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, f"the request body nests JSON too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:  # also bytes that are not UTF-8
        raise APIError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    _check_json(data)
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise APIError(400, f"messages: {len(messages):,} messages, more than this server's limit of "
                            f"{max_messages:,} (--max-messages)", param="messages")
    try:
        return model_class.model_validate(data)
    except ValidationError as exc:
        message = api.format_validation_error(exc)
        raise APIError(400, message, param=message.split(":", 1)[0] if ":" in message else None) from None


class _InternalErrors:
    """ASGI middleware: an exception no handler took becomes a generic 500 (details only in the log).

    Starlette's own last-resort handler re-raises after answering, and uvicorn then drops the connection, so a
    client reusing it (keep-alive) would get ECONNRESET on its next request; here the exception ends with the
    response and the connection stays usable.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            logger.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            if started:  # half a response was sent: only closing the connection can tell the client
                raise
            await APIError(500, INTERNAL_ERROR).response()(scope, receive, send)


# ------------------------------------------------------------------------------------------------- app

# What /openapi.json documents for the two generation routes: request body and responses, so clients and
# fuzzers can use it (the routes read their bodies themselves, so FastAPI would not see them).
_ROUTE_MODELS = {
    "/v1/chat/completions": (api.ChatCompletionRequest, api.ChatCompletionResponse),
    "/v1/completions": (api.CompletionRequest, api.CompletionResponse),
}
_ERROR_RESPONSES = {
    status: {"model": api.ErrorResponse, "description": description}
    for status, description in {
        400: "invalid request (the message names the field)",
        401: "missing or wrong credentials",
        404: "unknown model",
        413: "request body too large",
        429: "the server is busy; retry after Retry-After seconds",
        500: "internal error",
        503: "the server is shutting down",
    }.items()
}


def _openapi_schema(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m, _ in _ROUTE_MODELS.values()],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        for path, (request_model, _) in _ROUTE_MODELS.items():
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request_model.__name__}"}}},
            }
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(model, tokenizer, *, model_names: Sequence[str] = ("qwen",), api_key: str | None = None,
               api_auth: str | None = None, max_batch_size: int = 8, max_queue: int = 64,
               max_context: int | None = None, allowed_origins: Sequence[str] = (),
               allow_credentials: bool = False, accept_any_model: bool = False,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_messages: int = DEFAULT_MAX_MESSAGES,
               shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT, engine: Engine | None = None,
               threads: int | None = None) -> FastAPI:
    """The FastAPI app serving `model`; its engine thread runs while the app does (lifespan).

    api_key: accept `Authorization: Bearer <api_key>`; api_auth: accept HTTP Basic "user:pass". With neither,
    no auth; an empty one is refused (ValueError). allowed_origins: web origins whose pages may call the API
    (CORS; none by default, "*" for any), with cookies / HTTP auth only if allow_credentials (not with "*").
    accept_any_model: answer whatever `model` a request names (else 404 for names not in model_names).
    max_context defaults to the model's max_position_embeddings (or seq_length). threads: the engine thread's
    compute threads (openai_api.py: --threads).
    """
    check_secrets(api_key, api_auth)
    if allow_credentials and "*" in allowed_origins:
        raise ValueError("credentials cannot be allowed for any origin ('*'); list the origins that may use them")
    engine = engine or chat_engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                                   max_context=max_context, threads=threads)
    server = OpenAIServer(model, tokenizer, engine, model_names, accept_any_model=accept_any_model,
                          shutdown_timeout=shutdown_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown(timeout=10, reason="shutdown")
            server.prepare_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Qwen OpenAI-compatible API", lifespan=lifespan, separate_input_output_schemas=False)
    app.state.server = server
    app.openapi = lambda: _openapi_schema(app)

    async def read(request: Request, model_class):
        body = await _read_body(request, max_request_bytes)
        return await asyncio.to_thread(parse_request, body, model_class, max_messages)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, exc: GenerationError):
        return _error_for(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404 / 405 of routing; 405 has Allow
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.get("/health")
    async def health():
        body = {"status": "stopping" if server.stopping else "ok", "running": engine.num_running,
                "waiting": engine.num_waiting}
        return JSONResponse(body, status_code=503 if server.stopping else 200)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(make_auth_check(api_key, api_auth))],
                   responses={401: _ERROR_RESPONSES[401]})

    @v1.get("/models", response_model=api.ModelList)
    async def list_models():
        return api.ModelList(data=[api.ModelCard(id=name) for name in server.model_names]).model_dump()

    @v1.get("/models/{name:path}", response_model=api.ModelCard, responses={404: _ERROR_RESPONSES[404]})
    async def get_model(name: str):
        server.check_model(name)
        return api.ModelCard(id=name).model_dump()

    def responses(response_model) -> dict:
        ok = {"description": "the answer; with stream=true, server-sent events of chunks ending in [DONE]",
              "model": response_model, "content": {"text/event-stream": {}}}
        return {200: ok, **_ERROR_RESPONSES}

    @v1.post("/chat/completions", response_model=None, responses=responses(api.ChatCompletionResponse))
    async def chat_completions(request: Request):
        return await server.chat_completion(await read(request, api.ChatCompletionRequest), request)

    @v1.post("/completions", response_model=None, responses=responses(api.CompletionResponse))
    async def completions(request: Request):
        return await server.completion(await read(request, api.CompletionRequest), request)

    app.include_router(v1)
    app.add_middleware(_InternalErrors)
    # added last, so it wraps everything: preflights are answered before auth, and errors carry CORS headers
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_credentials=allow_credentials,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn with openai_api.py's shutdown: at SIGTERM / Ctrl-C admit nothing new (503) at once, give running
    requests the app's shutdown_timeout to finish, then stop them (streams end with an error event saying so,
    then [DONE]), and exit normally. A second Ctrl-C quits without waiting."""

    def __init__(self, config: uvicorn.Config, openai_server: OpenAIServer):
        super().__init__(config)
        self.openai_server = openai_server

    def handle_exit(self, sig, frame) -> None:  # runs in the signal handler: only set flags
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True  # not re-raised at exit, unlike uvicorn's own: the process exits with 0

    async def shutdown(self, sockets=None) -> None:
        self.openai_server.begin_shutdown()
        await super().shutdown(sockets)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run `app` (from create_app) with uvicorn until SIGTERM / Ctrl-C; see GracefulServer."""
    server = app.state.server
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=server.shutdown_timeout + 15)  # a backstop
    GracefulServer(config, server).run()


__all__ = ["APIError", "GracefulServer", "OpenAIServer", "create_app", "make_auth_check", "parse_request", "serve"]
