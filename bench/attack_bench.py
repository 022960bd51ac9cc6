"""The API server under the attacks of README "Running it safely", each against loopback only, bounded in count and
time; prints one line per attack. The server is openai_api.py's serve() on the tests' scripted model (its output
is known, so only the server is measured), in a process limited to 1,024 open files.

    python -m bench.attack_bench            # about two minutes
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SERVE = """
import json, sys
sys.path.insert(0, "tests")
from conftest import ScriptedLM
from qwen.serving import create_app, serve
from qwen.tokenization_qwen import QWenTokenizer
tokenizer = QWenTokenizer()
app = create_app(ScriptedLM(tokenizer, delay=0.02), tokenizer, model_names=["s"], max_context=8192)
serve(app, port=int(sys.argv[1]))
"""
FD_LIMIT = 1024
CHAT = {"model": "s", "messages": [{"role": "user", "content": "Count to ten."}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(fn) -> tuple[object, float]:
    started = time.perf_counter()
    try:
        result = fn()
    except httpx.HTTPError as exc:
        result = type(exc).__name__
    return result, time.perf_counter() - started


def health(url: str, timeout: float = 5) -> tuple[object, float]:
    return timed(lambda: httpx.get(url + "/health", timeout=timeout).status_code)


def fd_exhaustion(url: str, port: int) -> str:
    sockets = []
    for _ in range(1100):  # more than the fd limit; half send an unfinished request line (slow loris)
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        sockets.append(sock)
    time.sleep(1)
    for sock in sockets[::2]:
        try:
            sock.send(b"GET / HTTP/1.1\r\nX: ")
        except OSError:
            pass
    answers = [health(url) for _ in range(4) if not time.sleep(1)]
    for sock in sockets:
        sock.close()
    ok = sum(status == 200 for status, _ in answers)
    return f"1,100 idle/slow sockets, fd limit {FD_LIMIT}: /health {ok}/4 answered, slowest {max(t for _, t in answers):.2f} s"


def cross_site(url: str, port: int) -> str:
    plain = httpx.post(url + "/v1/chat/completions", content=json.dumps(CHAT), timeout=30,
                       headers={"Content-Type": "text/plain", "Origin": "https://evil.example"}).status_code
    rebound = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30,
                         headers={"Host": f"evil.example:{port}"}).status_code
    return f"text/plain POST from a foreign Origin: {plain}; foreign Host header: {rebound}"


def head_of_line(url: str) -> str:
    big = json.dumps({"model": "s", "messages": [{"role": "user", "content": "word " * 700_000}]})  # 3.5 MB
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        bigs = [pool.submit(timed, lambda: httpx.post(url + "/v1/chat/completions", content=big, timeout=120,
                                                      headers={"Content-Type": "application/json"}).status_code)
                for _ in range(4)]
        time.sleep(0.2)
        small = pool.submit(timed, lambda: httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=120).status_code)
        small_status, small_s = small.result()
        big_results = [f.result() for f in bigs]
    statuses = sorted({s for s, _ in big_results})
    return (f"4 x 3.5 MB chats then a short one: short {small_status} in {small_s:.2f} s; big ones {statuses} in "
            f"{min(t for _, t in big_results):.2f}-{max(t for _, t in big_results):.2f} s")


def json_keys(url: str) -> str:
    keys = 4 * 2**20 // 13
    body = ("{" + ",".join(f'"k{i:07d}":1' for i in range(keys)) + "}").encode()[: 4 * 2**20 - 64]
    body = body[: body.rfind(b",")] + b"}"
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        posts = [pool.submit(lambda: httpx.post(url + "/v1/chat/completions", content=body, timeout=120,
                                                headers={"Content-Type": "application/json"}).status_code)
                 for _ in range(6)]
        waits = []
        while not all(p.done() for p in posts):
            waits.append(health(url)[1])
        statuses = sorted({p.result() for p in posts})
    return (f"6 x {len(body) / 2**20:.1f} MiB bodies of {keys:,} keys at once: {statuses}; /health slowest "
            f"{max(waits):.2f} s over {len(waits)} probes")


def backpressure(url: str, port: int, server_pid: int) -> str:
    def rss() -> float:
        return int(Path(f"/proc/{server_pid}/statm").read_text().split()[1]) * 4096 / 2**20

    before = rss()
    body = json.dumps({"model": "s", "messages": [{"role": "user", "content": "Count forever."}], "stream": True,
                       "max_tokens": 4000, "logprobs": True, "top_logprobs": 5}).encode()
    readers = []
    for _ in range(8):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        readers.append(sock)
    started = time.perf_counter()
    time.sleep(2)
    while httpx.get(url + "/health", timeout=10).json()["running"] and time.perf_counter() - started < 150:
        time.sleep(0.5)
    freed = time.perf_counter() - started
    running = httpx.get(url + "/health", timeout=10).json()["running"]
    for sock in readers:
        sock.close()
    return (f"8 streams never read: {8 - running}/8 slots freed after {freed:.0f} s (--stall-timeout 30 + the "
            f"buffers' fill), server RSS +{rss() - before:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT)))
        try:
            deadline = time.monotonic() + 120
            while health(url, 2)[0] != 200:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.3)
            for line in (fd_exhaustion(url, port), cross_site(url, port), head_of_line(url), json_keys(url),
                         backpressure(url, port, process.pid)):
                print(line, flush=True)
        finally:
            process.terminate()
            process.wait(30)
        log.seek(0)
        text = log.read()
        lines = text.count(b"\n")
        print(f"server log: {lines:,} lines, {len(text):,} bytes, {text.count(b'Traceback')} tracebacks, "
              f"{text.count(b'Too many open files')} 'Too many open files'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
