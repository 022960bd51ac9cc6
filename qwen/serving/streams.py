"""Answer plumbing shared by the routes: merging the choices' streams, server-sent events, cancelling on
disconnect (a client that goes away frees its slots)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Sequence

from fastapi import Request
from fastapi.responses import StreamingResponse

from .guard import DEFAULT_STALL_TIMEOUT, drop_connection
from .http import error_for, logger


class StallingStreamResponse(StreamingResponse):
    """Server-sent events whose client must keep reading: a write blocked for the app's stall timeout (the
    client stopped reading and its buffers are full) ends the stream, which cancels its engine requests, and
    closes the connection. Without it a client that never reads kept the engine generating into buffers."""

    async def __call__(self, scope, receive, send) -> None:
        limits = getattr(getattr(scope.get("app"), "state", None), "limits", None)
        self.stall_timeout = limits.stall_timeout if limits is not None else DEFAULT_STALL_TIMEOUT
        self.scope = scope
        await super().__call__(scope, receive, send)

    async def stream_response(self, send) -> None:
        async def timed(message) -> None:
            await asyncio.wait_for(send(message), self.stall_timeout)

        try:
            await timed({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await timed({"type": "http.response.body", "body": chunk.encode(self.charset), "more_body": True})
            await timed({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            logger.info("dropped a stream to %s: it read nothing for %.0f s (--stall-timeout)", self.scope.get("client"),
                        self.stall_timeout)
            await self.body_iterator.aclose()  # its finally cancels the engine requests
            if drop_connection(self.scope):
                await asyncio.sleep(0)  # connection_lost runs: uvicorn sees a disconnect, not an unfinished answer


async def merge(streams: Sequence[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
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


async def answer_unless_disconnected(request: Request, handles, response: Awaitable[dict]) -> dict:
    """Await a non-streamed response; the requests are cancelled if the client goes away, and always at the end."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
    try:
        return await response
    finally:
        watcher.cancel()
        for handle in handles:
            handle.cancel()


def chunk_body(chunk) -> dict:
    """A stream chunk (a protocol model with one choice) as sent: unset fields left out, but `finish_reason` null
    until the choice ends, as OpenAI sends it."""
    body = chunk.model_dump(exclude_none=True)
    body["choices"][0].setdefault("finish_reason", None)
    return body


def json_text(body: dict) -> str:
    """A chunk's JSON, as the stream sends it."""
    return json.dumps(body, ensure_ascii=False)


class TextChunks:
    """A stream's text chunk as JSON, dumped once from the protocol's model with a mark for the text: per token only
    the text is encoded, not three validated models built and dumped again (with the detokenizer's shortcut the event
    loop's CPU a streamed token fell from ~150 to ~100 µs at 8 clients; bench/README.md)."""

    MARK = "\ue000"  # stands for the text while the template is dumped

    def __init__(self, body: dict):
        # the last mark: the text comes after every field a client sets (the model's name may hold a mark too)
        self.before, _, self.after = json_text(body).rpartition(json.dumps(self.MARK, ensure_ascii=False))

    def __call__(self, text: str) -> str:
        return self.before + json.dumps(text, ensure_ascii=False) + self.after


def event_stream(chunks: AsyncIterator[str], handles) -> StreamingResponse:
    """Server-sent events of `chunks` (JSON text), then [DONE]; an error mid-stream becomes an error event."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk}\n\n"
        except Exception as exc:  # whatever failed, the client gets an error event and [DONE]
            error = error_for(exc).body(unknown_type="server_error")
            yield f"data: {json_text(error.model_dump())}\n\n"
        finally:  # also when the client disconnected and the task is cancelled: free the slots
            for handle in handles:
                handle.cancel()
            with contextlib.suppress(Exception):
                await chunks.aclose()
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StallingStreamResponse(body(), media_type="text/event-stream", headers=headers)
