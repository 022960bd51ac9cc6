"""The chat page behind ``web_demo.py``: a gradio 6 Blocks app on the shared batching engine.

The original web demo ran on gradio<3.42, put the HTML it rendered back into the model's history, and served
one person at a time. Here:

- the history given to the model is the raw model text, kept in a per-browser-session ``gr.State`` as
  [(query, response), ...]; the Chatbot gets the same raw text and renders Markdown and code itself;
- every answer is a request to ``qwen.engine.Engine`` (the API server's engine), so the answers of several
  people are decoded in one batch, and the chat events run with a concurrency limit above one;
- prompts, stop tokens, stop strings and streaming text come from the same code as the API server
  (``qwen.chat_backend.ChatBackend``: generation_config defaults, stop handling, incremental detokenization);
- Stop cancels the session's engine request on the server; the answer's stream then ends the way a finished
  one does (so the page is told it is over), and the partial answer stays, as shown, in the history. Clear
  and leaving the page cancel the gradio event, which cancels the engine request (the stream's ``finally``);
- mistakes and limits (empty message, prompt too long, server busy) show up in the page as gr.Warning /
  gr.Error, and the typed message is kept in the box when it could not be sent.
"""

from __future__ import annotations

import html
import signal
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

import gradio as gr

from qwen_generation_utils import DEFAULT_SYSTEM

from .chat_backend import ChatBackend
from .engine import PromptTooLongError, QueueFullError, RequestHandle
from .errors import GenerationError
from .sampling import BOUNDS, SamplingParams

History = list[tuple[str, str]]  # [(query, raw response)], what make_context takes
MAX_NEW_TOKENS_LIMIT = 8192  # the slider's upper end (the engine also clamps to the context window)
# The page takes no files, so gradio's upload route refuses every one (413): otherwise anyone could store files
# on the server and have them served back.
MAX_UPLOAD_BYTES = 0
BUSY_MESSAGE = "An answer is still being written in this chat: wait for it, or press Stop."


@dataclass
class Defaults:
    """Initial values of the page's settings (sliders and system prompt)."""

    system: str = DEFAULT_SYSTEM
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512


def to_messages(history: Sequence[Sequence[str]]) -> list[dict]:
    """Chatbot messages (gradio's messages format) of a raw history; the browser renders the Markdown."""
    messages = []
    for query, response in history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return messages


