"""The app: routes, OpenAPI document, CORS and auth around the handlers (create_app), and uvicorn with a graceful
SIGTERM (serve).

Auth (Bearer key and/or Basic user:pass) is checked per route, inside CORS, so browser preflights (OPTIONS) are
answered without credentials; cross-origin access is off unless origins are listed. On SIGTERM (serve()) the
server admits nothing new, gives running requests a grace period, then stops them with an error event that
says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import protocol as api
from ..chat_backend import ChatBackend, chat_engine
from ..engine import Engine
from ..errors import GenerationError
from .auth import check_secrets, describe_auth, make_auth_check
from .chat import ChatCompletions
from .completions import TextCompletions
from .guard import LOOPBACK_HOSTS, AccessGuard, ConnectionLimits, protocol_class, quiet_accept_errors
from .http import (
    DEFAULT_MAX_MESSAGES,
    DEFAULT_MAX_REQUEST_BYTES,
    APIError,
    InternalErrors,
    error_for,
    parse_request,
    read_body,
)
from .server import DEFAULT_SHUTDOWN_TIMEOUT, REQUEST_COST, OpenAIServer

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
        403: "a cross-origin request from an origin not allowed (--allowed-origins)",
        404: "unknown model",
        413: "request body too large",
        415: "the body is not sent as application/json",
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


def _texts_that_must_fit(request) -> list[tuple[str, str]]:
    """Texts a request's prompt holds whole: each completion prompt, a chat's last message (older messages may
    be dropped to fit the window, so only the last is sure to be in the prompt)."""
    if isinstance(request, api.CompletionRequest):
        return [(p, "prompt") for p in request.prompt_list() if isinstance(p, str)]
    content = request.messages[-1].content if request.messages else None
    if isinstance(content, list):
        content = "".join(getattr(part, "text", None) or "" for part in content)
    return [(content, "messages")] if isinstance(content, str) else []


def create_app(model, tokenizer, *, model_names: Sequence[str] = ("qwen",), api_key: str | None = None,
               api_auth: str | None = None, max_batch_size: int = 8, max_queue: int = 64,
               max_context: int | None = None, allowed_origins: Sequence[str] = (),
               allow_credentials: bool = False, accept_any_model: bool = False,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_messages: int = DEFAULT_MAX_MESSAGES,
               shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT, engine: Engine | None = None,
               threads: int | None = None, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
               limits: ConnectionLimits | None = None, compile_decode: bool = False) -> FastAPI:
    """The FastAPI app serving `model`; its engine thread runs while the app does (lifespan).

    api_key: accept `Authorization: Bearer <api_key>`; api_auth: accept HTTP Basic "user:pass". With neither,
    no auth; an empty one is refused (ValueError). allowed_origins: web origins whose pages may call the API
    (CORS; none by default, "*" for any), with cookies / HTTP auth only if allow_credentials (not with "*").
    accept_any_model: answer whatever `model` a request names (else 404 for names not in model_names).
    allowed_hosts: the Host names answered ("*": any; loopback names by default, against DNS rebinding).
    limits: connection cap and read / stall timeouts, applied by serve() (qwen.serving.guard).
    max_context defaults to the model's max_position_embeddings (or seq_length). threads: the engine thread's
    compute threads (openai_api.py: --threads). compile_decode: see Engine (openai_api.py: --compile).
    """
    check_secrets(api_key, api_auth)
    if allow_credentials and "*" in allowed_origins:
        raise ValueError("credentials cannot be allowed for any origin ('*'); list the origins that may use them")
    engine = engine or chat_engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                                   max_context=max_context, threads=threads, compile_decode=compile_decode)
    server = OpenAIServer(ChatBackend(model, tokenizer, engine), model_names, accept_any_model=accept_any_model,
                          shutdown_timeout=shutdown_timeout)
    chat, completion = ChatCompletions(server), TextCompletions(server)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        quiet_accept_errors(asyncio.get_running_loop())
        engine.start()
        try:
            yield
        finally:
            engine.shutdown(timeout=10, reason="shutdown")
            server.prepare_lane.close()

    app = FastAPI(title="Qwen OpenAI-compatible API", lifespan=lifespan, separate_input_output_schemas=False)
    app.state.server, app.state.chat, app.state.completions = server, chat, completion
    app.state.limits = limits or ConnectionLimits()
    app.state.auth = describe_auth(api_key, api_auth)
    app.openapi = lambda: _openapi_schema(app)

    async def read(request: Request, model_class):
        body = await read_body(request, max_request_bytes)
        REQUEST_COST.set(len(body))  # the preparation lane serves smaller requests first
        parsed = await server.prepare(parse_request, body, model_class, max_messages)
        for text, param in _texts_that_must_fit(parsed):
            server.check_text_fits(text, param)
        return parsed

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, exc: GenerationError):
        return error_for(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404 / 405 of routing; 405 has Allow
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.get("/health")
    async def health():
        body = {"status": "stopping" if server.stopping else "ok", "running": engine.num_running,
                "waiting": engine.num_waiting, "decode_step": engine.decode_step}
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
        return await chat(await read(request, api.ChatCompletionRequest), request)

    @v1.post("/completions", response_model=None, responses=responses(api.CompletionResponse))
    async def completions(request: Request):
        return await completion(await read(request, api.CompletionRequest), request)

    app.include_router(v1)
    app.add_middleware(InternalErrors)
    app.add_middleware(AccessGuard, allowed_hosts=list(allowed_hosts), allowed_origins=list(allowed_origins))
    # added last, so it wraps everything: preflights are answered before auth, and errors carry CORS headers
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_credentials=allow_credentials,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn with openai_api.py's shutdown: at SIGTERM / Ctrl-C admit nothing new at once, but keep listening
    (new requests get 503, /health says "stopping", so a load balancer drains the server), give running requests
    the app's shutdown_timeout to finish, then stop them (streams end with an error event saying so, then
    [DONE]); the port closes once nothing runs, and the process exits with 0. A second Ctrl-C quits at once."""

    def __init__(self, config: uvicorn.Config, openai_server: OpenAIServer):
        super().__init__(config)
        self.openai_server = openai_server

    def handle_exit(self, sig, frame) -> None:  # runs in the signal handler: only set flags
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True  # not re-raised at exit, unlike uvicorn's own: the process exits with 0

    async def shutdown(self, sockets=None) -> None:
        server = self.openai_server
        server.begin_shutdown()
        # uvicorn closes the listening socket first: wait for the running requests (at most the grace period,
        # after which begin_shutdown's timer stops them) while still answering 503
        deadline = asyncio.get_running_loop().time() + server.shutdown_timeout + 1
        while (server.engine.num_running or server.engine.num_waiting) and not self.force_exit:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        await super().shutdown(sockets)


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for `app` (from create_app): uvloop where installed (requirements-api.txt), its connection
    guard (qwen.serving.guard), and a backstop for the graceful shutdown."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, loop="auto",
                          http=protocol_class(app.state.limits),
                          timeout_graceful_shutdown=app.state.server.shutdown_timeout + 15)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run `app` (from create_app) with uvicorn until SIGTERM / Ctrl-C; see GracefulServer."""
    print(startup_line(app, host, port), flush=True)
    logging.getLogger("qwen.serving").setLevel(logging.INFO)  # the shutdown line; errors are logged anyway
    GracefulServer(server_config(app, host, port, log_level), app.state.server).run()


def startup_line(app: FastAPI, host: str, port: int) -> str:
    """What a person starting the server needs: where, which model name, whether other names are answered, auth."""
    server = app.state.server
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    names = ", ".join(repr(name) for name in server.model_names)
    other = ("any other model name is answered too" if server.accept_any_model
             else "other model names get 404")
    auth = app.state.auth
    warning = "; anyone who can reach this port can use it" if auth == "off" and shown != host else ""
    return f"API on http://{shown}:{port}/v1 serving {names} ({other}); auth: {auth}{warning}"
