"""Quality, speed and memory of the demo model as fp32, with the int8 KV cache, and as GPTQ Int8 / Int4.

The demo model is quantized with the real run_gptq.py (calibration: bench/data/quant_calibration.json; the
quantized copies are kept in --work-dir and reused). Each variant is then measured in its own process, so peak
memory (max RSS) is its own: perplexity over bench/data/quant_text.txt, greedy decode tokens/s, and the bytes
the KV cache holds after decoding. Ratios are against fp32 measured in the same run; a PNG plot is written.

    python -m bench.quant_bench                     # needs requirements-gptq.txt; minutes on a laptop CPU
    python -m bench.quant_bench --variants fp32 int8-kv
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "data"
VARIANTS = ("fp32", "int8-kv", "gptq-int8", "gptq-int4")
BITS = {"gptq-int8": 8, "gptq-int4": 4}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--work-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "qwen-quant-bench"))
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu (fp32), or cuda (bf16/fp16, GPT-QModel's GPU kernels)")
    parser.add_argument("--plot", default="quant_bench.png")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child mode: one variant
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- child: one variant ----


def measure(args) -> dict:
    import torch
    from transformers import DynamicCache

    from qwen.compat import cache_kwargs
    from qwen.kv_cache import Int8KVCache, cache_nbytes
    from qwen.loading import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    int8_kv = args.measure == "int8-kv"
    on_cpu = args.device == "cpu"
    model, tokenizer = load_model_and_tokenizer(args.checkpoint, dtype="fp32" if on_cpu else "auto",
                                                device=args.device, use_cache_quantization=int8_kv)

    def new_cache():
        return Int8KVCache() if int8_kv else DynamicCache()

    ids = torch.tensor([tokenizer.encode((DATA / "quant_text.txt").read_text(encoding="utf-8"))], device=model.device)
    with torch.no_grad():  # the cache is used even in one pass: attention reads what the int8 cache stores
        logits = model(ids, use_cache=True, **cache_kwargs(new_cache())).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    prompt = ids[:, : args.prompt_tokens]
    greedy = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  repetition_penalty=1.0)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up (GPT-QModel compiles its kernel)
        cache = new_cache()
        start = time.perf_counter()
        out = model.generate(prompt, **greedy, **cache_kwargs(cache))
        seconds = time.perf_counter() - start
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {
        "variant": args.measure,
        "device": args.device,
        "perplexity": math.exp(nll.item()),
        "eval_tokens": ids.shape[1],
        "decode_tokens_per_s": args.new_tokens / seconds,
        "kv_cache_bytes": cache_nbytes(cache),
        "weight_bytes": weight_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": 0 if on_cpu else torch.cuda.max_memory_allocated(),
        "greedy_ids": out[0, prompt.shape[1]:].tolist(),
    }


# ---- parent ----


def quantized_copy(source: Path, work_dir: Path, bits: int) -> Path:
    out = work_dir / f"{source.name}-Int{bits}"
    if (out / "config.json").is_file():
        return out
    print(f"quantizing {source.name} to Int{bits} with run_gptq.py ...", file=sys.stderr)
    subprocess.run(
        [sys.executable, "run_gptq.py", "--model_name_or_path", str(source), "--out_path", str(out),
         "--data_path", str(DATA / "quant_calibration.json"), "--bits", str(bits), "--max_len", "512"],
        cwd=REPO, check=True,
    )
    return out


def run_variant(args, variant: str, checkpoint: Path) -> dict:
    command = [sys.executable, "-m", "bench.quant_bench", "--measure", variant, "--checkpoint", str(checkpoint),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += ["--device", args.device]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(results: list[dict], plot: str) -> None:
    base = next((r for r in results if r["variant"] == "fp32"), results[0])
    print(f"\nDemo model on {results[0]['device']}; ratios against {base['variant']} measured in this run\n")
    print(f"{'variant':<10} {'perplexity':>10} {'vs fp32':>8} {'tokens/s':>9} {'vs fp32':>8} {'weights MB':>10} "
          f"{'KV cache KB':>11} {'vs fp32':>8} {'peak RSS MB':>11} {'same greedy ids':>15}")
    for r in results:
        same = sum(a == b for a, b in zip(r["greedy_ids"], base["greedy_ids"], strict=True))
        print(f"{r['variant']:<10} {r['perplexity']:>10.3f} {r['perplexity'] / base['perplexity'] - 1:>+8.2%} "
              f"{r['decode_tokens_per_s']:>9.1f} {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:>7.2f}x "
              f"{r['weight_bytes'] / 2**20:>10.1f} {r['kv_cache_bytes'] / 1024:>11.1f} "
              f"{r['kv_cache_bytes'] / base['kv_cache_bytes']:>7.1%} {r['peak_rss_bytes'] / 2**20:>11.0f} "
              f"{same:>8}/{len(base['greedy_ids'])}"
              + (f"  peak GPU {r['peak_gpu_bytes'] / 2**20:.0f} MB" if r["peak_gpu_bytes"] else ""))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for axis, key, title in zip(
        axes, ("perplexity", "decode_tokens_per_s", "peak_rss_bytes"),
        ("perplexity (lower is better)", "decode tokens/s", "peak RSS (MB)"), strict=True,
    ):
        values = [r[key] / (2**20 if key == "peak_rss_bytes" else 1) for r in results]
        axis.bar(names, values, color=["#777", "#4a8", "#48c", "#c84"][: len(names)])
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=20)
    fig.suptitle("Quantization on the demo model (CPU)")
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
    print(f"\nplot: {plot}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args)))
        return
    from qwen.demo import demo_checkpoint

    source = demo_checkpoint()
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants:
        checkpoint = quantized_copy(source, work_dir, BITS[variant]) if variant in BITS else source
        results.append(run_variant(args, variant, checkpoint))
        print(f"{variant}: done", file=sys.stderr)
    report(results, args.plot)


if __name__ == "__main__":
    main()