class WebChat:
    """The chat logic of one page, shared by all browser sessions; each session's history is passed in.

    respond() and regenerate() are async generators yielding (chatbot messages, history[, textbox]) as the
    answer streams, so whatever was yielded last (also when the event is cancelled) is consistent.
    """

    def __init__(self, backend: ChatBackend, *, title: str = "Qwen", defaults: Defaults | None = None):
        # shared with the API server: checkpoint defaults, stop tokens and strings, streamed text
        self.backend, self.engine, self.title = backend, backend.engine, title
        self.defaults = defaults or self.checkpoint_defaults()
        self._running: dict[str, RequestHandle] = {}  # session -> the engine request of its answer

    def checkpoint_defaults(self) -> Defaults:
        """The checkpoint's generation_config.json sampling settings (greedy when it does not sample)."""
        params = self.backend.sampling_params()
        return Defaults(temperature=params.temperature, top_p=params.top_p, max_new_tokens=params.max_new_tokens)

    def sampling_params(self, temperature: float, top_p: float, max_new_tokens: int) -> SamplingParams:
        try:
            return self.backend.sampling_params(
                max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p)
            )
        except ValueError as exc:
            raise gr.Error(f"{exc}; fix it in the Settings panel.") from exc

    def submit(self, query: str, history: History, system: str, params: SamplingParams):
        """The engine request for `query` after `history`; page errors for what the person can act on."""
        prompt_ids = self.backend.chat_prompt(query, history, system)
        try:
            return self.engine.submit(prompt_ids, params)
        except PromptTooLongError as exc:
            raise gr.Error(f"The message is too long: {exc}. Clear the chat or send a shorter message.") from exc
        except QueueFullError as exc:
            raise gr.Error(f"Too many people are chatting right now ({exc}).") from exc

    async def stream(self, query: str, history: History, system: str, temperature: float, top_p: float,
                     max_new_tokens: int, session: str) -> AsyncIterator[History]:
        """The history with the new turn, once per streamed piece of the answer (raw model text)."""
        if session in self._running:
            gr.Warning(BUSY_MESSAGE)
            return
        params = self.sampling_params(temperature, top_p, max_new_tokens)
        handle = self.submit(query, history, system, params)
        self._running[session] = handle
        response = ""
        try:
            yield [*history, (query, response)]
            async for piece in self.backend.pieces(handle, self.backend.chat_stop_texts):
                if piece.text:
                    response += piece.text
                    yield [*history, (query, response)]
        except GenerationError as exc:  # the engine failed (e.g. out of memory); the turn is dropped
            yield list(history)
            raise gr.Error(f"The answer could not be written: {exc}") from exc
        finally:  # also on cancellation (Stop, Clear, the browser going away): pieces() cancels the request
            self._running.pop(session, None)
            handle.cancel()

    def stop(self, request: gr.Request) -> None:
        """Stop: cancel this session's answer in the engine; its stream ends as a finished answer does.

        Not gradio's `cancels=`: a cancelled event can leave the page's progress indicator busy when the last
        streamed update crosses the cancellation, while a stream that ends by itself always completes.
        """
        handle = self._running.get(request.session_hash)
        if handle is not None:
            handle.cancel()

    async def respond(self, query: str, history: History, system: str, temperature: float, top_p: float,
                      max_new_tokens: int, request: gr.Request):
        """Submit: yields (chatbot, history, textbox). The box is emptied only once the message is accepted."""
        history = [tuple(turn) for turn in history or []]
        if not query.strip():
            gr.Warning("Type a message first.")
            return
        box = ""  # emptied once; later updates leave alone what the person types meanwhile
        async for turns in self.stream(query, history, system, temperature, top_p, max_new_tokens,
                                       request.session_hash):
            yield to_messages(turns), turns, box
            box = gr.skip()

    async def regenerate(self, history: History, system: str, temperature: float, top_p: float,
                         max_new_tokens: int, request: gr.Request):
        """Regenerate: answer the last message again, in place of its answer; yields (chatbot, history)."""
        history = [tuple(turn) for turn in history or []]
        if not history:
            gr.Warning("Nothing to regenerate yet: send a message first.")
            return
        *earlier, (query, _) = history
        async for turns in self.stream(query, earlier, system, temperature, top_p, max_new_tokens,
                                       request.session_hash):
            yield to_messages(turns), turns


def build_demo(chat: WebChat, *, concurrency: int = 16) -> gr.Blocks:
    """The page. `concurrency`: chat events running at once over all sessions (more wait in gradio's queue)."""
    d = chat.defaults
    with gr.Blocks(title=f"{chat.title} chat", analytics_enabled=False) as demo:
        gr.Markdown(f"## {chat.title} chat")
        chatbot = gr.Chatbot(label=chat.title, elem_id="chatbot", height=480, buttons=["copy", "copy_all"],
                             placeholder="Ask me anything.")
        query = gr.Textbox(show_label=False, placeholder="Type a message; Enter sends, Shift+Enter adds a line",
                           lines=1, max_lines=8, elem_id="query")
        with gr.Row():
            submit = gr.Button("Submit", variant="primary", elem_id="submit")
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
            regenerate = gr.Button("Regenerate", elem_id="regenerate")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            system = gr.Textbox(label="System prompt", value=d.system, lines=2, elem_id="system")
            with gr.Row():
                temperature = gr.Slider(BOUNDS["temperature"].low, BOUNDS["temperature"].high, value=d.temperature,
                                        step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, BOUNDS["top_p"].high, value=d.top_p, step=0.05, label="Top-p", elem_id="top_p")
                max_new_tokens = gr.Slider(1, max(MAX_NEW_TOKENS_LIMIT, d.max_new_tokens), value=d.max_new_tokens,
                                           step=1, label="Max new tokens", elem_id="max_new_tokens")
        history = gr.State([])
        settings = [system, temperature, top_p, max_new_tokens]

        # one concurrency group for everything that generates, so `concurrency` bounds engine requests
        limits = {"concurrency_limit": concurrency, "concurrency_id": "generate"}
        answering = gr.on([submit.click, query.submit], chat.respond, [query, history, *settings],
                          [chatbot, history, query], **limits)
        regenerating = regenerate.click(chat.regenerate, [history, *settings], [chatbot, history], **limits)
        stop.click(chat.stop, None, None, queue=False)
        clear.click(lambda: ([], []), None, [chatbot, history], cancels=[answering, regenerating])
    return demo


