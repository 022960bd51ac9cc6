"""Our engine against vLLM's offline engine (`vllm.LLM.generate`): the same prompt ids, no HTTP in between.

Runs our engine in this process as the servers run it (packed weights, the compiled decode step, measured once it
is compiled) and vLLM's `LLM` in a child process of the given python (the `to-qwen2` export of the same checkpoint,
fp32, every CPU bound to its OpenMP threads, as serve_bench starts it). Both get the same chat prompts (token ids
built by our ChatML code), greedy, --max-tokens each with ignore_eos, 1 and --clients at once, in interleaved
rounds; vLLM's processes are paused (SIGSTOP) while ours is measured. Prints tokens/s, ours / vLLM per round, the
settings vLLM is started with and the binding it reports in its log, and both engines at 1 prompt against the
memory bound (the weights a step reads over decode_bench's read rate).

With --context N each prompt is instead N random token ids, new ones every round (no prefix cache, ours or
vLLM's, can serve them), and each round also times a 1-token run on other new prompts of that length: the bench
prints the cold prefill's time and the decode rate apart ((max-tokens - 1) tokens a prompt over the time the full
run took beyond the prefill).

Set beside serve_bench (same load through each one's OpenAI server), it says how much each server's HTTP side
costs its engine.

    python -m bench.offline_bench --peer-vllm /tmp/vllm-venv/bin/python [-c CHECKPOINT] [--clients 8]
                                  [--max-tokens 128] [--rounds 3] [--context N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openmp_wait import spin_briefly

spin_briefly()  # before torch loads OpenMP, as the servers do

from bench.serve_bench import (  # noqa: E402
    TOPICS,
    describe_vllm_start,
    paused,
    require_vllm,
    vllm_binding,
    vllm_environment,
)

# Runs in vLLM's environment: reads one JSON request a line ({"prompts": [[ids]], "max_tokens": N}), answers one
# line "@@ " + JSON ({"seconds", "tokens"}; vLLM prints on stdout too). In a file, not `-c`: vLLM starts its engine
# process with multiprocessing spawn.
VLLM_DRIVER = """
import json, sys, time
from vllm import LLM, SamplingParams

