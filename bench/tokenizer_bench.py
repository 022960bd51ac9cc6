"""Encode speed of QWenTokenizer vs transformers' Qwen2TokenizerFast built from the same vocabulary.

    python -m bench.tokenizer_bench [--mb 10] [--doc-kb 8]

Both tokenizers get the same ~10 MB of mixed English / Chinese / code / emoji text, split into documents, and
must produce identical ids. The peer is built offline from qwen.tiktoken with transformers' tiktoken converter
(byte-level vocab + merges derived from the ranks) and Qwen's pre-tokenization regex. Prints MB/s and ratios.
Single-threaded encode loops are the main comparison; the batched `tokenizer(docs)` call is shown as well.
"""

import argparse
import os
import random
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the HF batch call would otherwise use every core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import Qwen2TokenizerFast  # noqa: E402
from transformers.convert_slow_tokenizer import TikTokenConverter  # noqa: E402

from qwen.tokenization_qwen import PAT_STR, SPECIAL_TOKENS, QWenTokenizer, default_vocab_file  # noqa: E402


def corpus(n_bytes: int, doc_bytes: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    english = "The quick brown fox jumps over the lazy dog while the model streams its answer. ".split()
    chinese = "通义千问是阿里云研发的大语言模型，今天天气很好，我们一起去公园散步吧。"
    code = [
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n\tprint(i)\n",
        "x = {'k': [1, 2, 3]}\n",
    ]
    makers = [
        lambda: " ".join(rng.choices(english, k=rng.randint(5, 30))) + ". ",
        lambda: "".join(rng.sample(chinese, rng.randint(5, 30))) + "。",
        lambda: rng.choice(code),
        lambda: "".join(chr(rng.randint(0x1F600, 0x1F64F)) for _ in range(rng.randint(1, 4))) + " ",
        lambda: f"{rng.randint(0, 10**9)} items at {rng.random():.4f}\n",
        lambda: "\n\n   \t",
    ]
    weights = [40, 30, 10, 5, 10, 5]
    docs, size = [], 0
    while size < n_bytes:
        parts, doc_size = [], 0
        while doc_size < doc_bytes:
            part = rng.choices(makers, weights)[0]()
            parts.append(part)
            doc_size += len(part.encode("utf-8"))
        docs.append("".join(parts))
        size += doc_size
    return docs


def qwen2_fast_from_tiktoken(vocab_file: str) -> Qwen2TokenizerFast:
    vocab, merges = TikTokenConverter(vocab_file=vocab_file, pattern=PAT_STR).extract_vocab_merges_from_model(
        vocab_file
    )
    fast = Qwen2TokenizerFast(vocab=vocab, merges=merges)
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    assert [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(SPECIAL_TOKENS.values())
    return fast


def timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=10.0, help="corpus size in MB")
    parser.add_argument("--doc-kb", type=float, default=8.0, help="document size in KB")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings")
    args = parser.parse_args()

    docs = corpus(int(args.mb * 2**20), int(args.doc_kb * 2**10))
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 2**20
    vocab_file = default_vocab_file()

    start = time.perf_counter()
    qwen = QWenTokenizer(vocab_file=vocab_file)
    print(f"QWenTokenizer load: {time.perf_counter() - start:.2f}s")
    start = time.perf_counter()
    peer = qwen2_fast_from_tiktoken(vocab_file)
    print(f"Qwen2TokenizerFast build from qwen.tiktoken: {time.perf_counter() - start:.2f}s")
    print(f"corpus: {megabytes:.1f} MB in {len(docs)} documents\n")

    runs = {
        "tiktoken (raw Encoding.encode)": lambda: [
            qwen.encoding.encode(d, allowed_special="all") for d in docs
        ],
        "QWenTokenizer.encode": lambda: [qwen.encode(d) for d in docs],
        "Qwen2TokenizerFast.encode": lambda: [peer.encode(d, add_special_tokens=False) for d in docs],
        "QWenTokenizer(docs) batch": lambda: qwen(docs)["input_ids"],
        "Qwen2TokenizerFast(docs) batch": lambda: peer(docs, add_special_tokens=False)["input_ids"],
    }
    speeds, outputs = {}, {}
    for name, fn in runs.items():
        seconds, outputs[name] = timed(fn, args.repeats)
        speeds[name] = megabytes / seconds
        print(f"{name:34s} {speeds[name]:8.2f} MB/s  ({seconds:.2f}s)")

    reference = outputs["QWenTokenizer.encode"]
    mismatches = [name for name, ids in outputs.items() if ids != reference]
    print(
        f"\nids identical across all runs: {not mismatches}"
        + (f" (differ: {mismatches})" if mismatches else "")
    )
    print(f"tokens: {sum(map(len, reference))}")
    ratio = speeds["QWenTokenizer.encode"] / speeds["Qwen2TokenizerFast.encode"]
    print(f"QWenTokenizer.encode / Qwen2TokenizerFast.encode: {ratio:.2f}x (target >= 2x)")
    batch_ratio = speeds["QWenTokenizer(docs) batch"] / speeds["Qwen2TokenizerFast(docs) batch"]
    print(f"batch call ratio (RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}): {batch_ratio:.2f}x")
    print(
        f"QWenTokenizer.encode / raw tiktoken: {speeds['QWenTokenizer.encode'] / speeds[next(iter(runs))]:.2f}"
    )
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
