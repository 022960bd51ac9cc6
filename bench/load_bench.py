"""How long it takes to get a ready demo model: our cached QWen checkpoint vs transformers reading the GGUF.

    python -m bench.load_bench [--repeats 3] [--cache-dir DIR]

Peer: transformers' own LlamaForCausalLM + tokenizer loaded from the same SmolLM2 GGUF (it dequantizes on
every load). Target: the cached demo loads in under 5 s on a laptop CPU. Each timing runs in a fresh
process so that nothing (imports, page cache aside) is shared between them.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each snippet prints the seconds from "imports done" to "model and tokenizer ready".
OURS = """
import sys, time, torch
torch.set_num_threads(1)
from qwen.loading import load_model_and_tokenizer
start = time.perf_counter()
load_model_and_tokenizer(sys.argv[1], cpu_only=True)
print(time.perf_counter() - start)
"""
PEER = """
import sys, time, torch
torch.set_num_threads(1)
from qwen.checkpoints import load_llama
start = time.perf_counter()
load_llama(sys.argv[1])
print(time.perf_counter() - start)
"""


def time_in_fresh_process(snippet: str, argument: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-c", snippet, str(argument)], cwd=REPO, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cache-dir", default=None, help="demo cache (default: $QWEN_DEMO_DIR or ~/.cache/qwen/demo)"
    )
    args = parser.parse_args()

    from qwen.demo import demo_checkpoint, demo_gguf

    checkpoint = demo_checkpoint(args.cache_dir)  # prepared (once) outside the timings
    gguf = demo_gguf(args.cache_dir)
    ours = [time_in_fresh_process(OURS, checkpoint) for _ in range(args.repeats)]
    peer = [time_in_fresh_process(PEER, gguf) for _ in range(args.repeats)]
    result = {
        "ours_cached_qwen_s": round(statistics.median(ours), 3),
        "peer_transformers_gguf_s": round(statistics.median(peer), 3),
    }
    result["speedup"] = round(result["peer_transformers_gguf_s"] / result["ours_cached_qwen_s"], 2)
    print(f"load demo model, median of {args.repeats} fresh processes (CPU, fp32):")
    print(
        f"  ours (cached QWen safetensors):              {result['ours_cached_qwen_s']:.2f} s  (target < 5 s)"
    )
    print(f"  peer (transformers LlamaForCausalLM, GGUF):  {result['peer_transformers_gguf_s']:.2f} s")
    print(f"  ratio peer / ours: {result['speedup']:.1f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
