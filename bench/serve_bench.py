"""Throughput of openai_api.py: aggregate tokens/s with 8 concurrent streaming clients vs 1, and time to first token,
optionally against another OpenAI-compatible server (vLLM) driven with the same load in the same run.

Starts the real server (the offline demo model unless -c is given) as a subprocess, or uses --url. Every client
streams a chat completion (greedy, --max-tokens, `ignore_eos` for servers that know it) through the `openai`
client; tokens are counted from the final usage chunk. Prints tokens/s for 1 and N clients, their ratio (target
>= 5x), p50/p95 TTFT and the server's peak memory; with --peer, the same for the peer and ours / peer per round
(rounds interleaved: ours 1, peer 1, ours N, peer N, ...), so load from elsewhere on the machine hits both alike.
With --peer-pid, the server not being measured is paused (SIGSTOP, then SIGCONT), so neither pays for the other
idling (vLLM's engine loop keeps a third of a core busy while idle).

    python -m bench.serve_bench [-c CHECKPOINT] [--clients 8] [--max-tokens 128] [--rounds 3] [--url URL]
                                [--peer http://127.0.0.1:8001 --peer-name vLLM --peer-pid PID] [--plot FILE.png]
"""

import argparse
import asyncio
import contextlib
import os
import signal
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
def running_server(checkpoint: str | None, threads: int | None, server_args: list[str]):
    """An openai_api.py child serving on a free port: yields (URL, pid); stopped on any exit, Ctrl-C included."""
    port = free_port()
    command = [sys.executable, str(REPO / "openai_api.py"), "--server-port", str(port), "--max-batch-size", "16"]
    if checkpoint:
        command += ["-c", checkpoint]
    if threads is not None:
        command += ["--threads", str(threads)]
    command += server_args
    env = dict(os.environ)
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
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (vLLM runs several processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo += children.get(current, [])
    return tree


def process_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat ("T": stopped), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def peak_memory(pid: int) -> int:
    """Peak resident bytes (VmHWM) of process `pid` and all its descendants."""
    total = 0
    for current in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


@contextlib.contextmanager
def paused(pids: list[int]):
    """The servers `pids` (with their children) stopped for the duration: an idle server's background threads
    (vLLM's engine loop polls while idle) would otherwise take CPU from the server being measured."""
    stopped = [p for pid in pids for p in process_tree(pid)]
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(process_state(p) not in ("T", "gone") for p in stopped):
        time.sleep(0.01)  # the signal is delivered asynchronously
    try:
        yield
    finally:
        for p in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


async def served_model(url: str) -> str:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0) as client:
        return (await client.models.list()).data[0].id


async def one_stream(client: openai.AsyncOpenAI, model: str, topic: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first content chunk) of one streamed request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"Write a long, detailed story about {topic}."}],
        extra_body={"ignore_eos": True},  # vLLM: exactly max_tokens tokens; servers without it ignore the field
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else time.perf_counter() - start


