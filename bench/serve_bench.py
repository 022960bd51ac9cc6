"""Throughput of openai_api.py: aggregate tokens/s with 8 concurrent streaming clients vs 1, and time to first token,
optionally against another OpenAI-compatible server (vLLM) driven with the same load in the same run.

Starts the real server (the offline demo model unless -c is given) as a subprocess, or uses --url; a started server
is measured once its decode step is compiled (its default on the CPU; --server-arg=--no-compile: eager). Every client
streams a chat completion (greedy, --max-tokens, `ignore_eos` for servers that know it) through the `openai`
client; tokens are counted from the final usage chunk. Prints tokens/s for 1 and N clients, their ratio (target
>= 5x), p50/p95 TTFT and the server's peak memory; with --peer, the same for the peer and ours / peer per round
(rounds interleaved: ours 1, peer 1, ours N, peer N, ...), so load from elsewhere on the machine hits both alike.
With --peer-pid, the server not being measured is paused (SIGSTOP, then SIGCONT), so neither pays for the other
idling (vLLM's engine loop keeps a third of a core busy while idle).
Start a peer of your own with `setsid` (its own session): where the kernel groups CPU time by session (Linux
autogroup), a peer in the bench's session shares one CPU share with the bench's clients; the bench warns.

With --peer-vllm PYTHON, the bench starts the peer itself: vLLM's OpenAI server (from the environment of that python)
on the `to-qwen2` export of the same checkpoint, fp32, with every CPU bound to its OpenMP threads
(VLLM_CPU_OMP_THREADS_BIND=0-N VLLM_CPU_NUM_OF_RESERVED_CPU=0; --vllm-binding auto leaves vLLM's own choice, which
reserves one CPU for its front end), and prints the binding vLLM reports in its log beside its numbers.

--workload multiturn: each of --clients users holds a --turns-turn conversation, every turn resending the whole
history (what a chat page sends); TTFT and tokens/s over all turns. This is where a prefix cache pays.

    python -m bench.serve_bench [-c CHECKPOINT] [--clients 8] [--max-tokens 128] [--rounds 3] [--url URL]
                                [--peer http://127.0.0.1:8001 --peer-name vLLM --peer-pid PID] [--plot FILE.png]
                                [--peer-vllm /tmp/vllm-venv/bin/python [--vllm-binding all|auto]]
                                [--workload single|multiturn [--turns 6]]
"""

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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