def main():
    llm = LLM(sys.argv[1], dtype="float32", max_model_len=2048, max_num_seqs=16)
    print("@@", json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        params = SamplingParams(max_tokens=request["max_tokens"], temperature=0, ignore_eos=True)
        prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        print("@@", json.dumps({"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}),
              flush=True)

if __name__ == "__main__":
    main()
"""


class VLLMOffline:
    """vLLM's `LLM` on `model` in a child process of `python`: generate(prompts, max_tokens) -> (s, tokens)."""

    def __init__(self, python: str, model: Path, workdir: Path):
        driver, self.log = workdir / "vllm_driver.py", workdir / "vllm.log"
        driver.write_text(VLLM_DRIVER)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([python, str(driver), str(model)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
                                            env={**os.environ, **vllm_environment("all", python)})  # fmt: skip
        try:
            self._read()  # {"ready": true} once the model is loaded
        except BaseException:  # its engine process outlives a failed start otherwise
            self.close()
            raise

    def _read(self) -> dict:
        while line := self.process.stdout.readline():
            if line.startswith("@@ "):
                return json.loads(line[3:])
            with open(self.log, "a") as log:  # vLLM logs on stdout: its binding report among them
                log.write(line)
        sys.exit(f"Error: vLLM stopped; its log: {self.log}\n" + self.log.read_text(errors="replace")[-2000:])

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        self.process.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        return answer["seconds"], answer["tokens"]

    def close(self) -> None:
        """Stop the driver and every process vLLM started (the driver's session is their process group)."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGCONT)  # a paused process cannot act on its closed input
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # an engine process that outlived the driver
        self.process.wait()


def fresh_prompts(rng: random.Random, n: int, length: int, vocabulary: int) -> list[list[int]]:
    """n prompts of `length` random ids (past the first 1,000: no special tokens)."""
    return [[rng.randrange(1000, vocabulary) for _ in range(length)] for _ in range(n)]


def ours_generate(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    from qwen.sampling import SamplingParams

    start = time.perf_counter()
    handles = [engine.submit(ids, SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True))
               for ids in prompts]  # fmt: skip
    tokens = sum(len(handle.result()[0]) for handle in handles)
    return time.perf_counter() - start, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint-path", default=None, help="default: the offline demo model")
    parser.add_argument("--peer-vllm", required=True, metavar="PYTHON", help="the python of an environment with vLLM")
    parser.add_argument("--clients", type=int, default=8, help="prompts generated at once (default 8)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="our engine's threads (default: the servers')")
    parser.add_argument("--no-compile", action="store_true", help="our eager decode step instead of the compiled one")
    parser.add_argument("--context", type=int, default=0, metavar="N",
                        help="prompts of N random ids, new every round; prints prefill and decode apart")
    args = parser.parse_args()
    require_vllm(args.peer_vllm)

    import torch

    from bench.decode_bench import decode_step_bytes, read_bandwidth
    from qwen.chat_backend import ChatBackend
    from qwen.demo import demo_checkpoint
    from qwen.export import export_qwen2
    from qwen.loading import load_model_and_tokenizer
    from qwen.packed_linear import pack_linear_weights
    from qwen.scripts import default_engine_threads
    from qwen_generation_utils import DEFAULT_SYSTEM

    threads = args.threads or default_engine_threads()
    torch.set_num_threads(1)  # as the servers, before loading: one OpenMP team, the engine thread's (prepare_server)
    source = Path(args.checkpoint_path) if args.checkpoint_path else demo_checkpoint()
    model, tokenizer = load_model_and_tokenizer(str(source), cpu_only=True)
    weight_bytes = decode_step_bytes(model)
    pack_linear_weights(model)
    backend = ChatBackend.from_model(model, tokenizer, max_batch_size=args.clients, threads=threads,
                                     compile_decode=not args.no_compile)  # fmt: skip
    engine = backend.engine.start()
    # the prompts serve_bench's clients send, as the API server builds them (no system message: the default one)
    prompts = [backend.chat_prompt(f"Write a long, detailed story about {topic}.", [], DEFAULT_SYSTEM)
               for topic in TOPICS]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="offline-bench-") as tmp:
        export = export_qwen2(source, Path(tmp) / "qwen2")
        started = time.perf_counter()
        vllm = VLLMOffline(args.peer_vllm, export, Path(tmp))
        try:
            print(f"vLLM ready in {time.perf_counter() - started:.0f} s; started with "
                  f"{describe_vllm_start('all', args.peer_vllm)}; its log says: {vllm_binding(vllm.log)}", flush=True)
            while engine.decode_step == "compiling":
                time.sleep(1)
            print(f"ours: {threads} threads, decode step {engine.decode_step}", flush=True)
            generate = {"ours": functools.partial(ours_generate, engine), "vLLM": vllm.generate}
            runs = {name: functools.partial(run, max_tokens=args.max_tokens) for name, run in generate.items()}
            rates = {(name, n): [] for name in runs for n in (1, args.clients)}
            prefills = {key: [] for key in rates}
            others = {"ours": [vllm.process.pid], "vLLM": []}  # paused while each runs (our engine idles by itself)
            for name, run in runs.items():  # warm-up
                with paused(others[name]):
                    run(prompts[:2])
            rng = random.Random(0)
            for r in range(args.rounds):
                for n in (1, args.clients):
                    batch = [prompts[(r * n + i) % len(prompts)] for i in range(n)]
                    if args.context:  # new prompts each round, the same for both: a cold prefill, then a generation
                        cold, batch = (fresh_prompts(rng, n, args.context, len(tokenizer)) for _ in range(2))
                    for name, run in runs.items():
                        with paused(others[name]):
                            if args.context:
                                prefill, _ = generate[name](cold, 1)
                                seconds, tokens = run(batch)
                                seconds, tokens = seconds - prefill, tokens - n
                                prefills[name, n].append(prefill)
                            else:
                                seconds, tokens = run(batch)
                        rates[name, n].append(tokens / seconds)
                    print(f"round {r + 1}, {n} prompt(s): " + ", ".join(
                        f"{name} {rates[name, n][-1]:.1f}" for name in runs) + " tokens/s" + ("" if not args.context
                        else " decoding; prefill " + ", ".join(f"{name} {prefills[name, n][-1]:.2f} s" for name in runs)),
                        flush=True)  # fmt: skip
        finally:
            vllm.close()
            engine.shutdown()
    print(f"{args.max_tokens} tokens per prompt, greedy, ignore_eos, {args.rounds} interleaved rounds, vLLM paused "
          "while ours runs" + (f"; prompts of {args.context} random ids, decode rates (prefill timed apart)"
                               if args.context else ""))
    for n in (1, args.clients):
        ratios = [a / b for a, b in zip(rates["ours", n], rates["vLLM", n], strict=True)]
        print(f"{n} prompt(s): ours {statistics.median(rates['ours', n]):.1f}, vLLM "
              f"{statistics.median(rates['vLLM', n]):.1f} tokens/s (medians): ours / vLLM "
              f"{statistics.median(ratios):.2f}x (per round {min(ratios):.2f}-{max(ratios):.2f})")
        if args.context:
            print(f"  cold prefill of {n} x {args.context} tokens: ours {statistics.median(prefills['ours', n]):.2f} s, "
                  f"vLLM {statistics.median(prefills['vLLM', n]):.2f} s (medians)")
    torch.set_num_threads(threads)  # the engine's threads, vLLM gone
    bandwidth, measured_by = read_bandwidth("cpu", torch.float32)
    bound = bandwidth / weight_bytes
    print(f"1 prompt against the memory bound ({weight_bytes / 1e6:.0f} MB of weights a step at "
          f"{bandwidth / 1e9:.1f} GB/s, {measured_by}: {bound:.1f} tokens/s): ours "
          f"{statistics.median(rates['ours', 1]) / bound:.0%}, vLLM {statistics.median(rates['vLLM', 1]) / bound:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
