"""The API server under connection-level and cross-site abuse, through real sockets: idle and slow connections,
aborted uploads, a server at its fd limit, foreign pages and host names, huge prompts queued ahead of small ones,
and clients that never read their stream. Only loopback addresses are used; counts and times are bounded."""

import asyncio
import json
import resource
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from conftest import REPO, ScriptedLM, ServerThread, free_port

from qwen.serving import create_app
from qwen.serving.app import server_config
from qwen.serving.guard import ConnectionLimits
from qwen.serving.server import PreparationLane
from qwen.tokenization_qwen import QWenTokenizer

CHAT = {"model": "s", "messages": [{"role": "user", "content": "Count to ten."}]}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def tokenizer():
    return QWenTokenizer()


class GuardedServer(ServerThread):
    """ServerThread with the settings openai_api.py serves with (qwen.serving.app.server_config)."""

    def __init__(self, app):
        super().__init__(app)
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, "warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def wait_for(condition, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


# ------------------------------------------------------------------ connections, fds, aborted uploads

SERVE = """
import json, sys
sys.path.insert(0, "tests")
from conftest import ScriptedLM
from qwen.serving import create_app, serve
from qwen.serving.guard import ConnectionLimits
from qwen.tokenization_qwen import QWenTokenizer
tokenizer = QWenTokenizer()
app = create_app(ScriptedLM(tokenizer), tokenizer, model_names=["s"], limits=ConnectionLimits(**json.loads(sys.argv[2])))
serve(app, port=int(sys.argv[1]))
"""
FD_LIMIT = 256