def wait_until_healthy(url: str, process, deadline: float, name: str, hint: str, poll_s: float) -> None:
    """Until `url`/health answers 200; exits with `hint` if the server process ends or `deadline` passes."""
    while True:
        if process.poll() is not None:
            sys.exit(f"{name} exited with {process.returncode}; {hint}")
        if time.time() > deadline:
            sys.exit(f"{name} did not come up in time; {hint}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(poll_s)


def decode_step(url: str) -> str:
    """How our server runs decode steps (/health): "compiled", "compiling", "eager", or "failed"."""
    return httpx.get(url + "/health", timeout=5).json().get("decode_step", "?")


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
        wait_until_healthy(url, process, deadline, "openai_api.py", "run it by hand to see why", poll_s=0.5)
        started = time.perf_counter()
        while (step := decode_step(url)) == "compiling":  # measure the server as it runs once warm
            time.sleep(1)
        print(f"ours: decode step {step} ({time.perf_counter() - started:.0f} s after /health first answered)",
              flush=True)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def require_vllm(python: str) -> None:
    """Exit with one message unless `python` can import vLLM (a path that is no program included)."""
    try:
        found = subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0
    except OSError:
        found = False
    if not found:
        sys.exit(f"Error: `import vllm` fails with {python}: give the python of an environment with vLLM "
                 "(see bench/README.md).")


# What vLLM's CPU install guide asks to preload for its best performance (section "set LD_PRELOAD"; its worker
# warns when either is missing): TCMalloc, from the system, and Intel's OpenMP (x86), from vLLM's environment.
VLLM_PRELOADS = {"libtcmalloc": "apt-get install libtcmalloc-minimal4",
                 "libiomp5": "pip install intel-openmp, in vLLM's environment"}  # fmt: skip


def vllm_preloads(python: str) -> tuple[list[str], list[str]]:
    """(the VLLM_PRELOADS found here, as paths; how to install each one missing)."""
    found, missing = [], []
    listed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout if shutil.which("ldconfig") else ""
    tcmalloc = [line.split("=> ")[-1].strip() for line in listed.splitlines()
                if line.strip().startswith(("libtcmalloc_minimal.so", "libtcmalloc.so")) and "=> " in line]
    found += tcmalloc[:1]
    missing += [] if tcmalloc else [VLLM_PRELOADS["libtcmalloc"]]
    if platform.machine() in ("x86_64", "AMD64"):
        prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
        iomp = Path(prefix.stdout.strip()) / "lib" / "libiomp5.so"
        found += [str(iomp)] if prefix.returncode == 0 and iomp.exists() else []
        missing += [] if iomp.exists() else [VLLM_PRELOADS["libiomp5"]]
    return found, missing


def vllm_environment(binding: str, python: str) -> dict[str, str]:
    """What vLLM's CPU build is started with: the libraries its guide asks to preload (those found), and its threads:
    "all" binds one OpenMP thread to every CPU this process may use and reserves none for the front end; "auto" is
    vLLM's default (it reserves one CPU on a small machine)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    preloads, _ = vllm_preloads(python)
    if preloads:
        env["LD_PRELOAD"] = ":".join([*preloads, *filter(None, [os.environ.get("LD_PRELOAD")])])
    if binding == "all":
        cpus = sorted(os.sched_getaffinity(0))
        env |= {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "OMP_NUM_THREADS": str(len(cpus))}  # fmt: skip
    return env


def describe_vllm_start(binding: str, python: str) -> str:
    """The settings vLLM is started with that decide its speed, on one line, and what its guide asks that is missing."""
    told = {k: v for k, v in vllm_environment(binding, python).items() if k != "HF_HUB_OFFLINE"}
    _, missing = vllm_preloads(python)
    line = " ".join(f"{k}={v}" for k, v in told.items())
    return line + "".join(f"; WITHOUT a library its CPU guide asks to preload ({how})" for how in missing)


def vllm_binding(log: Path) -> str:
    """The effective OpenMP binding vLLM reports in its log ("OpenMP thread binding info"), on one line."""
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if "OpenMP thread binding info" in line:
            found = []
            for part in lines[i + 1 : i + 8]:  # tab-indented lines, each with the same log prefix (or none)
                text = part.split("] ", 1)[1] if part.startswith("(") or "] " in part[:120] else part
                if not text.startswith("\t") or "=" not in text:
                    break
                found.append(text.strip())
            return "; ".join(found) or "(binding not reported)"
    return "(no binding info in the log)"


@contextlib.contextmanager
def running_vllm(python: str, model: Path, binding: str, log: Path, max_model_len: int = 2048):
    """vLLM's OpenAI server on `model` (a child in its own session): yields (URL, pid); it and its engine processes
    are stopped on any exit, Ctrl-C included."""
    port = free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
               "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", str(max_model_len), "--max-num-seqs", "16"]  # fmt: skip
    env = {**os.environ, **vllm_environment(binding, python)}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 900  # the first start compiles the model (minutes on a small CPU)
        wait_until_healthy(url, process, deadline, "vLLM", f"its log: {log}", poll_s=2)
        yield url, process.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
            os.killpg(process.pid, signal.SIGTERM)  # the API server and the engine processes it started
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
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


def shares_our_scheduling_group(pid: int) -> bool:
    """Whether `pid` is in this process's autogroup (/proc/PID/autogroup: one per session where the kernel groups
    CPU time by session). The servers this bench starts run in sessions of their own."""
    try:
        if Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "1":
            return False
        # The whole line, not its first word: processes in init's session share the root group, which reads empty.
        return Path(f"/proc/{pid}/autogroup").read_text().split(" nice")[0] == \
            Path("/proc/self/autogroup").read_text().split(" nice")[0]
    except OSError:
        return False


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


async def one_conversation(client: openai.AsyncOpenAI, model: str, topic: str, turns: int,
                           max_tokens: int) -> list[tuple[int, float]]:
    """(completion tokens, TTFT) of each turn of one user's chat: every turn resends the history so far."""
    messages, results = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Tell me more about {topic}, part {turn + 1}." if turn else
                         f"Write a long, detailed story about {topic}."})  # fmt: skip
        start, first, tokens, text = time.perf_counter(), None, 0, ""
        stream = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            messages=messages, extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.perf_counter() - start
                text += chunk.choices[0].delta.content
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        messages.append({"role": "assistant", "content": text})
        results.append((tokens, first if first is not None else time.perf_counter() - start))
    return results


