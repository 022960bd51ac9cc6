"""What guards the server before a request reaches a handler: connections (how many, how long a client may take
to send its request), who may call (Host allow-list, cross-origin refusal, JSON only), and a stream whose reader
stalls.

- Connections. A connection must deliver its request headers within `header_timeout` seconds and, while it
  sends a body, something every `body_timeout` seconds, or it is closed; uvicorn alone waited forever, so 1,100
  idle sockets used up the process's file descriptors before any auth ran. At most `max_connections` are open
  (default: the fd limit less a reserve for the model's files): a new one beyond that evicts the oldest
  connection still sending its request, else it is closed at once, so fds never run out and /health gets in.
- Accept errors (EMFILE and such) are logged once per ACCEPT_ERROR_LOG_INTERVAL with a count: asyncio logs a
  traceback per attempt, 96,130 of them (48 MB) in 25 s here.
- A local server is reachable by any web page the user visits: a "simple" cross-origin request (a text/plain
  POST) needs no CORS preflight, and DNS rebinding lets a foreign page read answers under a name that resolves
  to 127.0.0.1. So requests must be JSON (415), a cross-origin request from an origin not allowed is refused
  (403), and the Host header must be one the server answers to (400; loopback names by default), as Jupyter's
  and vLLM's local servers do.
- Backpressure: each stream's socket buffers are small and fixed, so a reader that stops reading blocks the
  stream's writes within a few kilobytes; a write blocked for `stall_timeout` seconds drops the stream, which
  frees its engine slot (qwen.serving.streams).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..scripts import is_loopback
from .http import APIError

logger = logging.getLogger("qwen.serving")

FD_RESERVE = 128  # file descriptors kept free of connections: model files, logs, the engine, a margin
MAX_CONNECTIONS_CAP = 4096
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_STALL_TIMEOUT = 30.0
STREAM_SEND_BUFFER = 16 * 1024  # bytes: the kernel's send buffer of a connection (fixed: no autotuning growth)
STREAM_WRITE_HIGH_WATER = 16 * 1024  # bytes buffered by asyncio before a write waits for the reader
ACCEPT_ERROR_LOG_INTERVAL = 10.0  # seconds
SWEEP_INTERVAL = 0.5  # seconds between checks of the connections' deadlines
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def default_max_connections() -> int:
    """The fd limit (RLIMIT_NOFILE, soft) less FD_RESERVE, between 16 and MAX_CONNECTIONS_CAP."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_CAP
    return max(16, min(MAX_CONNECTIONS_CAP, soft - FD_RESERVE))


@dataclass
class ConnectionLimits:
    """openai_api.py's --max-connections / --header-timeout / --body-timeout / --stall-timeout."""

    max_connections: int | None = None  # None: default_max_connections()
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    stall_timeout: float = DEFAULT_STALL_TIMEOUT


# (server address, client address) → its connection: how a stream whose reader stalled finds what to close
_CONNECTIONS: dict[tuple, GuardedH11Protocol] = {}


def drop_connection(scope) -> bool:
    """Close the connection `scope` arrived on at once (a stalled reader); False when it is not a guarded one."""
    connection = _CONNECTIONS.get((scope.get("server"), scope.get("client")))
    if connection is None:
        return False
    connection.close("the client stopped reading its stream")
    return True


