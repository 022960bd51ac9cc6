"""The web page's chat logic (qwen.webui.WebChat) driven directly, with a scripted engine and the demo tokenizer."""

import asyncio
import re
import signal
import subprocess
import sys
import urllib.request
from types import SimpleNamespace

import gradio as gr
import pytest
from conftest import REPO, free_port
from transformers import GenerationConfig

from qwen.chat_backend import ChatBackend
from qwen.engine import FinishEvent, PromptTooLongError, QueueFullError, TokenEvent
from qwen.webui import WebChat, launch_page
from qwen_generation_utils import chatml_ids, make_context

SYSTEM = "You are a helpful assistant."
CODE_ANSWER = (
    "Compare them like this:\n\n```python\nif a < b and b > c:\n    print(\"a & b\", '<br>')\n```\n"
    "It prints `a & b` when *both* hold."
)


class ScriptedHandle:
    """An engine request that emits `reply`'s tokens, then stops, or (hold) waits until cancelled."""

    def __init__(self, token_ids, params, hold=False):
        self.tokens, self.params, self.hold = list(token_ids), params, hold
        self.prompt_tokens = 1
        self.cancelled = False
        self.emitted = 0

    def cancel(self):
        self.cancelled = True

    async def __aiter__(self):
        for token in self.tokens:
            if self.cancelled:
                break
            self.emitted += 1
            yield TokenEvent(token)
            await asyncio.sleep(0)
        while self.hold and not self.cancelled:
            await asyncio.sleep(0.001)
        yield FinishEvent("cancelled" if self.cancelled else "stop", self.prompt_tokens, self.emitted)


class ScriptedEngine:
    """Stands in for qwen.engine.Engine: records what it was asked, answers with the next scripted reply."""

    def __init__(self, tokenizer, replies=(), error=None, hold=False):
        self.tokenizer, self.replies, self.error, self.hold = tokenizer, list(replies), error, hold
        self.prompts, self.handles = [], []

    def submit(self, prompt_ids, params):
        if self.error is not None:
            raise self.error
        self.prompts.append(list(prompt_ids))
        reply = self.replies.pop(0)
        handle = ScriptedHandle(self.tokenizer.encode(reply, add_special_tokens=False), params, self.hold)
        self.handles.append(handle)
        return handle


def request(session="browser-1"):
    return SimpleNamespace(session_hash=session)


@pytest.fixture()
def make_chat(demo_tokenizer):
    def make(**engine_kwargs):
        engine = ScriptedEngine(demo_tokenizer, **engine_kwargs)
        config = GenerationConfig(chat_format="chatml", max_window_size=6144, max_new_tokens=64, do_sample=True,
                                  temperature=0.7, top_p=0.8)
        return WebChat(ChatBackend(SimpleNamespace(generation_config=config), demo_tokenizer, engine)), engine

    return make


async def collect(updates):
    return [update async for update in updates]


def send(chat, query, history, session="browser-1", temperature=0.0):
    return asyncio.run(collect(chat.respond(query, history, SYSTEM, temperature, 1.0, 64, request(session))))


def test_history_given_to_the_model_keeps_the_raw_code_block(make_chat, demo_tokenizer):
    chat, engine = make_chat(replies=[CODE_ANSWER, "It compares a, b and c."])
    updates = send(chat, "Show me a comparison in Python.", [])
    messages, history, box = updates[-1]
    assert history == [("Show me a comparison in Python.", CODE_ANSWER)]
    assert messages[-1] == {"role": "assistant", "content": CODE_ANSWER}  # rendering is the browser's job
    assert updates[0][2] == ""  # the box is emptied once the message is accepted

    send(chat, "Explain it.", history)
    expected = make_context(demo_tokenizer, "Explain it.", [("Show me a comparison in Python.", CODE_ANSWER)],
                            SYSTEM)[1]
    assert engine.prompts[-1] == expected
    prompt = demo_tokenizer.decode(engine.prompts[-1])
    assert CODE_ANSWER in prompt
    for html in ("&lt;", "&gt;", "&amp;", "&quot;", "<pre", "<code", "<p>", "<br>\n"):
        assert html not in prompt.replace(CODE_ANSWER, "")


def test_sampling_settings_reach_the_engine(make_chat, demo_tokenizer):
    chat, engine = make_chat(replies=["Paris.", "Paris!"])
    assert (chat.defaults.temperature, chat.defaults.top_p, chat.defaults.max_new_tokens) == (0.7, 0.8, 64)
    send(chat, "Capital of France?", [], temperature=0.005)  # tiny means greedy, as the original
    asyncio.run(collect(chat.respond("Again?", [], SYSTEM, 0.9, 0.5, 7, request())))
    greedy, sampled = (h.params for h in engine.handles)
    assert greedy.temperature == 0
    assert (sampled.temperature, sampled.top_p, sampled.max_new_tokens) == (0.9, 0.5, 7)
    assert set(chatml_ids(demo_tokenizer)) <= set(sampled.stop_token_ids)


@pytest.mark.parametrize("error, words", [
    (PromptTooLongError("the prompt has 9000 tokens but the context window is 8192"), "too long"),
    (QueueFullError("the server is busy (64 requests waiting or running); retry later"), "Too many people"),
])
def test_engine_refusals_are_shown_and_the_message_is_kept(make_chat, error, words):
    chat, _ = make_chat(error=error)
    updates = []
    with pytest.raises(gr.Error, match=words) as raised:
        asyncio.run(_collect_into(chat.respond("Hello", [("a", "b")], SYSTEM, 0, 1, 64, request()), updates))
    assert str(error) in raised.value.message
    assert updates == []  # nothing changed on the page: the chat, the history and the typed message stay