async def run_conversations(url: str, model: str, users: int, turns: int, max_tokens: int,
                            offset: int) -> tuple[float, list[float], int]:
    """run_round's result for `users` concurrent multi-turn chats: (tokens/s over all turns, TTFTs, short turns)."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        chats = await asyncio.gather(*(one_conversation(client, model, TOPICS[(offset + i) % len(TOPICS)], turns,
                                                        max_tokens) for i in range(users)))  # fmt: skip
        elapsed = time.perf_counter() - start
    results = [turn for chat in chats for turn in chat]
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


def start_vllm_peers(stack: contextlib.ExitStack, args) -> list[tuple[str, str, int]]:
    """Export the checkpoint for vLLM, start one vLLM per --vllm-binding, print the binding each reports:
    [(name, URL, pid)]."""
    from qwen.demo import demo_checkpoint
    from qwen.export import export_qwen2

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-bench-vllm-")))
    source = Path(args.checkpoint_path) if args.checkpoint_path else demo_checkpoint()
    export = export_qwen2(source, tmp / "qwen2")
    peers = []
    for binding in args.vllm_binding:
        started, log = time.perf_counter(), tmp / f"vllm-{binding}.log"
        url, pid = stack.enter_context(running_vllm(args.peer_vllm, export, binding, log))
        print(f"vLLM-{binding} ready in {time.perf_counter() - started:.0f} s; started with "
              f"{describe_vllm_start(binding, args.peer_vllm)}; its log says: {vllm_binding(log)}", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGSTOP)  # no idle polling while the next one starts (resumed when measured)
        peers.append((f"vLLM-{binding}", url, pid))
    for _, _, pid in peers:
        os.killpg(pid, signal.SIGCONT)
    return peers


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
    parser.add_argument("--peer-vllm", default=None, metavar="PYTHON",
                        help="start vLLM (installed in the environment of this python) as the peer, on the to-qwen2 "
                             "export of the checkpoint")
    parser.add_argument("--vllm-binding", choices=["all", "auto"], nargs="+", default=["all"],
                        help="all: vLLM's OpenMP threads bound to every CPU, none reserved (default); auto: vLLM's "
                             "own choice (it reserves a CPU for its front end); both: one vLLM of each, same run")
    parser.add_argument("--workload", choices=["single", "multiturn"], default="single",
                        help="single: one question per client; multiturn: each client a chat of --turns turns")
    parser.add_argument("--turns", type=int, default=6, help="turns per chat of --workload multiturn")
    parser.add_argument("--no-pause", action="store_true",
                        help="leave the other server running while one is measured (default: with --peer-pid, "
                             "each server is paused with SIGSTOP while the other is measured)")
    args = parser.parse_args()
    if args.peer_vllm:
        require_vllm(args.peer_vllm)  # before our server starts

    with contextlib.ExitStack() as stack:
        if args.url:
            ours, pid = args.url, None
        else:
            ours, pid = stack.enter_context(running_server(args.checkpoint_path, args.threads, args.server_arg))
        peers = [(args.peer_name, args.peer, args.peer_pid)] if args.peer else []
        if args.peer_pid and shares_our_scheduling_group(args.peer_pid):
            print(f"warning: {args.peer_name} (pid {args.peer_pid}) runs in this shell's session, so Linux's autogroup "
                  "scheduler gives it and this bench's clients one share of the CPU while ours has a share of its "
                  "own (an identical server measured 0.88x that way); start it with `setsid`", flush=True)
        if args.peer_vllm:
            peers += start_vllm_peers(stack, args)
        servers = {"ours": ours} | {name: url for name, url, _ in peers}
        models = {name: asyncio.run(served_model(url)) for name, url in servers.items()}
        for name, url in servers.items():  # warm-up
            asyncio.run(run_round(url, models[name], 1, 4, 0))
        rounds = {name: {1: [], args.clients: []} for name in servers}
        pids = {"ours": pid} | {name: peer_pid for name, _, peer_pid in peers} if peers and not args.no_pause else {}
        pausing = bool(pids) and None not in pids.values()
        for r in range(args.rounds):  # interleaved, so a change in machine load hits every case alike
            for clients in (1, args.clients):
                for name, url in servers.items():
                    others = [p for other, p in pids.items() if other != name] if pausing else []
                    with paused(others):
                        if args.workload == "multiturn":
                            result = asyncio.run(run_conversations(url, models[name], clients, args.turns,
                                                                   args.max_tokens, r * clients))  # fmt: skip
                        else:
                            result = asyncio.run(run_round(url, models[name], clients, args.max_tokens, r * clients))
                    rounds[name][clients].append(result)
        workload = f"{args.turns}-turn chats resending the history, " if args.workload == "multiturn" else ""
        print(f"{workload}{args.max_tokens} tokens per request, greedy, {args.rounds} interleaved rounds"
              + (", the other server paused (SIGSTOP) while one is measured" if pausing else ""))
        memory = {"ours": peak_memory(pid) if pid else None}
        memory |= {name: peak_memory(peer_pid) if peer_pid else None for name, _, peer_pid in peers}
        speeds = {name: summarize(name, rounds[name], memory[name]) for name in servers}
        for name, _, _ in peers:
            for clients in (1, args.clients):
                ratios = [a[0] / b[0] for a, b in zip(rounds["ours"][clients], rounds[name][clients], strict=True)]
                ttft = [percentile([t for _, ts, _ in rounds[server][clients] for t in ts], 50) for server in ("ours", name)]
                print(f"ours / {name}, {clients} client(s): {statistics.median(ratios):.2f}x (per round "
                      f"{min(ratios):.2f}-{max(ratios):.2f}); TTFT p50 ours / {name}: {ttft[0] / ttft[1]:.2f}")
            if memory["ours"] and memory[name]:
                print(f"peak memory ours / {name}: {memory['ours'] / memory[name]:.2f}")
        if args.plot:
            plot(args.plot, list(speeds), list(speeds.values()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server child was stopped on the way out
        sys.exit(130)
