"""Request guards and the OpenAI error body: what stands between raw HTTP and the handlers.

Errors use the OpenAI error body: a client mistake is a 4xx naming the field; a 500 never shows internal
details (they go to the log).
"""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from .. import protocol as api
from ..errors import GenerationError, ServerShutdownError

logger = logging.getLogger("qwen.serving")

# HTTP status → OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
# Limits of one request (openai_api.py's --max-request-bytes / --max-messages) and of JSON nesting: a
# request's JSON is walked, so its depth is bounded (a tool's parameter schema needs a handful of levels).
# 4 MiB: json.loads holds the GIL while it parses, 0.66 s for 4 MiB of short keys here (3.6 s for 16 MiB), and
# nothing else in the process (not /health) runs meanwhile; a 4 MiB chat is still about a million tokens of text.
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
DEFAULT_MAX_MESSAGES = 100_000
MAX_JSON_DEPTH = 64
RETRY_AFTER_SECONDS = "1"  # sent with 429 and 503
# what a 500 says; the exception itself is logged, never sent (it may name files, tensors, settings)
INTERNAL_ERROR = "internal server error; the server log has the details"
GENERATION_FAILED = "the model failed while generating this answer (the server log has the details); retry"


class APIError(Exception):
    """An error answered with the OpenAI error body and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        if status in (429, 503):
            self.headers.setdefault("Retry-After", RETRY_AFTER_SECONDS)

    def body(self, unknown_type: str = "invalid_request_error") -> api.ErrorResponse:
        """The OpenAI error body; `unknown_type` for a status ERROR_TYPES does not list."""
        return api.ErrorResponse.of(self.message, ERROR_TYPES.get(self.status, unknown_type), self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers or None)


def error_for(exc: Exception) -> APIError:
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


async def read_body(request: Request, max_bytes: int) -> bytes:
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


def check_json(data) -> None:
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
    check_json(data)
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise APIError(400, f"messages: {len(messages):,} messages, more than this server's limit of "
                            f"{max_messages:,} (--max-messages)", param="messages")
    try:
        return model_class.model_validate(data)
    except ValidationError as exc:
        message = api.format_validation_error(exc)
        raise APIError(400, message, param=message.split(":", 1)[0] if ":" in message else None) from None


class InternalErrors:
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
        except ClientDisconnect:  # the client left mid-request (e.g. an aborted upload): no one to answer
            logger.debug("client %s left before sending all of %s %s", scope.get("client"), scope.get("method"),
                        scope.get("path"))
        except Exception:
            logger.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            if started:  # half a response was sent: only closing the connection can tell the client
                raise
            await APIError(500, INTERNAL_ERROR).response()(scope, receive, send)
