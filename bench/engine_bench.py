"""Aggregate throughput of qwen.engine: 8 concurrent streams vs 1, and 1 stream vs model.generate.

A random ~135M-parameter model (Llama shaped like SmolLM-135M, or --arch qwen for a QWen of the same size),
greedy, every request generating exactly --new-tokens tokens. Each case also runs with 1 new token (prefill
only); the difference is the decode phase, reported apart from the end-to-end rate. Times are the best of
--repeats interleaved runs, in wall seconds and in CPU seconds of this process (steadier on a shared CPU).

    python -m bench.engine_bench [--arch llama|qwen] [--streams 8] [--new-tokens 64] [--threads 2] [--repeats 3]
                                 [--dtype float32|bfloat16] [--contexts 100,4000]

--contexts measures instead how one stream's decode cost grows with its context: ms per decode step after prompts
of each length, for the engine (slot cache, written in place) and a forward loop on a DynamicCache (concatenated
per token, as generate()), timed after the prefill (--new-tokens steps).
"""

import argparse
import random
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from qwen.compat import cache_kwargs
from qwen.engine import Engine, SamplingParams
from qwen.packed_linear import pack_linear_weights

QWEN_SHAPES = {  # random QWen models: ~135M (the CPU default), and Qwen-1.8B's shape (the GPU suite)
    "qwen": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, kv_channels=64,
                 intermediate_size=4096, seq_length=2048),
    "qwen-1.8b": dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                      kv_channels=128, intermediate_size=11008, seq_length=8192),
}  # fmt: skip


def build_model(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    if arch in QWEN_SHAPES:
        from qwen.configuration_qwen import QWenConfig
        from qwen.modeling_qwen import QWenLMHeadModel

        with torch.device(device):
            return QWenLMHeadModel(QWenConfig(**QWEN_SHAPES[arch])).to(dtype).eval()
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn(); CPU time is steadier on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> None:
    handles = [engine.submit(p, SamplingParams(max_new_tokens=new_tokens, temperature=0)) for p in prompts]
    assert all(len(h.result()[0]) == new_tokens for h in handles)


def run_generate(model, prompt: list[int], new_tokens: int) -> None:
    with torch.inference_mode():
        model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)


def engine_step_ms(model, prompt: list[int], steps: int) -> float:
    """ms per decode step of one stream in the engine, timed after its prompt is in the cache."""
    engine = Engine(model, max_batch_size=1)
    engine.submit(prompt, SamplingParams(max_new_tokens=steps + 2, temperature=0))
    with torch.inference_mode():
        while not (engine._rows and engine._rows[0].decoding):
            engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
    return (time.perf_counter() - start) / steps * 1000


