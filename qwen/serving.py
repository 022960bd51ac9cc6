"""The OpenAI-compatible HTTP API (FastAPI) in front of the batched engine; openai_api.py only wires it up.

One request flows:  JSON body → pydantic model (qwen.protocol) → tools and messages folded into the ReAct /
ChatML prompt (qwen.react, qwen_generation_utils) → Engine.submit() per choice → token events →
incremental detokenizer → stop strings cut (held back while they may be starting) → ReAct parser when tools
are on → one JSON response, or server-sent events.

The engine runs on its own thread, so generation never blocks the event loop; a client that goes away cancels
its requests (the stream's `finally`, or a disconnect watcher for non-streamed calls), which frees their slots.
Errors use the OpenAI error body; auth (Bearer key and/or Basic user:pass) is checked per route, inside CORS,
so browser preflights (OPTIONS) are answered without credentials.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_generation_utils import encode_plain, make_continuation_context

from . import protocol as api
from . import react
from .chat_backend import ChatBackend, GenerationError
from .engine import (
    Engine,
    EngineStoppedError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    TokenEvent,
    model_context_length,
)

logger = logging.getLogger(__name__)

# HTTP status → OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
# how a tool call is reported: `tools` requests get tool_calls, legacy `functions` requests get function_call
CALL_FINISH_REASONS = {False: "tool_calls", True: "function_call"}


class APIError(Exception):
    """An error answered with the OpenAI error body and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        body = api.ErrorResponse.of(self.message, ERROR_TYPES.get(self.status, "invalid_request_error"),
                                    self.param, self.code)
        headers = {"WWW-Authenticate": "Basic, Bearer"} if self.status == 401 else None
        return JSONResponse(body.model_dump(), status_code=self.status, headers=headers)


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

    def __init__(self, model, tokenizer, engine: Engine, model_names: Sequence[str]):
        super().__init__(model, tokenizer, engine)
        self.model_names = list(model_names)
        self._token_texts: dict[int, tuple[str, list[int]]] = {}

    def request_sampling_params(self, request: api._SamplingRequest, max_new_tokens: int | None, choice: int,
                                stop_token_ids: Sequence[int], logprobs: bool = False,
                                top_logprobs: int = 0) -> SamplingParams:
        """SamplingParams of choice number `choice`: request fields, else the checkpoint's generation_config."""
        try:
            return self.sampling_params(
                max_new_tokens=max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                repetition_penalty=request.repetition_penalty,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                seed=None if request.seed is None else request.seed + choice,  # n choices differ, reproducibly
                stop_token_ids=stop_token_ids,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
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
        plan = self.plan_chat(request)
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
        prompts = request.prompt_list()
        encoded = [self.encode_prompt(p, request.allow_special_tokens) for p in prompts]
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


def _event_stream(chunks: AsyncIterator[dict], handles) -> StreamingResponse:
    """Server-sent events of `chunks`, then [DONE]; an error mid-stream becomes an error event."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except (APIError, GenerationError) as exc:
            if isinstance(exc, GenerationError):
                exc = APIError(500, str(exc))
            error = api.ErrorResponse.of(exc.message, ERROR_TYPES.get(exc.status, "server_error"))
            yield f"data: {json.dumps(error.model_dump(), ensure_ascii=False)}\n\n"
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
    accepted = [(read, secret) for read, secret in ((bearer_token, api_key), (basic_credentials, api_auth)) if secret]

    async def check(request: Request) -> None:
        if not accepted:
            return
        header = request.headers.get("authorization", "")
        matches = [hmac.compare_digest((read(header) or "").encode(), secret.encode()) for read, secret in accepted]
        if not any(matches):
            kinds = " or ".join(("an 'Authorization: Bearer <key>' header" if read is bearer_token else
                                 "HTTP Basic credentials") for read, _ in accepted)
            raise APIError(401, f"invalid or missing credentials: this server needs {kinds}",
                           code="invalid_api_key")

    return check


# ------------------------------------------------------------------------------------------------- app


async def _validated(request: Request, model_class):
    body = await request.body()
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from exc
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model_class.model_validate(data)
    except ValidationError as exc:
        message = api.format_validation_error(exc)
        raise APIError(400, message, param=message.split(":", 1)[0] if ":" in message else None) from exc


def create_app(model, tokenizer, *, model_names: Sequence[str] = ("qwen",), api_key: str | None = None,
               api_auth: str | None = None, max_batch_size: int = 8, max_queue: int = 64,
               max_context: int | None = None, cors_origins: Sequence[str] = ("*",),
               engine: Engine | None = None) -> FastAPI:
    """The FastAPI app serving `model`; its engine thread runs while the app does (lifespan).

    api_key: accept `Authorization: Bearer <api_key>`; api_auth: accept HTTP Basic "user:pass". With neither,
    no auth. max_context defaults to the model's max_position_embeddings (or seq_length).
    """
    if api_auth is not None and ":" not in api_auth:
        raise ValueError("api_auth must be 'user:password'")
    if max_context is None:
        max_context = model_context_length(model)
    engine = engine or Engine(model, max_batch_size=max_batch_size, max_queue=max_queue, max_context=max_context)
    server = OpenAIServer(model, tokenizer, engine, model_names)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown(timeout=10)

    app = FastAPI(title="Qwen OpenAI-compatible API", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, exc: GenerationError):
        return APIError(500, str(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        logger.exception("unexpected error serving %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(make_auth_check(api_key, api_auth))])

    @v1.get("/models")
    async def list_models():
        return api.ModelList(data=[api.ModelCard(id=name) for name in server.model_names]).model_dump()

    @v1.get("/models/{name:path}")
    async def get_model(name: str):
        if name not in server.model_names:
            raise APIError(404, f"model {name!r} does not exist; this server has {', '.join(server.model_names)}",
                           param="model", code="model_not_found")
        return api.ModelCard(id=name).model_dump()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat_completion(await _validated(request, api.ChatCompletionRequest), request)

    @v1.post("/completions")
    async def completions(request: Request):
        return await server.completion(await _validated(request, api.CompletionRequest), request)

    app.include_router(v1)
    # added last, so it wraps everything: preflights are answered before auth, and errors carry CORS headers
    app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])
    return app


__all__ = ["APIError", "OpenAIServer", "create_app", "make_auth_check"]
