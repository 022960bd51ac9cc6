"""The one runner every eval/evaluate_*.py script calls: `main("mmlu", argv)`.

It does the same for every task (tasks.py): flags, data before model (a bad path fails in a second), resume from
the sample JSONL, progress bar with ETA, summary JSON (both scores), table, chart.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from qwen_generation_utils import DEFAULT_MAX_NEW_TOKENS

from ..errors import DataError
from ..scripts import add_checkpoint_args, exit_on_user_error, load_checkpoint
from .results import SampleLog, fingerprint, format_table, plot_bars, versions, write_summary
from .tasks import Task, effective_decoding, task_for

FIXTURES_HINT = "tests/data/eval/ holds a few questions in each layout, to try the script offline"


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is not a positive integer")
    return number


def build_parser(task: Task, eval_dir: Path | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"evaluate_{task.name}.py",
        description=f"{task.title}: the Qwen report's evaluation, batched. Data: {task.data_help}; "
                    f"{FIXTURES_HINT} (eval/EVALUATION.md).",
    )
    add_checkpoint_args(parser)
    parser.add_argument("-s", "--seed", type=int, default=1234, help="random seed (default 1234, as the original)")
    default_data = str(eval_dir / task.default_data) if eval_dir and task.default_data else None
    parser.add_argument("-d", "--eval_data_path", "-f", "--sample-input-file", dest="eval_data_path",
                        default=default_data, help=task.data_help)
    parser.add_argument("-o", "--sample-output-file", default=f"outs/{task.name}_res.jsonl",
                        help="per-sample results (JSONL; a rerun resumes from it); the summary .json and the chart "
                             f".png are written beside it (default outs/{task.name}_res.jsonl)")
    parser.add_argument("--max-seq-len", type=_positive, default=2048,
                        help="context in tokens: MMLU's 5-shot prompts keep their last max-seq-len - 1 tokens (as "
                             "the original); generation stops at it (default 2048)")
    parser.add_argument("--max-new-tokens", type=_positive, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"generation length limit (default {DEFAULT_MAX_NEW_TOKENS}, the chat models' config)")
    parser.add_argument("--batch-size", type=_positive, default=8, help="questions per forward pass (default 8)")
    parser.add_argument("--limit", type=_positive, default=None,
                        help="a quick subset: the first N questions (of each subject, for subject benchmarks)")
    parser.add_argument("--debug", action="store_true", help="print each prompt and the model's answer")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over instead of resuming from the samples already in -o")
    task.add_arguments(parser)
    return parser


def main(name: str, argv: list[str] | None = None, eval_dir: str | Path | None = None) -> dict:
    """Run one benchmark as its evaluate_*.py script does; returns the summary written to the .json file."""
    eval_dir = Path(eval_dir) if eval_dir else None
    task = task_for(name, eval_dir)
    args = build_parser(task, eval_dir).parse_args(argv)
    with exit_on_user_error():
        return run(task, args)


def run(task: Task, args) -> dict:
    from tqdm import tqdm
    from transformers import set_seed

    samples = task.limit(task.load(args), args.limit)
    if not samples:
        raise DataError(f"{args.eval_data_path}: no samples to evaluate")
    out = Path(args.sample_output_file)
    settings = {"task": task.name, "checkpoint": args.checkpoint_path, "dtype": args.dtype, **task.settings(args)}
    log = SampleLog(out, fingerprint(settings), overwrite=args.overwrite)
    pending = [s for s in samples if s.id not in log.done]

    set_seed(args.seed)
    model, tokenizer = load_checkpoint(args)
    if hasattr(args, "timeout"):  # HumanEval: which sandbox layers this machine lacks, in one line each
        from .sandbox import announce_missing_layers

        announce_missing_layers()
    started = time.perf_counter()
    with tqdm(total=len(samples), initial=len(samples) - len(pending), desc=task.name, unit="sample",
              dynamic_ncols=True) as bar:
        for chunk in task.chunks(pending, args):
            log.add(task.run(model, tokenizer, chunk, args, bar.update))
    elapsed = time.perf_counter() - started

    records = [log.done[s.id] for s in samples]
    rows, metrics = task.summarize(records)
    parameter = next(model.parameters())
    summary = {
        "task": task.name,
        "title": task.title,
        "checkpoint": args.checkpoint_path or "demo",
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "device": str(parameter.device),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "settings": settings,
        "decoding": effective_decoding(task, model),
        "samples": len(records),
        "evaluated_now": len(pending),
        "seconds": round(elapsed, 2),
        "metrics": metrics,
        "versions": versions(),
        "samples_file": str(out),
    }
    write_summary(out.with_suffix(".json"), summary)
    title = f"{task.title} — {summary['checkpoint']}"
    plot_bars(out.with_suffix(".png"), title, rows, chance=task.chance)
    print(format_table(title, rows))
    print(f"results: {out.with_suffix('.json')}  samples: {out}  chart: {out.with_suffix('.png')}")
    return summary