async def _collect_into(updates, into):
    async for update in updates:
        into.append(update)


def test_empty_message_and_nothing_to_regenerate_warn(make_chat):
    chat, engine = make_chat(replies=[])
    with pytest.warns(UserWarning, match="Type a message"):
        assert send(chat, "   ", []) == []
    with pytest.warns(UserWarning, match="Nothing to regenerate"):
        assert asyncio.run(collect(chat.regenerate([], SYSTEM, 0, 1, 64, request()))) == []
    assert engine.prompts == []


def test_regenerate_answers_the_last_message_again(make_chat, demo_tokenizer):
    chat, engine = make_chat(replies=["Berlin, again."])
    history = [("Capital of France?", "Paris."), ("Capital of Germany?", "Bonn.")]
    updates = asyncio.run(collect(chat.regenerate(history, SYSTEM, 0, 1, 64, request())))
    assert engine.prompts == [make_context(demo_tokenizer, "Capital of Germany?", history[:1], SYSTEM)[1]]
    assert updates[-1][1] == [("Capital of France?", "Paris."), ("Capital of Germany?", "Berlin, again.")]


async def _stop_button(chat, engine, task):
    chat.stop(request("another-browser"))  # someone else's Stop touches nothing
    await asyncio.sleep(0.01)
    assert not engine.handles[0].cancelled and not task.done()
    chat.stop(request())
    await asyncio.wait_for(task, 5)  # the stream ends by itself, so gradio completes the event


async def _cancelled_event(chat, engine, task):
    task.cancel()  # what gradio does for Clear (cancels=[...]) and for a page that goes away
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("leave", [_stop_button, _cancelled_event])
def test_stopping_cancels_the_engine_request_and_keeps_the_partial_answer(make_chat, leave):
    chat, engine = make_chat(replies=["The history of Rome begins", "Paris."], hold=True)
    seen = []

    async def scenario():
        stream = chat.respond("Write an essay about Rome.", [], SYSTEM, 0, 1, 64, request())
        task = asyncio.create_task(_collect_into(stream, seen))
        while not (seen and seen[-1][1][-1][1] == "The history of Rome begins"):
            await asyncio.sleep(0.001)
        await leave(chat, engine, task)

    asyncio.run(scenario())
    assert engine.handles[0].cancelled and not chat._running
    assert seen[-1][1] == [("Write an essay about Rome.", "The history of Rome begins")]
    engine.hold = False
    assert send(chat, "Capital of France?", seen[-1][1])[-1][1][-1] == ("Capital of France?", "Paris.")


def test_one_answer_at_a_time_per_session_others_unaffected(make_chat):
    chat, engine = make_chat(replies=["A long answer", "Other person's answer."], hold=True)

    async def scenario():
        first = chat.respond("Long question", [], SYSTEM, 0, 1, 64, request("alice"))
        await first.__anext__()  # alice's answer is being written
        with pytest.warns(UserWarning, match="still being written"):
            assert await collect(chat.respond("Again", [], SYSTEM, 0, 1, 64, request("alice"))) == []
        engine.hold = False
        bob = await collect(chat.respond("Hi", [], SYSTEM, 0, 1, 64, request("bob")))
        await first.aclose()  # the page went away: the request is cancelled
        return bob

    bob = asyncio.run(scenario())
    assert bob[-1][1] == [("Hi", "Other person's answer.")]
    assert len(engine.prompts) == 2 and engine.handles[0].cancelled


@pytest.mark.parametrize("flags, message", [
    (["--auth", "nopassword"], "--auth must be USER:PASSWORD"),
    (["--server-port", "70000"], "70000 is not a port: use 0..65535"),
    (["--temperature", "-1"], "--temperature must be in [0, 2] (0 means greedy)"),
    (["--temperature", "3"], "--temperature must be in [0, 2]"),  # the API's and the CLI's range too
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--concurrency", "0"], "--concurrency must be at least 1"),
    (["--share"], "--share needs --auth"),
])
def test_bad_flags_exit_2_with_one_message(flags, message):
    done = subprocess.run([sys.executable, "web_demo.py", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_ctrl_c_right_after_the_page_starts_exits_quietly():
    """Ctrl-C while gradio is still starting stops the page like a later one: status 0, no traceback."""
    process = subprocess.Popen([sys.executable, "web_demo.py", "--server-port", str(free_port())], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = []
    try:
        for line in process.stdout:
            started.append(line)
            if line.startswith("Chat page on"):
                assert "--share with --auth" in line  # never a hint to share a page without a login
                process.send_signal(signal.SIGINT)
                break
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "Traceback" not in output, output
    assert [line.split(" ")[0] for line in started] == ["Running", "Loaded", "Chat"], started  # no library bars


def test_the_page_html_carries_the_blocks_title_escaped():
    with gr.Blocks(title="Qwen <7B> & co chat") as demo:
        gr.Markdown("page")
    port = free_port()
    launch_page(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            page = response.read().decode()
            assert int(response.headers["content-length"]) == len(page.encode())
    finally:
        demo.close()
    assert re.findall(r"<title>(.*?)</title>", page) == ["Qwen &lt;7B&gt; &amp; co chat"]