async def run_round(url: str, model: str, clients: int, max_tokens: int, offset: int) -> tuple[float, list[float], int]:
    """(aggregate tokens/s, TTFTs, requests that stopped short of max_tokens) of `clients` requests started together."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(client, model, TOPICS[(offset + i) % len(TOPICS)], max_tokens) for i in range(clients))
        )
        elapsed = time.perf_counter() - start
    short = sum(tokens < max_tokens for tokens, _ in results)
    return sum(tokens for tokens, _ in results) / elapsed, [ttft for _, ttft in results], short


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(name: str, rounds: dict[int, list], memory: int | None) -> dict[int, float]:
    """Print one line per client count; return the median aggregate tokens/s per client count."""
    speed = {}
    for clients, results in rounds.items():
        rates = [tokens_per_s for tokens_per_s, _, _ in results]
        speed[clients] = statistics.median(rates)
        ttfts = [t for _, round_ttfts, _ in results for t in round_ttfts]
        short = sum(s for _, _, s in results)
        print(f"{name:>8} {clients:2d} client(s): {speed[clients]:6.1f} tokens/s (median; {min(rates):.1f}-"
              f"{max(rates):.1f})  TTFT p50 {percentile(ttfts, 50) * 1000:5.0f} ms  p95 "
              f"{percentile(ttfts, 95) * 1000:5.0f} ms" + (f"  ({short} ended early)" if short else ""))
    many = max(rounds)
    line = f"{name:>8} scaling {many} / 1 client: {speed[many] / speed[1]:.2f}x (target >= 5x)"
    print(line + (f"   peak memory {memory / 2**30:.2f} GiB" if memory else ""))
    return speed


def plot(path: str, names: list[str], speeds: list[dict[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(speeds[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, speed) in enumerate(zip(names, speeds, strict=True)):
        ax.bar([j + 0.4 * i for j in range(len(counts))], [speed[c] for c in counts], 0.4, label=name)
    ax.set_xticks([j + 0.2 * (len(names) - 1) for j in range(len(counts))], [f"{c} client(s)" for c in counts])
    ax.set_ylabel("aggregate tokens/s (median)")
    ax.set_title("serve_bench: same load, same run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint-path", default=None, help="default: the offline demo model")
    parser.add_argument("--url", default=None, help="bench a running server instead of starting one")
    parser.add_argument("--peer", default=None, metavar="URL", help="also drive this OpenAI-compatible server")
    parser.add_argument("--peer-name", default="peer", help="its name in the report (e.g. vLLM)")
    parser.add_argument("--peer-pid", type=int, default=None, help="its process id, to report its peak memory")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="--threads of the started server")
    parser.add_argument("--server-arg", action="append", default=[], help="another flag for openai_api.py")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart of the results")
    parser.add_argument("--no-pause", action="store_true",
                        help="leave the other server running while one is measured (default: with --peer-pid, "
                             "each server is paused with SIGSTOP while the other is measured)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.url:
            ours, pid = args.url, None
        else:
            ours, pid = stack.enter_context(running_server(args.checkpoint_path, args.threads, args.server_arg))
        servers = {"ours": ours} | ({args.peer_name: args.peer} if args.peer else {})
        models = {name: asyncio.run(served_model(url)) for name, url in servers.items()}
        for name, url in servers.items():  # warm-up
            asyncio.run(run_round(url, models[name], 1, 4, 0))
        rounds = {name: {1: [], args.clients: []} for name in servers}
        pids = {"ours": pid, args.peer_name: args.peer_pid} if args.peer and not args.no_pause else {}
        pausing = bool(pids) and None not in pids.values()
        for r in range(args.rounds):  # interleaved, so a change in machine load hits every case alike
            for clients in (1, args.clients):
                for name, url in servers.items():
                    others = [p for other, p in pids.items() if other != name] if pausing else []
                    with paused(others):
                        result = asyncio.run(run_round(url, models[name], clients, args.max_tokens, r * clients))
                    rounds[name][clients].append(result)
        print(f"{args.max_tokens} tokens per request, greedy, {args.rounds} interleaved rounds"
              + (", the other server paused (SIGSTOP) while one is measured" if pausing else ""))
        memory = {"ours": peak_memory(pid) if pid else None, args.peer_name: None}
        if args.peer_pid:
            memory[args.peer_name] = peak_memory(args.peer_pid)
        speeds = {name: summarize(name, rounds[name], memory[name]) for name in servers}
        if args.peer:
            for clients in (1, args.clients):
                ratios = [a[0] / b[0] for a, b in zip(rounds["ours"][clients], rounds[args.peer_name][clients],
                                                       strict=True)]
                print(f"ours / {args.peer_name}, {clients} client(s): {statistics.median(ratios):.2f}x (per round "
                      f"{min(ratios):.2f}-{max(ratios):.2f})")
            if memory["ours"] and memory[args.peer_name]:
                print(f"peak memory ours / {args.peer_name}: {memory['ours'] / memory[args.peer_name]:.2f}")
        if args.plot:
            plot(args.plot, list(speeds), list(speeds.values()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server child was stopped on the way out
        sys.exit(130)
