"""Decode-step attention on the CPU, every layer of a model once, by implementation: our op `qwen::decode_attention`
(qwen/cpu_kernels.cpp, what the engine decodes with), the two matrix products around mask and softmax compiled by
inductor (what the compiled decode step fused before it, and still does where the kernels cannot be built), and
torch.sum over the same keys and values (one plain read of them: the bound).

Keys and values are views of a cache laid out as the engine's ([slots, kv heads, capacity, head dim], the first
`width` columns of `rows` slots), fp32, one query a row, the model's head shapes. Prints milliseconds per step (all
layers), the rate the cache is read at, and ours / inductor and ours / read bound per (rows, width). The
implementations alternate in every round, so load from elsewhere hits all alike; results are checked equal first.

    python -m bench.attention_bench [-c CHECKPOINT] [--rows 1 8] [--widths 130 300 1000] [--runs 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.linear_bench import kernel_bench_model

IMPLEMENTATIONS = ("ours", "inductor", "read")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint-path", default=None, help="default: the offline demo model")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="requests decoded at once")
    parser.add_argument("--widths", type=int, nargs="+", default=[130, 300, 1000], help="columns each row sees")
    parser.add_argument("--runs", type=int, default=15, help="rounds (each times every implementation once)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args()


def head_shapes(config) -> tuple[int, int, int, int]:
    """(layers, query heads, kv heads, head dim) of a QWen or transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "kv_channels", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, kv_heads, dim


def fused_attention(query, key, value, mask, scale):
    """softmax(q K^T * scale + mask) V for one query a row -> [n, 1, heads, D] (grouped heads repeated)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    return ((query @ key.transpose(2, 3) * scale + mask).softmax(-1) @ value).transpose(1, 2)


def attention_steps(query, views, mask, scale, inductor) -> dict:
    """Each implementation's pass over every layer's (keys, values) view, by name."""
    return {
        "ours": lambda: [torch.ops.qwen.decode_attention(query, k, v, mask, scale) for k, v in views],
        "inductor": lambda: [inductor(query, k, v, mask, scale) for k, v in views],
        "read": lambda: [(k.sum(), v.sum()) for k, v in views],
    }


def main():
    args = parse_args()
    layers, heads, kv_heads, dim = head_shapes(kernel_bench_model(args.checkpoint_path, args.threads).config)
    scale = dim**-0.5
    inductor = torch.compile(fused_attention, dynamic=False)
    print(f"{layers} layers, {heads} query heads, {kv_heads} kv heads of {dim}, fp32, threads={torch.get_num_threads()}")
    capacity = max(args.widths) + 64
    cache = [torch.randn(2, max(args.rows), kv_heads, capacity, dim).unbind(0) for _ in range(layers)]  # (k, v)
    with torch.inference_mode():
        for rows in args.rows:
            query = torch.randn(rows, heads, 1, dim)
            for width in args.widths:
                views = [(k[:rows, :, :width], v[:rows, :, :width]) for k, v in cache]
                mask = torch.zeros(rows, 1, 1, width)
                step = attention_steps(query, views, mask, scale, inductor)
                difference = (step["ours"]()[0] - step["inductor"]()[0]).abs().max().item()
                if difference > 1e-4:
                    raise SystemExit(f"ours and inductor's attention disagree (max difference {difference:.1e})")
                times = {name: [] for name in IMPLEMENTATIONS}
                for _ in range(args.runs + 1):  # the first round warms up
                    for name in IMPLEMENTATIONS:
                        start = time.perf_counter()
                        step[name]()
                        times[name].append(time.perf_counter() - start)
                cache_bytes = 2 * layers * rows * kv_heads * width * dim * 4
                median = {name: statistics.median(times[name][1:]) for name in IMPLEMENTATIONS}
                for name in IMPLEMENTATIONS:
                    print(f"rows {rows} width {width:5d}  {name:8s} {median[name] * 1e3:7.2f} ms "
                          f"({cache_bytes / median[name] / 1e9:5.1f} GB/s of keys and values)")  # fmt: skip
                print(f"rows {rows} width {width:5d}  ours / inductor {median['inductor'] / median['ours']:.2f}x, "
                      f"ours / read bound {median['read'] / median['ours']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
