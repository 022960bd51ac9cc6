"""The prompts of the original eval scripts, one function per layout (facts: their exact text and spacing).

Base models (few-shot, scored or continued): MMLU / C-Eval / CMMLU 5-shot prompts, GSM8K 8-shot
(eval/gsm8k_prompt.txt), HumanEval (the problem's prompt as is). Chat models (0-shot, through ChatML with the
default system prompt, as model.chat): the original evaluate_chat_*.py questions.
"""

from __future__ import annotations

import re

from qwen_generation_utils import DEFAULT_SYSTEM, make_context

from .data import CHOICES, ChoiceQuestion

SHOTS = 5  # the original's k for MMLU, C-Eval and CMMLU

# the choice tokens the original scored (MMLU with a leading space: its prompt ends in "Answer:")
CHOICE_TOKENS = {"mmlu": tuple(f" {c}" for c in CHOICES), "ceval": CHOICES, "cmmlu": CHOICES}

# question / answer labels of the few-shot layouts
_LABELS = {"mmlu": ("Question: ", "\nAnswer:"), "ceval": ("问题：", "\n答案："), "cmmlu": ("问题：", "\n答案：")}


def format_choice_question(benchmark: str, question: ChoiceQuestion, with_answer: bool) -> str:
    ask, answer_label = _LABELS[benchmark]
    text = ask + question.question + "".join(f"\n{c}. {question.options[c]}" for c in CHOICES)
    if with_answer:
        space = " " if benchmark == "mmlu" else ""
        return f"{text}{answer_label}{space}{question.answer}\n\n"
    return text + answer_label


def few_shot_prefix(benchmark: str, subject: str, shots: list[ChoiceQuestion], k: int = SHOTS) -> str:
    """The instruction (MMLU only) and the first k dev examples with their answers."""
    header = ""
    if benchmark == "mmlu":
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_choice_question(benchmark, q, with_answer=True) for q in shots[:k])


def choice_prompt(benchmark: str, subject: str, shots: list[ChoiceQuestion], question: ChoiceQuestion) -> str:
    return few_shot_prefix(benchmark, subject, shots) + format_choice_question(benchmark, question, False)


def chat_choice_query(benchmark: str, question: ChoiceQuestion) -> str:
    """The 0-shot user message of evaluate_chat_mmlu.py / evaluate_chat_ceval.py."""
    options = "".join(f"{c}. {question.options[c]}\n" for c in CHOICES)
    if benchmark == "mmlu":
        return (
            "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D "
            f"as the answer to this question.\n\n{question.question}\n{options}"
        )
    return f"{question.question}\n\n{options}"


def gsm8k_prompt(few_shot: str, question: str) -> str:
    """evaluate_gsm8k.py's prompt: the 8 examples, then the question and the chain-of-thought cue."""
    return f"{few_shot}\nQuestion: {question}\nLet's think step by step\n"


GSM8K_STOPS = ["\n\n", "Question:"]  # where the original cut a base model's GSM8K answer

def humaneval_chat_query(problem: dict) -> str:
    """evaluate_chat_humaneval.py's (HEAD) humanevalpack prompt: the signature, the docstring's lines stripped,
    then the problem's prompt. ValueError when the prompt has no `def entry_point(...):` or no docstring."""
    signature = re.search(rf"def\s+({problem['entry_point']}.*?):\s*\n", problem["prompt"])
    docstring = re.search(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", problem["prompt"], re.DOTALL)
    if signature is None or docstring is None:
        raise ValueError(f"{problem['task_id']}: the prompt has no `def {problem['entry_point']}(...):` with a docstring")
    description = "\n".join(line.strip() for line in docstring.group(1).split("\n"))
    return (f"Write a Python function `{signature.group(1)}` to solve the following problem:\n{description}\n"
            f"{problem['prompt']}")


def chat_prompt_ids(model, tokenizer, query: str) -> list[int]:
    """The prompt model.chat(tokenizer, query) builds: ChatML, default system prompt, the model's window."""
    window = getattr(model.generation_config, "max_window_size", None)
    kwargs = {"max_window_size": window} if window else {}
    return make_context(tokenizer, query, system=DEFAULT_SYSTEM, **kwargs)[1]
