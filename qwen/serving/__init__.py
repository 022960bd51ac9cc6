"""The OpenAI-compatible HTTP API (FastAPI) in front of the batched engine; openai_api.py only wires it up.

One request flows:  JSON body → pydantic model (qwen.protocol) → tools and messages folded into the ReAct /
ChatML prompt (qwen.react, qwen_generation_utils) → Engine.submit() per choice → token events →
incremental detokenizer → stop strings cut (held back while they may be starting) → ReAct parser when tools
are on → one JSON response, or server-sent events.

The engine runs on its own thread, and the CPU-heavy part of a request (JSON parsing and validation, prompt
building, tokenization) runs on worker threads, so no request blocks the event loop: /health and every stream
keep answering. A client that goes away cancels its requests (the stream's `finally`, or a disconnect watcher
for non-streamed calls), which frees their slots.

The modules, one job each (as vLLM keeps chat and completions apart):
    guard         connection cap and read timeouts, Host / Origin / JSON-only checks, stalled streams
    http          request guards (body size, JSON depth, validation) and the OpenAI error body
    streams       merging choices, server-sent events, cancelling on disconnect
    auth          Bearer key / Basic login checks
    server        OpenAIServer: what both routes share (model names, admission, sampling, shutdown)
    chat          /v1/chat/completions: prompt plan, typed deltas, response and chunks
    completions   /v1/completions
    app           create_app (routes, OpenAPI, CORS) and serve (uvicorn with a graceful SIGTERM)
"""

from .app import GracefulServer, create_app, serve
from .auth import make_auth_check
from .http import (
    DEFAULT_MAX_MESSAGES,
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_JSON_DEPTH,
    APIError,
    parse_request,
)
from .server import DEFAULT_SHUTDOWN_TIMEOUT, OpenAIServer

__all__ = [
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "MAX_JSON_DEPTH",
    "APIError",
    "GracefulServer",
    "OpenAIServer",
    "create_app",
    "make_auth_check",
    "parse_request",
    "serve",
]