def dynamic_cache_step_ms(model, prompt: list[int], steps: int) -> float:
    """The same with a plain forward loop on a DynamicCache (what generate() does), timed after the prefill."""
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        token = model(torch.tensor([prompt]), use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps * 1000


def context_growth(model, contexts: list[int], steps: int, repeats: int) -> None:
    vocab = model.config.vocab_size
    rng = random.Random(1)
    prompts = {c: [rng.randrange(vocab) for _ in range(c)] for c in contexts}
    cases = {"engine": engine_step_ms, "DynamicCache": dynamic_cache_step_ms}
    best = {(name, c): float("inf") for name in cases for c in contexts}
    for _ in range(repeats):  # interleaved
        for name, c in best:
            best[name, c] = min(best[name, c], cases[name](model, prompts[c], steps))
    print(f"decode ms/token of one stream by context ({steps} steps timed after the prefill, best of {repeats})")
    for name in cases:
        row = "  ".join(f"{c:>5}: {best[name, c]:6.1f}" for c in contexts)
        print(f"{name:12} {row}   growth {contexts[-1]}/{contexts[0]}: "
              f"{best[name, contexts[-1]] / best[name, contexts[0]]:.2f}x")
    for c in contexts:
        print(f"engine / DynamicCache speed at {c}: {best['DynamicCache', c] / best['engine', c]:.2f}x")


def profile_decode(model, streams: int, steps: int, prompt_tokens: int) -> None:
    """Where one decode step's time goes at `streams` rows: torch.profiler's CPU op totals over `steps` engine
    steps, grouped as matrix products (the weights), attention, other ops, and Python/framework time (the step's
    wall time no op accounts for)."""
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(2)
    engine = Engine(model, max_batch_size=streams)
    for _ in range(streams):
        prompt = [rng.randrange(model.config.vocab_size) for _ in range(prompt_tokens)]
        engine.submit(prompt, SamplingParams(max_new_tokens=steps + 8, temperature=0))
    with torch.inference_mode():
        while not all(s.decoding for s in engine._rows) or len(engine._rows) < streams:
            engine.step()
        for _ in range(3):  # warm
            engine.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = (time.perf_counter() - start) / steps * 1e3
    groups = {"matrix products (weights)": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul",
                                            "mkldnn", "onednn", "aten::bmm"),
              "attention": ("scaled_dot_product", "aten::_softmax", "attention"),
              "sampling": ("argmax", "topk", "softmax", "sort", "exponential")}  # fmt: skip
    totals = dict.fromkeys(groups, 0.0) | {"other ops": 0.0}
    # top-level ops only (no double counting of children): events without a parent op
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        name = event.name
        group = next((g for g, keys in groups.items() if any(k in name.lower() for k in keys)), "other ops")
        totals[group] += event.cpu_time_total / 1e3 / steps
    ops = sum(totals.values())
    totals["Python / framework (no op)"] = max(wall - ops, 0.0)
    print(f"decode step at {streams} row(s): {wall:.1f} ms ({steps} steps profiled, {torch.get_num_threads()} threads)")
    for group, ms in totals.items():
        print(f"  {group:28} {ms:6.1f} ms  {ms / wall:4.0%}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=["llama", *QWEN_SHAPES], default="llama")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the GPU suite)")
    parser.add_argument("--checkpoint", default=None, help="a real checkpoint instead of --arch ('demo': the demo model)")
    parser.add_argument("--profile", action="store_true",
                        help="profile --new-tokens decode steps at 1 and --streams rows instead (where the time goes)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--contexts", default=None, help="e.g. 100,4000: decode cost by context length instead")
    parser.add_argument("--weight-layout", choices=("packed", "plain"), default="packed",
                        help="linear weights packed for oneDNN on the CPU (as the scripts run) or plain")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        from qwen.demo import demo_checkpoint
        from qwen.loading import load_model_and_tokenizer

        path = str(demo_checkpoint()) if args.checkpoint == "demo" else args.checkpoint
        model = load_model_and_tokenizer(path, device=args.device, dtype=args.dtype)[0].eval()
        args.arch = path
    else:
        model = build_model(args.arch, args.device, getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())  # before packing: packed weights are not parameters
    if args.weight_layout == "packed":
        pack_linear_weights(model)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.streams)]

    model.generation_config.eos_token_id = None
    n, streams = args.new_tokens, args.streams
    if args.profile:
        print(f"{args.arch}, {n_params / 1e6:.0f}M params, {args.weight_layout} linear weights, {args.dtype}")
        for rows in (1, streams):
            profile_decode(model, rows, n, args.prompt_tokens)
        return
    if args.contexts:
        contexts = [int(c) for c in args.contexts.split(",")]
        if args.arch != "llama":  # stay below seq_length: dynamic NTK would recompute the cache on the way
            model.config.seq_length = max(model.config.seq_length, max(contexts) + 2 * n)  # the engine asks n + 2
        print(f"random {args.arch}, {args.weight_layout} linear weights, {args.threads} torch threads, {args.dtype}")
        context_growth(model, contexts, n, args.repeats)
        return
    engine = Engine(model, max_batch_size=streams).start()
    cases = {  # name -> (streams, run(new_tokens))
        "generate": (1, lambda k: run_generate(model, prompts[0], k)),
        "engine x1": (1, lambda k: run_engine(engine, prompts[:1], k)),
        f"engine x{streams}": (streams, lambda k: run_engine(engine, prompts, k)),
    }
    best = {(name, k): (float("inf"), float("inf")) for name in cases for k in (1, n)}
    run_engine(engine, prompts, 2)  # warm-up
    for _ in range(args.repeats):
        for (name, k), times in best.items():
            best[name, k] = tuple(map(min, times, timed(lambda: cases[name][1](k))))  # noqa: B023
    engine.shutdown()

    print(
        f"random {args.arch}, {n_params / 1e6:.0f}M params ({args.weight_layout} linear weights), {args.device}, "
        f"{args.threads} torch threads, {args.dtype}, "
        f"prompts of {args.prompt_tokens} tokens, {n} new tokens per stream"
    )
    print(f"{'aggregate tokens/s':18} {'end-to-end':>11} {'decode':>8} {'decode per CPU-s':>17}")
    decode = {}
    for name, (count, _) in cases.items():
        (wall_n, cpu_n), (wall_1, cpu_1) = best[name, n], best[name, 1]
        decode[name] = (count * (n - 1) / (wall_n - wall_1), count * (n - 1) / (cpu_n - cpu_1))
        print(f"{name:18} {count * n / wall_n:11.1f} {decode[name][0]:8.1f} {decode[name][1]:17.1f}")
    for a, b in [("engine x1", "generate"), (f"engine x{streams}", "engine x1")]:
        wall, cpu = (x / y for x, y in zip(decode[a], decode[b], strict=True))
        print(f"decode {a} / {b}: {wall:.2f}x (wall), {cpu:.2f}x (CPU time)")


if __name__ == "__main__":
    main()
