"""MMLU choice scoring: batched (shared 5-shot prefix, left-padded batches) vs one question at a time.

The peer is the original evaluate_mmlu.py's way: one forward pass per question over its whole 5-shot prompt,
logits for every position. Both score the same questions with the same model; the probabilities are checked
equal (<= 1e-4) before the rates are printed. Questions: the MMLU fixtures in tests/data/eval/mmlu repeated to
--questions per subject (real MMLU files with -d). Times are the best of --repeats, wall and CPU seconds.

    python -m bench.eval_bench [-c CHECKPOINT] [-d MMLU_DIR] [--questions 16] [--batch-size 8] [--threads 2]
"""

import argparse
import time
from pathlib import Path

import torch

from qwen.evaluation import data, prompts
from qwen.evaluation.scoring import choice_probabilities, choice_probabilities_one_by_one
from qwen.loading import load_model_and_tokenizer
from qwen_generation_utils import encode_plain

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "data" / "eval" / "mmlu"


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint-path", default=None, help="default: the offline demo model")
    parser.add_argument("-d", "--eval_data_path", default=str(FIXTURES))
    parser.add_argument("--questions", type=int, default=16, help="questions per subject (fixtures are repeated)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.checkpoint_path, dtype="fp32")
    choice_ids = [encode_plain(tokenizer, t)[0] for t in prompts.CHOICE_TOKENS["mmlu"]]
    subjects = []
    for subject, (shots, questions) in data.load_choice_benchmark(data.MMLU, args.eval_data_path).items():
        questions = (questions * args.questions)[: args.questions]
        subjects.append([encode_plain(tokenizer, prompts.choice_prompt("mmlu", subject, shots, q)) for q in questions])
    total = sum(len(s) for s in subjects)
    tokens = sum(len(p) for s in subjects for p in s)
    print(f"{total} questions in {len(subjects)} subjects, {tokens / total:.0f} prompt tokens each on average")

    best = {}
    for _ in range(args.repeats):
        for name, fn in (
            ("batched", lambda: [choice_probabilities(model, s, choice_ids, batch_size=args.batch_size)
                                 for s in subjects]),
            ("one-at-a-time", lambda: [choice_probabilities_one_by_one(model, s, choice_ids) for s in subjects]),
        ):
            result, wall, cpu = timed(fn)
            if name not in best or wall < best[name][1]:
                best[name] = (torch.cat(result), wall, cpu)
    difference = (best["batched"][0] - best["one-at-a-time"][0]).abs().max().item()
    assert difference <= 1e-4, f"batched probabilities differ by {difference}"
    for name, (_, wall, cpu) in best.items():
        print(f"{name:>14}: {total / wall:7.2f} questions/s  ({wall:.1f} s wall, {cpu:.1f} s CPU)")
    ratio = best["one-at-a-time"][1] / best["batched"][1]
    cpu_ratio = best["one-at-a-time"][2] / best["batched"][2]
    print(f"batched vs one-at-a-time (the original's way): {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU "
          f"(target >= 4x); max probability difference {difference:.1e}")


if __name__ == "__main__":
    main()
