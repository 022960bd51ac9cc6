"""Batch-1 speed, our QWenLMHeadModel vs transformers' Qwen2ForCausalLM on the same weights: greedy decoding
(tokens/s of generate()) and prefill (prompt tokens/s of one forward over --prefill-tokens).

Both models get the same random QWen weights (converted for Qwen2 with qwen.weights.qwen_to_qwen2), the same
dtype, device, prompt and number of new tokens; runs alternate between the two and the median is reported. Ours
runs as the scripts run it: on the CPU with its linear weights packed (qwen.packed_linear: our blocked kernel in fp32;
`--weight-layout plain` to compare the plain layout); transformers' as it comes.

    python -m bench.decode_bench                       # ~190M params, fp32 on CPU (bf16 on CUDA)
    python -m bench.decode_bench --device cuda --dtype bfloat16 --new-tokens 256

It also prints the memory-bandwidth bound of batch-1 decoding: the bytes of weights a step reads, over the faster
read rate of one large torch.mv or torch.sum on the same device, threads and dtype, and how close each model comes
to it.
"""

import argparse
import statistics
import time

import torch
from transformers import Qwen2ForCausalLM

from qwen.configuration_qwen import QWenConfig
from qwen.modeling_qwen import QWenLMHeadModel
from qwen.packed_linear import pack_linear_weights
from qwen.weights import qwen_to_qwen2


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, else fp32)")
    # Qwen-1.8B's shape (2048 hidden, 24 layers, 16 heads, MLP 5504) scaled down
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--mlp-width", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--weight-layout", choices=("packed", "plain"), default="packed",
                        help="ours on the CPU: linear weights packed (as the scripts) or plain")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def read_bandwidth(device: str, dtype: torch.dtype, megabytes: int = 256, runs: int = 5) -> tuple[float, str]:
    """The faster read rate of `megabytes` of weights by one op, with its name: torch.mv (the work of a batch-1 step)
    or torch.sum (a plain streaming read: on a CPU mv reads well below memory speed, and our blocked kernel above
    mv's rate, so mv alone would understate the bound). Medians of `runs` each."""
    columns = 4096
    rows = megabytes * 2**20 // (columns * torch.finfo(dtype).bits // 8)
    matrix = torch.randn(rows, columns, device=device, dtype=dtype)
    vector = torch.randn(columns, device=device, dtype=dtype)
    rates = {}
    for name, read in (("torch.mv", lambda: torch.mv(matrix, vector)), ("torch.sum", lambda: matrix.sum())):
        times = []
        for _ in range(runs + 1):  # the first touches the pages
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            read()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rates[name] = matrix.numel() * matrix.element_size() / statistics.median(times[1:])
    name = max(rates, key=rates.get)
    return rates[name], name


def decode_step_bytes(model) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter once, except the input embedding (one row of it
    is read), whose matrix does count where the output layer shares it. Before packing: packed weights are not
    parameters."""
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding or p is output)


def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> float:
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / (time.perf_counter() - start)


def prefill_tokens_per_second(model, prompt: torch.Tensor) -> float:
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(prompt, logits_to_keep=1)  # what generate() and the engine ask for: the last position's logits
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return prompt.shape[1] / (time.perf_counter() - start)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if args.device == "cuda" else torch.float32
    head_dim = args.hidden_size // args.heads
    config = QWenConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, kv_channels=head_dim, intermediate_size=2 * args.mlp_width,
        seq_length=8192, max_position_embeddings=8192,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = QWenLMHeadModel(config).eval()
    qwen2_config, state_dict = qwen_to_qwen2(config, ours.state_dict())
    peer = Qwen2ForCausalLM(qwen2_config).eval()
    peer.load_state_dict(state_dict, strict=False)
    ours, peer = ours.to(args.device, dtype), peer.to(args.device, dtype)
    for model in (ours, peer):
        model.generation_config.eos_token_id = None  # decode exactly --new-tokens
    params = sum(p.numel() for p in ours.parameters()) / 1e6  # before packing: packed weights are not parameters
    step_bytes = decode_step_bytes(ours)
    layout = "plain"
    if args.weight_layout == "packed" and pack_linear_weights(ours):
        layout = "packed"

    print(f"{params:.0f}M params, {dtype}, {args.device}, threads={torch.get_num_threads()}, "
          f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, prefill {args.prefill_tokens}, batch 1; "
          f"ours with {layout} linear weights")  # fmt: skip
    prompt = torch.randint(1, args.vocab_size, (1, args.prompt_tokens), device=args.device)
    with torch.inference_mode():
        # Same weights, same function (sanity check of the comparison). Logits, not greedy ids: random weights give
        # near-ties that summation order alone can flip.
        difference = (ours(prompt).logits.float() - peer(prompt).logits.float()).abs().max().item()
        tolerance = 1e-3 if dtype == torch.float32 else 5e-2
        if difference > tolerance:
            raise SystemExit(f"the two models disagree (max logit difference {difference:.1e} > {tolerance}): "
                             "the comparison would be meaningless")
        print(f"same function: max logit difference {difference:.1e}")
        long_prompt = torch.randint(1, args.vocab_size, (1, args.prefill_tokens), device=args.device)
        models = {"QWenLMHeadModel": ours, "Qwen2ForCausalLM": peer}
        speeds = {(phase, name): [] for phase in ("decode", "prefill") for name in models}
        for _ in range(args.runs):  # alternate, so that machine load hits both alike
            for name, model in models.items():
                speeds["decode", name].append(tokens_per_second(model, prompt, args.new_tokens))
                speeds["prefill", name].append(prefill_tokens_per_second(model, long_prompt))
    medians = {key: statistics.median(values) for key, values in speeds.items()}
    for (phase, name), value in medians.items():
        print(f"{phase:7s} {name:18s} {value:8.1f} tokens/s (median of {args.runs}; runs: "
              f"{', '.join(f'{v:.1f}' for v in speeds[phase, name])})")  # fmt: skip
    for phase in ("decode", "prefill"):
        ratio = medians[phase, "QWenLMHeadModel"] / medians[phase, "Qwen2ForCausalLM"]
        print(f"{phase} ratio QWenLMHeadModel / Qwen2ForCausalLM: {ratio:.2f}x")
    bandwidth, measured_by = read_bandwidth(args.device, dtype)
    bound = bandwidth / step_bytes
    print(f"bandwidth bound: {step_bytes / 1e6:.0f} MB of weights read per decode step at {bandwidth / 1e9:.1f} GB/s "
          f"({measured_by}) = {bound:.1f} tokens/s; decode reaches QWenLMHeadModel "
          f"{medians['decode', 'QWenLMHeadModel'] / bound:.0%}, Qwen2ForCausalLM "
          f"{medians['decode', 'Qwen2ForCausalLM'] / bound:.0%} of it")  # fmt: skip


if __name__ == "__main__":
    main()