@pytest.fixture()
def fd_limited_server(tmp_path):
    """openai_api.py's serve() in a process allowed FD_LIMIT open files; yields (url, log path)."""
    port, log_path = free_port(), tmp_path / "server.log"

    def limit_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", SERVE, str(port), json.dumps({"header_timeout": 2})],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_fds)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: process.poll() is None and _answers(url), 120), log_path.read_text()[-3000:]
        yield url, log_path
    finally:
        process.terminate()
        process.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def idle_sockets(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        if first_bytes:
            sock.sendall(first_bytes)
        sockets.append(sock)
    return sockets


def test_idle_and_slow_connections_cannot_exhaust_fds_or_flood_the_log(fd_limited_server):
    """More idle / slow-loris connections than the process has fds: /health still answers, the idle ones are
    closed after the header timeout, and the log does not grow a line per refused accept."""
    url, log_path = fd_limited_server
    port = int(url.rsplit(":", 1)[1])
    attackers = idle_sockets(port, FD_LIMIT // 2) + idle_sockets(port, FD_LIMIT // 2, b"GET /health HTTP/1.1\r\nX: ")
    try:
        for _ in range(3):
            assert httpx.get(url + "/health", timeout=10).status_code == 200
        # an idle connection is closed by the server (EOF or reset), not kept forever
        probe = attackers[-1]
        probe.settimeout(30)
        try:
            assert probe.recv(1) == b""
        except ConnectionResetError:
            pass
    finally:
        for sock in attackers:
            sock.close()
    log = log_path.read_text()
    assert log.count("Too many open files") <= 3 and "Traceback" not in log, log[-3000:]


def test_aborted_uploads_are_not_server_errors(fd_limited_server):
    url, log_path = fd_limited_server
    port = int(url.rsplit(":", 1)[1])
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    for sock in idle_sockets(port, 20, head + b'{"model": "s", "messages": [' + b" " * 1000):
        sock.close()
    assert wait_for(lambda: _answers(url))
    time.sleep(1)  # the server notices the disconnects
    log = log_path.read_text()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]


# ------------------------------------------------------------------------------ who may call the server


@pytest.fixture(scope="module")
def scripted(tokenizer):
    model = ScriptedLM(tokenizer)
    app = create_app(model, tokenizer, model_names=["s"], max_context=1024)
    with ServerThread(app) as server:
        server.model = model
        yield server


def test_a_foreign_page_cannot_use_the_server(scripted):
    """A text/plain POST needs no CORS preflight, so any page could send one; it must not run the model."""
    seen = len(scripted.model.prompts)
    evil = {"Origin": "https://evil.example"}
    plain = httpx.post(scripted.url + "/v1/chat/completions", content=json.dumps(CHAT),
                       headers={**evil, "Content-Type": "text/plain"}, timeout=30)
    as_json = httpx.post(scripted.url + "/v1/chat/completions", json=CHAT, headers=evil, timeout=30)
    form = httpx.post(scripted.url + "/v1/completions", data={"model": "s", "prompt": "hi"}, timeout=30)
    assert (plain.status_code, as_json.status_code, form.status_code) == (403, 403, 415)
    assert as_json.json()["error"]["code"] == "origin_not_allowed"
    assert "--allowed-origins https://evil.example" in as_json.json()["error"]["message"]
    assert len(scripted.model.prompts) == seen  # nothing reached the model
    own = httpx.post(scripted.url + "/v1/chat/completions", json=CHAT, headers={"Origin": scripted.url}, timeout=30)
    assert own.status_code == 200


def test_foreign_host_names_are_refused(scripted, tokenizer):
    """DNS rebinding: a page's own name resolving to 127.0.0.1 reaches the server with its Host header."""
    port = scripted.port
    rebound = httpx.post(scripted.url + "/v1/chat/completions", json=CHAT, headers={"Host": f"evil.example:{port}"},
                         timeout=30)
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(scripted.url + "/health", headers={"Host": "evil.example"}).status_code == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(scripted.url + "/health", headers={"Host": host}).status_code == 200
    app = create_app(ScriptedLM(tokenizer), tokenizer, model_names=["s"], allowed_hosts=["api.example"])
    with ServerThread(app) as server:
        assert httpx.get(server.url + "/health", headers={"Host": "api.example:80"}).status_code == 200
        assert httpx.get(server.url + "/health", headers={"Host": "evil.example"}).status_code == 400


# ------------------------------------------------------------------------------- head-of-line waiting


def test_a_prompt_far_over_the_context_is_refused_before_tokenizing(scripted):
    """3.5 MB of text needs at least 3.5 MB / (longest token) tokens: refused from that bound, not after
    seconds of tokenizing it (an 8 MB one took 11-43 s to refuse, and everything queued behind it)."""
    huge = {"model": "s", "messages": [{"role": "user", "content": "word " * 700_000}]}
    refused = httpx.post(scripted.url + "/v1/chat/completions", json=huge, timeout=60)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and "at least" in error["message"]
    prompt = httpx.post(scripted.url + "/v1/completions", json={"model": "s", "prompt": "x" * 3_000_000}, timeout=60)
    assert prompt.status_code == 400 and "at least" in prompt.json()["error"]["message"]


def test_the_preparation_lane_serves_small_requests_first():
    lane_order: list[str] = []
    gate = threading.Event()

    async def scenario():
        lane = PreparationLane()
        blocker = asyncio.ensure_future(lane.run(10, gate.wait))
        await asyncio.sleep(0.1)  # the lane is busy with the blocker
        big = [asyncio.ensure_future(lane.run(8_000_000, lane_order.append, f"big{i}")) for i in range(4)]
        await asyncio.sleep(0.05)
        small = asyncio.ensure_future(lane.run(200, lane_order.append, "small"))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocker, small, *big)
        lane.close()

    asyncio.run(scenario())
    assert lane_order == ["small", "big0", "big1", "big2", "big3"]


# -------------------------------------------------------------------------------------- backpressure


def test_a_stream_nobody_reads_is_dropped_and_frees_its_slot(tokenizer):
    """A client that never reads its stream: within a few kilobytes its writes block; after the stall timeout
    the stream is dropped, which stops its generation (it would run about a minute) and closes the socket."""
    app = create_app(ScriptedLM(tokenizer, delay=0.05), tokenizer, model_names=["s"],
                     limits=ConnectionLimits(stall_timeout=1.0))
    engine = app.state.server.engine
    with GuardedServer(app) as server:
        body = json.dumps({"model": "s", "messages": [{"role": "user", "content": "Count forever."}],
                           "stream": True, "max_tokens": 1500, "logprobs": True, "top_logprobs": 5}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            assert wait_for(lambda: engine.num_running == 1, 30)
            assert wait_for(lambda: engine.num_running == 0, 30), "the unread stream kept generating"
            assert httpx.get(server.url + "/health", timeout=10).json()["running"] == 0
            sock.settimeout(10)
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
            assert b"data: [DONE]" not in received  # cut, not finished
        finally:
            sock.close()
