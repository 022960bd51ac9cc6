"""Throughput of openai_api.py: aggregate tokens/s with 8 concurrent streaming clients vs 1, and time to first token.

Starts the real server (the offline demo model unless -c is given) as a subprocess, or uses --url. Every client
streams a chat completion (greedy, --max-tokens) through the `openai` client; tokens are counted from the
final usage chunk. Prints tokens/s for 1 and N clients, their ratio (target >= 5x) and p50/p95 TTFT.

    python -m bench.serve_bench [-c CHECKPOINT] [--clients 8] [--max-tokens 64] [--rounds 3] [--url URL]
"""

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a lighthouse", "the moon", "a small robot", "autumn", "a library", "mountains", "a train",
          "a garden", "the desert", "a violin", "winter"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(checkpoint: str | None, threads: int):
    """An openai_api.py child serving on a free port: yields its URL; stopped on any exit, Ctrl-C included."""
    port = free_port()
    command = [sys.executable, str(REPO / "openai_api.py"), "--server-port", str(port), "--max-batch-size", "16"]
    if checkpoint:
        command += ["-c", checkpoint]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # Its own session: a Ctrl-C reaches only us, and we stop it below whatever state it is in.
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                sys.exit(f"openai_api.py exited with {process.returncode}; run it by hand to see why")
            if time.time() > deadline:
                sys.exit("openai_api.py did not come up within 300 s")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def one_stream(client: openai.AsyncOpenAI, topic: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first content chunk) of one streamed request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model="bench", temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"Write a long, detailed story about {topic}."}],
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else time.perf_counter() - start


async def run_round(url: str, clients: int, max_tokens: int, offset: int) -> tuple[float, list[float]]:
    """(aggregate tokens/s, TTFTs) of `clients` requests started together."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(client, TOPICS[(offset + i) % len(TOPICS)], max_tokens) for i in range(clients))
        )
        elapsed = time.perf_counter() - start
    return sum(tokens for tokens, _ in results) / elapsed, [ttft for _, ttft in results]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint-path", default=None, help="default: the offline demo model")
    parser.add_argument("--url", default=None, help="bench a running server instead of starting one")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server (OMP_NUM_THREADS)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(running_server(args.checkpoint_path, args.threads))
        asyncio.run(run_round(url, 1, 4, 0))  # warm-up
        rounds = {1: [], args.clients: []}
        for r in range(args.rounds):  # interleaved, so a change in machine load hits both alike
            for clients in rounds:
                rounds[clients].append(asyncio.run(run_round(url, clients, args.max_tokens, r * clients)))
        speed = {}
        for clients, results in rounds.items():
            speed[clients] = statistics.median(tokens_per_s for tokens_per_s, _ in results)
            ttfts = [t for _, round_ttfts in results for t in round_ttfts]
            print(f"{clients:2d} client(s): {speed[clients]:7.1f} tokens/s aggregate (median of {args.rounds})   "
                  f"TTFT p50 {percentile(ttfts, 50) * 1000:6.0f} ms   p95 {percentile(ttfts, 95) * 1000:6.0f} ms")
        ratio = speed[args.clients] / speed[1]
        print(f"ratio {args.clients} clients / 1 client: {ratio:.2f}x (target >= 5x)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server child was stopped on the way out
        sys.exit(130)