class ConnectionGuard:
    """The open connections of one server (oldest first), their deadlines, and the cap."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.max_connections = limits.max_connections or default_max_connections()
        self.open: collections.OrderedDict[GuardedH11Protocol, None] = collections.OrderedDict()
        self.sweeper: asyncio.TimerHandle | None = None
        self.refused = self.evicted = self.timed_out = 0
        self._last_note = 0.0

    def admit(self, connection: GuardedH11Protocol) -> bool:
        """Register a new connection; False when it must be closed (all slots hold requests being answered)."""
        if len(self.open) >= self.max_connections:
            waiting = next((c for c in self.open if c.waiting_on_client()), None)
            if waiting is None:
                self.refused += 1
                self.note("connection cap (%d) reached: refused a connection", self.max_connections)
                return False
            self.evicted += 1
            self.note("connection cap (%d) reached: closed the oldest connection still sending its request",
                      self.max_connections)
            waiting.close("evicted")
        self.open[connection] = None
        _CONNECTIONS[(connection.server, connection.client)] = connection
        if self.sweeper is None:
            self.sweeper = connection.loop.call_later(SWEEP_INTERVAL, self.sweep, connection.loop)
        return True

    def forget(self, connection: GuardedH11Protocol) -> None:
        self.open.pop(connection, None)
        if _CONNECTIONS.get((connection.server, connection.client)) is connection:
            del _CONNECTIONS[(connection.server, connection.client)]

    def sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        for connection in list(self.open):
            reason = connection.overdue(now, self.limits)
            if reason:
                self.timed_out += 1
                connection.close(reason)
        self.sweeper = loop.call_later(SWEEP_INTERVAL, self.sweep, loop) if self.open else None

    def note(self, message: str, *args) -> None:
        """A warning at most once per ACCEPT_ERROR_LOG_INTERVAL (an attack would otherwise flood the log)."""
        now = time.monotonic()
        if now - self._last_note >= ACCEPT_ERROR_LOG_INTERVAL:
            self._last_note = now
            logger.warning(message + " (refused %d, evicted %d, timed out %d so far)", *args, self.refused,
                           self.evicted, self.timed_out)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the guard's deadlines, cap and small socket buffers."""

    guard: ConnectionGuard  # set on the per-server subclass (protocol_class)

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.header_deadline: float | None = time.monotonic() + self.guard.limits.header_timeout
        self.last_data = time.monotonic()
        if not self.guard.admit(self):
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
        transport.set_write_buffer_limits(high=STREAM_WRITE_HIGH_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_data = now
        if self.header_deadline is None and self.conn.their_state is h11.IDLE:  # a next request begins
            self.header_deadline = now + self.guard.limits.header_timeout
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are in
            self.header_deadline = None

    def waiting_on_client(self) -> bool:
        """Still sending its request (headers or body), or idle between requests."""
        if self.conn.their_state is h11.SEND_BODY:
            return True
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def overdue(self, now: float, limits: ConnectionLimits) -> str | None:
        if self.header_deadline is not None and now > self.header_deadline:
            return "request headers not received in time"
        if self.conn.their_state is h11.SEND_BODY and now - self.last_data > limits.body_timeout:
            return "request body stalled"
        return None

    def close(self, reason: str) -> None:
        logger.debug("closing a connection from %s: %s", self.client, reason)
        self.guard.forget(self)
        self.transport.abort()  # no lingering in the kernel: the fd is freed now


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class with its own guard: one per server."""
    return type("QwenH11Protocol", (GuardedH11Protocol,), {"guard": ConnectionGuard(limits)})


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's "socket.accept() out of system resource" once per ACCEPT_ERROR_LOG_INTERVAL, with a count."""
    previous = loop.get_exception_handler()
    state = {"last": 0.0, "count": 0}

    def handler(loop, context):
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            state["count"] += 1
            now = time.monotonic()
            if now - state["last"] >= ACCEPT_ERROR_LOG_INTERVAL:
                state["last"] = now
                logger.error("cannot accept connections: %s (%d times so far); raise the fd limit (ulimit -n) "
                             "or lower --max-connections", context.get("exception"), state["count"])
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


# ------------------------------------------------------------------------------------- who may call


def host_name(host_header: str) -> str:
    """'example.com:8000' → 'example.com', '[::1]:8000' → '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def default_allowed_hosts(server_name: str) -> list[str]:
    """Loopback names when listening on loopback; also the address itself when listening on one other
    address; any host ("*") when listening on every interface (0.0.0.0 / ::), where names are the user's."""
    if server_name in ("0.0.0.0", "::", ""):
        return ["*"]
    return list(LOOPBACK_HOSTS) + ([] if is_loopback(server_name) else [server_name])


class AccessGuard:
    """ASGI middleware: the Host allow-list (400), cross-origin requests from origins not allowed (403), and
    JSON-only bodies for POST (415); everything else passes untouched."""

    def __init__(self, app, allowed_hosts: Sequence[str], allowed_origins: Sequence[str]):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {h.strip().strip("[]").lower() for h in allowed_hosts}
        self.any_origin = "*" in allowed_origins
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    def refusal(self, scope) -> APIError | None:
        headers = {k: v for k, v in scope.get("headers", ())}
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not self.any_host:
            name = host_name(host)
            if name not in self.hosts and not is_loopback_name(name, self.hosts):
                return APIError(400, f"this server does not answer to the host name {name!r} (Host header); "
                                     "if it is yours, start the server with --allowed-hosts naming it",
                                code="host_not_allowed")
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
        # a cross-origin POST runs the model even if its answer cannot be read; GETs read nothing then
        if origin and scope["method"] == "POST" and not self.any_origin and origin not in self.origins:
            own = {f"{scope.get('scheme', 'http')}://{host.lower()}"}
            if origin not in own:
                return APIError(403, f"cross-origin requests from {origin} are not allowed; start the server "
                                     f"with --allowed-origins {origin} to let that page call it",
                                code="origin_not_allowed")
        if scope["method"] == "POST":
            content_type = headers.get(b"content-type", b"").decode("latin-1").partition(";")[0].strip().lower()
            if content_type != "application/json":
                return APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' "
                                     f"(got {content_type or 'none'!r})", code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                return await refusal.response()(scope, receive, send)
        await self.app(scope, receive, send)


def is_loopback_name(name: str, allowed: set[str]) -> bool:
    """Any loopback address or *.localhost name counts as allowed when a loopback name is."""
    return bool(allowed & set(LOOPBACK_HOSTS)) and is_loopback(name)
