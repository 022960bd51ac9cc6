"""Fine-tuning throughput: our collation (packing; also plain dynamic padding) vs the original finetune.py's
(every sample right-padded to model_max_length), same model, optimizer and samples.

The samples are a realistic SFT length mix: lengths drawn log-normally (median 160 tokens, sigma 0.9 — most
chat samples are short, a few long), clipped to [24, model_max_length]; the last 60% of each sample is the
supervised answer. Each variant trains the same randomly initialised QWen model (full fine-tuning, torch AdamW)
on the same batches in its own process, so peak memory is its own. Supervised tokens/s and peak memory are
printed with the ratio ours / original, and plotted to a PNG.

--method lora (the default, as finetune_lora_ds.sh: a -Chat model, LoRA with the original's defaults r=64,
alpha=16 on c_attn / c_proj / w1 / w2, embedding and output layer frozen) or full (every weight, torch AdamW, as
finetune_ds.sh). Under full fine-tuning of a small model the AdamW update of Qwen's 151,936-row embedding and
output layer is a fixed cost per step that no collation changes, which hides the difference on a CPU.

    python -m bench.finetune_bench                                      # small model, LoRA, fp32, CPU
    python -m bench.finetune_bench --method full                        # full fine-tuning
    python -m bench.finetune_bench --shape 1.8b --device cuda --dtype bfloat16   # Qwen-1.8B's shape on a GPU
"""

import argparse
import multiprocessing
import random
import resource
import sys
import time
from queue import Empty

import torch

SHAPES = {  # hidden, layers, heads, intermediate (config.json: twice the MLP width)
    "tiny": (64, 1, 4, 256),  # for checking that the bench runs
    "small": (256, 4, 4, 1376),
    "1.8b": (2048, 24, 16, 11008),  # Qwen-1.8B
}
VARIANTS = ("original", "padding", "packing")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--vocab-size", type=int, default=151936, help="Qwen's (the output layer is a large cost)")
    parser.add_argument("--model-max-length", type=int, default=512, help="the launchers' default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--plot", default="finetune_bench.png", help="PNG of the results ('' for none)")
    return parser.parse_args(argv)


def make_samples(count: int, max_len: int, seed: int, vocab: int):
    from qwen.sft import IGNORE_INDEX, Sample

    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        length = int(min(max(rng.lognormvariate(5.075, 0.9), 24), max_len))  # e^5.075 = 160
        ids = [rng.randrange(vocab - 1) for _ in range(length)]  # the last id pads
        answer = int(length * 0.4)
        samples.append(Sample(ids, [IGNORE_INDEX] * answer + ids[answer:]))
    return samples


