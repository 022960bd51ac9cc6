"""vLLM serves a QWen checkpoint exported with `to-qwen2`: same greedy answer as ours, and throughput side by side.

Exports the checkpoint (the offline demo model unless -c is given) with qwen.export, starts our openai_api.py
on the original and then vLLM's OpenAI server on the export (never both at once: they would share the CPUs),
asks both the same chat question greedily (the answers must be equal), and measures aggregate tokens/s with 1
and --clients concurrent streaming clients (the peer: our server, measured in the same run). Not part of CI.

vLLM lives in its own virtual environment (see examples/serving_vllm.md); point --vllm-python at its python:

    python -m bench.vllm_bench --vllm-python /path/to/vllm-venv/bin/python [-c CHECKPOINT] [--clients 8]
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

from bench.serve_bench import (
    describe_vllm_start,
    require_vllm,
    run_round,
    running_server,
    running_vllm,
    served_model,
    vllm_binding,
)

QUESTION = "What is the capital of France? Answer in one sentence."


def greedy_answer(url: str, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", timeout=600)
    reply = client.chat.completions.create(
        model=asyncio.run(served_model(url)), temperature=0, max_tokens=max_tokens, messages=[{"role": "user", "content": QUESTION}]
    )
    return reply.choices[0].message.content


def measure(url: str, clients: int, max_tokens: int, rounds: int) -> dict[int, float]:
    """Median aggregate tokens/s for 1 and `clients` concurrent clients (rounds interleaved)."""
    model = asyncio.run(served_model(url))
    asyncio.run(run_round(url, model, 1, 4, 0))  # warm-up
    speeds = {1: [], clients: []}
    for r in range(rounds):
        for n in speeds:
            speeds[n].append(asyncio.run(run_round(url, model, n, max_tokens, r * n))[0])
    return {n: statistics.median(values) for n, values in speeds.items()}


def plot(results: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    names = list(results)
    levels = sorted({n for speeds in results.values() for n in speeds})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(levels))]
        axes.bar(xs, [results[name][n] for n in levels], width, label=name)
    axes.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(levels))], [f"{n} client(s)" for n in levels])
    axes.set_ylabel("aggregate tokens/s")
    axes.set_title("openai_api.py vs vLLM (CPU), same model")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def report(name: str, answer: str, speeds: dict[int, float]) -> None:
    """One server's results, printed as soon as they are measured (a long run keeps what it has)."""
    rates = "   ".join(f"{n} client(s): {speed:.1f} tokens/s" for n, speed in speeds.items())
    print(f"{name}: greedy answer {answer!r}\n{name}: {rates}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint-path", default=None, help="QWen checkpoint (default: the demo model)")
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", sys.executable),
                        help="python of the environment vLLM is installed in (default: $VLLM_PYTHON, else this one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="--threads of our server (default: its own)")
    parser.add_argument("--vllm-binding", choices=["all", "auto"], default="all",
                        help="all: vLLM's OpenMP threads on every CPU, none reserved (default); auto: vLLM's choice")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--plot", default="vllm_bench.png", help="where to save the bar chart")
    args = parser.parse_args()

    require_vllm(args.vllm_python)
    from qwen.demo import demo_checkpoint
    from qwen.export import export_qwen2

    source = Path(args.checkpoint_path) if args.checkpoint_path else demo_checkpoint()
    results, answers = {}, {}
    with tempfile.TemporaryDirectory(prefix="qwen2-export-") as tmp:
        started = time.perf_counter()
        export = export_qwen2(source, Path(tmp) / "qwen2")
        print(f"exported {source} to the Qwen2 layout in {time.perf_counter() - started:.0f} s", flush=True)

        with running_server(str(source), args.threads, []) as (url, _):
            answers["openai_api.py"] = greedy_answer(url, 32)
            results["openai_api.py"] = measure(url, args.clients, args.max_tokens, args.rounds)
        report("openai_api.py", answers["openai_api.py"], results["openai_api.py"])

        started = time.perf_counter()
        log = Path(tmp) / "vllm.log"
        with running_vllm(args.vllm_python, export, args.vllm_binding, log, args.max_model_len) as (url, _):
            print(f"vLLM ready in {time.perf_counter() - started:.0f} s; started with "
                  f"{describe_vllm_start(args.vllm_binding, args.vllm_python)}; its OpenMP binding: "
                  f"{vllm_binding(log)}", flush=True)
            answers["vLLM"] = greedy_answer(url, 32)
            results["vLLM"] = measure(url, args.clients, args.max_tokens, args.rounds)
        report("vLLM", answers["vLLM"], results["vLLM"])

    same = len(set(answers.values())) == 1
    print("greedy answers equal:", "yes" if same else "NO")
    print(f"\n{'aggregate tokens/s':22s}" + "".join(f"{name:>16s}" for name in results) + f"{'vLLM / ours':>14s}")
    for n in (1, args.clients):
        ours, theirs = results["openai_api.py"][n], results["vLLM"][n]
        print(f"{n:2d} client(s){'':11s}{ours:16.1f}{theirs:16.1f}{theirs / ours:13.2f}x")
    plot(results, Path(args.plot))
    print(f"plot: {args.plot}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