def create_page(model, tokenizer, *, title: str = "Qwen", max_batch_size: int = 8, concurrency: int = 16,
                threads: int | None = None, compile_decode: bool = False, **initial) -> gr.Blocks:
    """The page serving `model` on its own engine (started by serve_page); `initial`: Defaults fields to start
    the settings with instead of the checkpoint's (None = the checkpoint's)."""
    backend = ChatBackend.from_model(model, tokenizer, max_batch_size=max_batch_size,
                                     max_queue=max(64, concurrency), threads=threads,
                                     compile_decode=compile_decode)
    chat = WebChat(backend, title=title)
    chat.defaults = replace(chat.defaults, **{key: value for key, value in initial.items() if value is not None})
    demo = build_demo(chat, concurrency=concurrency)
    demo.web_chat = chat  # serve_page starts and stops its engine
    return demo


def serve_page(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int = 8080, share: bool = False,
               inbrowser: bool = False, auth: str | None = None, concurrency: int = 16) -> int:
    """Serve `demo` (from create_page) until Ctrl-C; the exit status (1: the port could not be used)."""
    engine = demo.web_chat.engine
    # gradio's own banner is quiet: its hint names launch(share=True), where our users have --share.
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    hint = "" if share else "  (--share with --auth adds a public gradio.live link)"
    interrupted = []  # gradio's start-up is not interrupt-safe (a half-built event loop prints a traceback later)
    defer = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True)) if defer else None
    try:
        engine.start()
        print(f"Chat page on http://{shown}:{port}" + hint, flush=True)
        launch_page(demo, server_name=host, server_port=port, share=share, inbrowser=inbrowser,
                    auth=tuple(auth.split(":", 1)) if auth else None, max_queue=max(64, concurrency),
                    prevent_thread_lock=True)
        if defer:
            signal.signal(signal.SIGINT, previous)
        if interrupted:  # Ctrl-C while gradio was starting: stop as a later one does
            demo.close()
        else:
            demo.block_thread()  # until Ctrl-C; gradio then closes its server
    except OSError as exc:  # e.g. the port is taken
        print(f"Error: cannot serve on {host}:{port} ({exc}); pick another --server-port or stop the program "
              "using it.", file=sys.stderr)
        return 1
    finally:
        if defer:
            signal.signal(signal.SIGINT, previous)
        engine.shutdown(timeout=10)
    return 0


def launch_page(demo: gr.Blocks, *, server_name: str, server_port: int, share: bool = False, inbrowser: bool = False,
                auth: tuple[str, str] | None = None, max_queue: int = 64, prevent_thread_lock: bool = False) -> None:
    """Serve the page: gradio's queue (`max_queue` events waiting), uploads refused, gradio's banner quiet, the
    Blocks' title in the HTML."""
    from starlette.middleware import Middleware

    demo.queue(max_size=max_queue).launch(
        server_name=server_name, server_port=server_port, share=share, inbrowser=inbrowser, auth=auth,
        max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False, show_error=True, quiet=True,
        prevent_thread_lock=prevent_thread_lock,
        app_kwargs={"middleware": [Middleware(TitleInPage, title=demo.title)]},
    )


class TitleInPage:
    """ASGI middleware: gradio's page template has no <title> (its JavaScript sets the tab's title once it runs),
    so the page's HTML gets one; a tab, a bookmark or a client without JavaScript then names the page at once."""

    def __init__(self, app, title: str):
        self.app, self.tag = app, f"<title>{html.escape(title)}</title>".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != "/":
            return await self.app(scope, receive, send)
        start, chunks = {}, []

        async def send_titled(message):
            if message["type"] == "http.response.start":
                start.update(message)  # sent with the body: its content-length changes
                return
            if message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            if dict(headers).get(b"content-type", b"").startswith(b"text/html") and b"<title>" not in body:
                body = body.replace(b"<head>", b"<head>" + self.tag, 1)
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_titled)


__all__ = ["Defaults", "WebChat", "build_demo", "create_page", "launch_page", "serve_page", "to_messages"]
