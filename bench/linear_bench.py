"""The matrix products of a decode step by weight layout: our blocked kernel (qwen/cpu_kernels.cpp), oneDNN's packed
layout (what torch.compile's freezing pass and vLLM's CPU build use) and the plain layout (F.linear), over every
linear layer of a model in order, at 1 and 8 rows (decoding 1 and 8 requests) and 128 (a prefill chunk).

Prints milliseconds per pass over all layers, the rate the weights are read at, blocked / oneDNN and blocked / plain
per row count, and the machine's fastest single-op read of 256 MB (torch.mv or torch.sum, as decode_bench's bound).
Layouts alternate in every round, so load from elsewhere hits all alike; outputs are checked equal first.

    python -m bench.linear_bench [-c CHECKPOINT] [--rows 1 8 128] [--runs 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bench.decode_bench import read_bandwidth
from qwen.cpu_kernels import cpu_kernels
from qwen.loading import load_model_and_tokenizer
from qwen.packed_linear import PackedLinear

LAYOUTS = ("blocked", "onednn", "plain")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint-path", default=None, help="default: the offline demo model (fp32)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 128])
    parser.add_argument("--runs", type=int, default=7, help="rounds (each times every layout once)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args()


def one_pass_seconds(layers: list[nn.Module], inputs: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for layer, x in zip(layers, inputs, strict=True):
        layer(x)
    return time.perf_counter() - start


def kernel_bench_model(checkpoint_path: str | None, threads: int | None) -> nn.Module:
    """The fp32 model a bench of our CPU kernels reads its shapes from, on `threads` torch threads; exits with a
    message where the kernels cannot be built here."""
    if threads:
        torch.set_num_threads(threads)
    if cpu_kernels() is None:
        raise SystemExit("our CPU kernels are not available here (the warning above says why): nothing to compare")
    return load_model_and_tokenizer(checkpoint_path, cpu_only=True, dtype="fp32")[0]


def main():
    args = parse_args()
    model = kernel_bench_model(args.checkpoint_path, args.threads)
    plain = [m for m in model.modules() if type(m) is nn.Linear]
    layers = {"plain": plain, **{layout: [PackedLinear(m, layout) for m in plain] for layout in LAYOUTS[:2]}}
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in plain)
    print(f"{len(plain)} linear layers, {weight_bytes / 1e6:.0f} MB of fp32 weights, threads={torch.get_num_threads()}")
    medians = {}
    with torch.inference_mode():
        x = torch.randn(3, plain[0].in_features)
        for layout in LAYOUTS[:2]:
            difference = (layers[layout][0](x) - plain[0](x)).abs().max().item()
            if difference > 1e-4:
                raise SystemExit(f"{layout} disagrees with the plain layer (max difference {difference:.1e})")
        for rows in args.rows:
            inputs = [torch.randn(rows, m.in_features) for m in plain]
            times = {layout: [] for layout in LAYOUTS}
            for _ in range(args.runs + 1):  # the first round warms up
                for layout in LAYOUTS:
                    times[layout].append(one_pass_seconds(layers[layout], inputs))
            for layout in LAYOUTS:
                medians[rows, layout] = statistics.median(times[layout][1:])
                print(f"rows {rows:4d}  {layout:8s} {medians[rows, layout] * 1e3:8.2f} ms "
                      f"({weight_bytes / medians[rows, layout] / 1e9:5.1f} GB/s of weights)")  # fmt: skip
            print(f"rows {rows:4d}  blocked / oneDNN {medians[rows, 'onednn'] / medians[rows, 'blocked']:.2f}x, "
                  f"blocked / plain {medians[rows, 'plain'] / medians[rows, 'blocked']:.2f}x")  # fmt: skip
    bandwidth, measured_by = read_bandwidth("cpu", torch.float32)
    print(f"read bound: {bandwidth / 1e9:.1f} GB/s ({measured_by} over 256 MB) = "
          f"{weight_bytes / bandwidth * 1e3:.2f} ms for these weights")  # fmt: skip


if __name__ == "__main__":
    main()
