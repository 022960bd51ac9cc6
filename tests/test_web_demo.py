"""web_demo.py as people use it: the real server with the demo model, driven in headless Chromium (playwright).

Set QWEN_UPDATE_SCREENSHOT=1 to also write docs/web_demo.png (the README's screenshot); the test always writes
artifacts/web_demo.png. Chromium is Debian's (/usr/bin/chromium, or $QWEN_CHROMIUM); nothing is downloaded.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, require_program

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:::gradio.queueing")]  # pandas 3 notes

CHROMIUM = os.environ.get("QWEN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
STARTUP_TIMEOUT_S = 240
ANSWER_TIMEOUT_MS = 120_000

# Resolves once the chat's status tracker has been seen busy (after `arm`) and is idle again: a turn is over.
ARM_JS = """() => {
    const root = document.querySelector('#chatbot');
    window.__chatBusySeen = false;
    const busy = (el) => el && el.matches('[data-testid=status-tracker]') && !el.classList.contains('hide');
    if (window.__chatObserver) window.__chatObserver.disconnect();
    window.__chatObserver = new MutationObserver((records) => {
        for (const r of records) {
            const wasBusy = r.type === 'attributes' && r.oldValue !== null && r.target.matches('[data-testid=status-tracker]')
                && !r.oldValue.split(/\\s+/).includes('hide');
            if (wasBusy || busy(r.target) || busy(root.querySelector('[data-testid=status-tracker]')))
                window.__chatBusySeen = true;
        }
    });
    window.__chatObserver.observe(root, {attributes: true, attributeOldValue: true, subtree: true, childList: true});
}"""
IDLE_JS = """() => window.__chatBusySeen
    && document.querySelector('#chatbot [data-testid=status-tracker]').classList.contains('hide')"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_checkpoint, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("web_demo") / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "web_demo.py", "--server-port", str(port), "--temperature", "0",
             "--max-new-tokens", "60", "--concurrency", "4"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"web_demo.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"web_demo.py did not answer on {url}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    require_program(CHROMIUM, "apt-get install chromium", ", or set QWEN_CHROMIUM to a Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def new_page(browser, server):
    contexts = []

    def open_page():
        context = browser.new_context(viewport={"width": 1100, "height": 950})
        contexts.append(context)
        page = context.new_page()
        page.goto(server)
        page.locator("#query textarea").wait_for()
        return page

    yield open_page
    for context in contexts:
        context.close()


def bot_messages(page) -> list[str]:
    return page.locator('#chatbot [data-testid="bot"]').all_inner_texts()


def user_messages(page) -> list[str]:
    return page.locator('#chatbot [data-testid="user"]').all_inner_texts()


def start(page, action) -> None:
    page.evaluate(ARM_JS)
    action()


def wait_idle(page) -> None:
    page.wait_for_function(IDLE_JS, timeout=ANSWER_TIMEOUT_MS)


def send(page, text: str) -> None:
    page.locator("#query textarea").fill(text)
    start(page, page.locator("#submit").click)


def ask(page, text: str) -> str:
    send(page, text)
    wait_idle(page)
    return bot_messages(page)[-1]


def test_the_served_html_names_the_page(server):
    """The first response carries the tab's title (gradio's template has none; its JavaScript sets one later)."""
    with urllib.request.urlopen(server, timeout=30) as response:
        page = response.read().decode()
    assert re.findall(r"<title>(.*?)</title>", page) == ["Demo model (SmolLM2, not Qwen) chat"]


def test_chat_regenerate_clear_and_screenshot(new_page):
    page = new_page()
    assert page.title().endswith(" chat") and len(page.title()) > len(" chat")  # the tab names the model
    answer = ask(page, "What is the capital of France?")
    assert "Paris" in answer
    assert user_messages(page) == ["What is the capital of France?"]
    assert page.locator("#query textarea").input_value() == ""

    start(page, page.locator("#regenerate").click)
    wait_idle(page)
    assert len(bot_messages(page)) == 1 and "Paris" in bot_messages(page)[0]  # in place of the old answer

    ask(page, "Show a Python hello world program in a code block.")
    assert page.locator('#chatbot [data-testid="bot"] pre code').count() >= 1  # Markdown rendered in the page
    page.locator("#settings").get_by_text("Settings").click()  # the collapsible panel: system prompt and sampling controls
    page.locator("#system textarea").wait_for()
    assert page.locator("#temperature input[type=number]").input_value() == "0"
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "web_demo.png"), full_page=True)
    assert (artifacts / "web_demo.png").stat().st_size > 10_000
    if os.environ.get("QWEN_UPDATE_SCREENSHOT"):
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(artifacts / "web_demo.png", REPO / "docs" / "web_demo.png")

    page.locator("#clear").click()
    page.wait_for_function(
        "() => !document.querySelector('#chatbot [data-testid=bot], #chatbot [data-testid=user]')"
    )
    assert bot_messages(page) == [] and user_messages(page) == []
    assert "Berlin" in ask(page, "What is the capital of Germany?")  # a fresh history
    assert user_messages(page) == ["What is the capital of Germany?"]


def test_two_people_chat_at_the_same_time(new_page):
    alice, bob = new_page(), new_page()
    send(alice, "What is the capital of France?")
    send(bob, "What is the capital of Germany?")
    wait_idle(alice)
    wait_idle(bob)
    assert "Paris" in bot_messages(alice)[-1] and "Berlin" in bot_messages(bob)[-1]
    assert user_messages(alice) == ["What is the capital of France?"]  # each browser has its own history
    assert user_messages(bob) == ["What is the capital of Germany?"]


def test_stop_ends_a_long_answer(new_page):
    page = new_page()
    send(page, "Write a long essay about the history of Rome.")
    page.wait_for_function(
        """() => { const m = document.querySelectorAll('#chatbot [data-testid="bot"]');
                   return m.length && m[m.length - 1].innerText.split(/\\s+/).length >= 8; }""",
        timeout=ANSWER_TIMEOUT_MS,
    )
    page.locator("#stop").click()
    page.wait_for_function(  # a loaded machine may take a while to hand the page its last event
        "() => document.querySelector('#chatbot [data-testid=status-tracker]').classList.contains('hide')",
        timeout=ANSWER_TIMEOUT_MS,
    )
    stopped = bot_messages(page)[-1]
    assert stopped.strip()
    # the session is free again at once, and the stopped answer no longer grows
    assert "Paris" in ask(page, "What is the capital of France?")
    assert bot_messages(page)[0] == stopped
    assert len(stopped.split()) < 40  # well short of the 60 tokens it was allowed


def wait_until(condition, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_stop_clear_and_leaving_cancel_the_engine_request(browser, demo_checkpoint):
    """The page built in this process, so the engine can be watched: nothing keeps generating for nobody."""
    from qwen.chat_backend import ChatBackend
    from qwen.loading import load_model_and_tokenizer
    from qwen.webui import Defaults, WebChat, build_demo

    model, tokenizer = load_model_and_tokenizer(str(demo_checkpoint))
    backend = ChatBackend.from_model(model, tokenizer)
    engine = backend.engine.start()
    chat = WebChat(backend, defaults=Defaults(temperature=0, max_new_tokens=400))
    demo = build_demo(chat, concurrency=2)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
                        quiet=True)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        for leave in (lambda: page.locator("#stop").click(), lambda: page.locator("#clear").click(), page.close):
            send(page, "Write a long essay about the history of Rome.")
            assert wait_until(lambda: engine.num_running == 1)
            leave()
            assert wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0 and not chat._running)
    finally:
        context.close()
        demo.close()
        engine.shutdown()