def pad_like_original(sample, max_len: int, pad_id: int) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, attention_mask) as the original collated every sample: right-padded with
    <|endoftext|> to `max_len`, and the mask `ids != <|endoftext|>` (which also hid real ones)."""
    from qwen.sft import IGNORE_INDEX

    pad = max_len - len(sample.input_ids)
    ids = sample.input_ids + [pad_id] * pad
    labels = sample.labels + [IGNORE_INDEX] * pad
    return ids, labels, [int(token != pad_id) for token in ids]


def collate(variant: str, samples, max_len: int, pad_id: int) -> dict:
    from qwen.sft import SFTCollator

    if variant == "original":
        rows = [pad_like_original(sample, max_len, pad_id) for sample in samples]
        return {key: torch.tensor([row[i] for row in rows]) for i, key in
                enumerate(("input_ids", "labels", "attention_mask"))}
    features = [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]
    return SFTCollator(pad_id=pad_id, packing=variant == "packing")(features)


def run_variant(variant: str, args, queue) -> None:
    from qwen.configuration_qwen import QWenConfig
    from qwen.modeling_qwen import QWenLMHeadModel
    from qwen.scripts import quiet_libraries

    quiet_libraries()  # a fresh process: keep library deprecation notes out of the report
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if args.device == "cuda" else torch.float32
    hidden, layers, heads, intermediate = SHAPES[args.shape]
    config = QWenConfig(
        vocab_size=args.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        kv_channels=hidden // heads, intermediate_size=intermediate, seq_length=8192, use_cache=False,
    )
    torch.manual_seed(args.seed)
    model = QWenLMHeadModel(config).to(device=args.device, dtype=dtype).train()
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        from qwen.sft import LoraArguments

        defaults = LoraArguments()  # finetune.py's defaults, the original's
        model = get_peft_model(model, LoraConfig(
            r=defaults.lora_r, lora_alpha=defaults.lora_alpha, lora_dropout=defaults.lora_dropout,
            target_modules=defaults.lora_target_modules, task_type="CAUSAL_LM",
        ))  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    samples = make_samples(args.batch_size * (args.steps + 1), args.model_max_length, args.seed, args.vocab_size)
    batches = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    supervised, tokens, seconds = 0, 0, 0.0
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step, batch_samples in enumerate(batches):
        batch = collate(variant, batch_samples, args.model_max_length, pad_id=args.vocab_size - 1)
        batch = {key: value.to(args.device) for key, value in batch.items()}
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        # The original's model computes the output layer at every position; finetune.py's training steps, only
        # where a label is supervised.
        loss = model(**batch, skip_logits=variant != "original").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step:  # step 0 warms up
            seconds += time.perf_counter() - start
            supervised += sum(s.supervised_tokens for s in batch_samples)
            tokens += batch["input_ids"].numel()
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    queue.put({"variant": variant, "supervised_per_s": supervised / seconds, "row_tokens": tokens,
               "supervised": supervised, "peak_gib": peak / 2**30, "loss": loss.item()})


def plot(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(results)
    speed.bar(names, [results[n]["supervised_per_s"] for n in names], color=["#999", "#7aa6d6", "#2b6cb0"])
    speed.set_title("supervised tokens / s (higher is better)")
    memory.bar(names, [results[n]["peak_gib"] for n in names], color=["#999", "#7aa6d6", "#2b6cb0"])
    memory.set_title("peak memory, GiB (lower is better)")
    fig.suptitle(f"{args.method} fine-tuning, {args.shape} model, {args.device}, model_max_length {args.model_max_length}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


def main(argv=None) -> None:
    args = parse_args(argv)
    context = multiprocessing.get_context("spawn")  # each variant in a fresh process: its own peak memory
    results = {}
    for variant in VARIANTS:
        queue = context.Queue()
        process = context.Process(target=run_variant, args=(variant, args, queue))
        process.start()
        while True:  # a variant that dies (e.g. killed for memory) must not leave us waiting forever
            try:
                results[variant] = queue.get(timeout=5)
                break
            except Empty:
                if not process.is_alive():
                    sys.exit(f"the {variant} variant died (exit code {process.exitcode}; killed for memory?): "
                             "try a smaller --batch-size or --model-max-length")
        process.join()
    samples = make_samples(args.batch_size * (args.steps + 1), args.model_max_length, args.seed, args.vocab_size)
    lengths = sorted(len(s.input_ids) for s in samples)
    print(f"{args.shape} model, {args.method} fine-tuning on {args.device}, {args.batch_size} samples per step, "
          f"{args.steps} timed steps; "
          f"sample lengths min {lengths[0]} / median {lengths[len(lengths) // 2]} / max {lengths[-1]}, "
          f"model_max_length {args.model_max_length}")
    print(f"{'collation':<10} {'supervised tok/s':>17} {'tokens computed':>16} {'peak GiB':>9}")
    for name, r in results.items():
        print(f"{name:<10} {r['supervised_per_s']:>17.1f} {r['row_tokens']:>16} {r['peak_gib']:>9.2f}")
    base = results["original"]
    for name in ("padding", "packing"):
        r = results[name]
        print(f"{name} vs original: {r['supervised_per_s'] / base['supervised_per_s']:.2f}x supervised tokens/s, "
              f"{r['peak_gib'] / base['peak_gib']:.2f}x peak memory")
    if args.plot:
        plot(results, args)


if __name__ == "__main__":
    main()
