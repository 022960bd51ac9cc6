"""Reading answers out of model text: GSM8K numbers, chat multiple-choice letters, HumanEval code, ReAct calls.

Two readings of every generation (both scores come from the same text, see eval/EVALUATION.md):
- `original_*`: the original QwenLM/Qwen eval scripts' extraction, exactly (their regexes and cuts; golden cases
  from running them are in tests/data/eval/original_golden.json). Scores read this way compare with the report.
- the corrected readers, which fix what the original read wrong:
  GSM8K base took the last run of digits (`re.findall(r"\\d+")[-1]`): "-3" read as 3, "20,800" as 800, "3.5" as
  5, and both scripts read "The answer is 42. (42 + 1 = 43)" as 43. Here: the number after the last "answer is",
  else the last number, with its sign, thousands separators and decimals, compared as exact decimals.
  HumanEval base cut the completion at the first blank line (and at "def "), breaking bodies with a blank line or
  a nested def; here it ends at the first line that starts at column 0. Chat HumanEval code keeps the imports
  written above the function (the original dropped them).
Chat multiple choice has one reader, the original's (its fallback when no letter is found uses difflib where the
original used thefuzz).
"""

from __future__ import annotations

import difflib
import math
import re
import textwrap
from decimal import Decimal, InvalidOperation

from ..react import parse_response

# ------------------------------------------------------------------------------------------------------ GSM8K

# A number as people write it: optional sign, digits with optional thousands separators, optional decimals (or
# only decimals: "$.75"). Not preceded by an ASCII letter, digit, "_" or ".", so "x2" and the "2" of "3-2" keep
# their meaning, while a number right after CJK text ("赚18美元") is still read.
_NUMBER = r"(?<![A-Za-z0-9_.])-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"answer is[:\s]*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_GOLD_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")


def parse_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def extract_gsm8k_answer(completion: str) -> Decimal | None:
    """The model's final number: after the last "The answer is", else the last number in the text; None if none."""
    stated = _ANSWER_IS_RE.findall(completion)
    if stated:
        return parse_number(stated[-1])
    numbers = _NUMBER_RE.findall(completion)
    return parse_number(numbers[-1]) if numbers else None


def extract_gsm8k_reference(answer: str) -> Decimal:
    """The reference number after "####" in a GSM8K answer field."""
    match = _GOLD_RE.search(answer)
    if match is None or parse_number(match.group(1)) is None:
        raise ValueError("the answer has no '#### <number>' line")
    return parse_number(match.group(1))


def format_number(value: Decimal | None) -> str | None:
    """A JSON-friendly string of an extracted number ("20800", "-3", "3.5")."""
    if value is None:
        return None
    return format(value.normalize(), "f")


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the earliest of `stops` (as the original's successive split(stop)[0])."""
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end]


def _python_number(text: str) -> int | float | None:
    """The number the original got by evaluating `text` as a Python literal, read here with int() / float() and
    never executed: int, float, or None where Python rejects the literal (an int with leading zeros, "1.2.3")."""
    digits = text.lstrip("+-")
    try:
        if "." in digits:
            return float(text)
        if len(digits) > 1 and digits.startswith("0") and digits.strip("0"):
            return None  # Python rejects the literal 007 (SyntaxError)
        return int(text)
    except ValueError:
        return None


# evaluate_gsm8k.py (base): the reference after "#### ", the prediction the last run of digits
_ORIGINAL_GOLD_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def original_gsm8k_base_answer(completion: str) -> str | None:
    """evaluate_gsm8k.py's extract_answer: the last run of digits (None where it gave "[invalid]")."""
    digits = re.findall(r"\d+", completion)
    return digits[-1] if digits and _python_number(digits[-1]) is not None else None


def original_gsm8k_base_correct(completion: str, answer_field: str) -> bool:
    match = _ORIGINAL_GOLD_RE.search(answer_field)
    gold = _python_number(match.group(1).strip().replace(",", "")) if match else None
    pred = original_gsm8k_base_answer(completion)
    return pred is not None and gold is not None and _python_number(pred) == gold


# evaluate_chat_gsm8k.py: the last number of the text (sign, thousands separators, decimals), for the reference too
_ORIGINAL_CHAT_NUMBER_RE = re.compile(r"([+-])?(?=([0-9]|\.[0-9]))(0|([1-9](\d{0,2}(,\d{3})*)|\d*))?(\.\d*)?(?=\D|$)")


def original_gsm8k_chat_answer(text: str) -> str | None:
    matches = list(_ORIGINAL_CHAT_NUMBER_RE.finditer(text))
    return matches[-1].group().replace(",", "").replace("+", "").strip() if matches else None


def original_gsm8k_chat_correct(completion: str, answer_field: str) -> bool:
    gold, pred = original_gsm8k_chat_answer(answer_field), original_gsm8k_chat_answer(completion)
    if gold is None or pred is None:
        return False
    gold_value, pred_value = _python_number(gold), _python_number(pred)
    if gold_value is None or pred_value is None:
        return False
    return math.isclose(gold_value, pred_value, rel_tol=0, abs_tol=1e-4)


# ------------------------------------------------------------------------------------------------ HumanEval


# A line that starts at column 0. The completion itself starts a line (HumanEval prompts end with "\n").
_TOP_LEVEL_RE = re.compile(r"(?:^|\n)(?=\S)")


def truncate_completion(completion: str) -> str:
    """The function body a base model wrote after a HumanEval prompt: everything before the first line that
    starts at column 0 (the next top-level statement: def, class, if __name__, print, a comment...)."""
    match = _TOP_LEVEL_RE.search(completion)
    return completion if match is None else completion[: match.end()]


def ends_function_body(text: str) -> bool:
    """Whether generation can stop: a top-level statement has begun, so the body is complete."""
    return _TOP_LEVEL_RE.search(text) is not None


def original_humaneval_cut(text: str) -> str:
    """evaluate_humaneval.py's decode(): cut at <|endoftext|>, then the first blank line, then "def "."""
    for stop in ("<|endoftext|>", "\n\n\n", "\n\n", "def "):
        text = text.split(stop)[0]
    return text


def original_cut_is_final(text: str) -> bool:
    """Whether more text can no longer change original_humaneval_cut(text)."""
    return any(stop in text for stop in ("<|endoftext|>", "\n\n", "def "))


def original_chat_code(response: str, entry_point: str) -> str:
    """evaluate_chat_humaneval.py's extract_code: the entry point's body inside a ``` block (to the block's end,
    helpers included), else up to the first unindented line, else any function's, else the indented answer."""
    ep = entry_point  # interpolated unescaped, as the original
    for pattern in (rf"```(?:[Pp]ython\n)?.*?def\s+{ep}.*?:\n(.*?)\n```",
                    rf"def\s+{ep}.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
                    r"def.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)"):
        match = re.search(pattern, response, re.DOTALL)
        if match is not None:
            return match.group(1)
    return textwrap.indent(response, " " * 4)


_CODE_BLOCK_RE = re.compile(r"```[^\n]*\n(.*?)(?:```|$)", re.DOTALL)
_IMPORT_RE = re.compile(r"^(?:import|from)\s+\S[^\n]*$", re.M)


def extract_chat_code(response: str, entry_point: str) -> str:
    """The original's body of `entry_point` (helpers after it included), with the imports the answer wrote above
    the function appended as top-level lines (the original dropped them: NameError for math.sqrt...)."""
    completion = original_chat_code(response, entry_point)
    for block in _CODE_BLOCK_RE.findall(response):
        found = re.search(rf"def\s+{re.escape(entry_point)}\b", block)
        if found is not None:
            imports = _IMPORT_RE.findall(block[: found.start()])
            if imports:
                completion = completion.rstrip("\n") + "\n\n" + "\n".join(imports) + "\n"
            break
    return completion


# ------------------------------------------------------------------------------------ chat multiple choice

CHOICES = ("A", "B", "C", "D")

# evaluate_chat_mmlu.py's cascade: "answer is A" / "choose A", "A is correct", a bare letter first, the first letter
_EN_PATTERNS = [
    r"(?:(?:[Cc]hoose)|(?:(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?\b(?:|is|:|be))\b)"
    r"[^ABCD]{0,20}?\b(A|B|C|D)\b",
    r"\b(A|B|C|D)\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?\b(?:correct|right)\b",
    r"^(A|B|C|D)(?:\.|,|:|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
]
# evaluate_chat_ceval.py's: 答案是A / 选A, A正确, a bare letter first, the first letter
_ZH_PATTERNS = [
    r"(?:(?:选|选择|选定)[：:]?\s*|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|选|为|：|:|】))"
    r"[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$|：|:|\)|）)",
    r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对[的，。：]|符合))[^ABCD]{0,4}?"
    r"(?:正确|对[的，。：]|符合)",
    r"^[\(（]?(A|B|C|D)(?:。|\)|）|\.|，|,|．|：|:|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
]


def _replace_question_zh(response: str, question: str) -> str:
    """evaluate_chat_ceval.py: the question's last sentence, repeated by the model, reads as 答案是 (the part
    before the blank) and nothing (the part after it)."""
    parts = question.rstrip("。").split("。")[-1].split("_")
    if len(parts[0].strip()) > 4:
        response = response.replace(parts[0], "答案是")
    if len(parts[-1].strip()) > 4:
        response = response.replace(parts[-1], "")
    return response


def extract_choice(response: str, choices: dict[str, str], language: str = "en", question: str = "") -> str:
    """The letter a chat model chose in `response`, as the original chat scripts read it; `choices` maps "A".."D"
    to the option texts, `question` (C-Eval) is the question text."""
    text = _replace_question_zh(response, question) if language == "zh" else response
    # an answer that repeats an option's text counts as that letter (longest texts first, as the original)
    for letter, option in sorted(choices.items(), key=lambda kv: len(str(kv[1])), reverse=True):
        if language == "zh":
            text = text.replace(str(option).rstrip("。"), letter)
        else:
            text = re.sub(re.escape(str(option).rstrip(".")), letter, text, flags=re.IGNORECASE)
    for pattern in _ZH_PATTERNS if language == "zh" else _EN_PATTERNS:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    # nothing letter-like: the option most similar to the answer (the original used thefuzz for this)
    return max(CHOICES, key=lambda c: difflib.SequenceMatcher(None, text, str(choices[c])).ratio())


# ------------------------------------------------------------------------------------------------- ReAct


def original_react_action(text: str) -> str:
    """evaluate_plugin.py's process_res: the text between "Action:" and "Action Input:" (str.find-based)."""
    text += "\n"
    return text[text.find("Action:") + len("Action:") : text.find("Action Input:")].strip()


def react_call(text: str) -> tuple[str, str] | None:
    """(action, action input) of the tool call in a ReAct answer, or None when it calls no tool."""
    call = parse_response(text).function_call
    return None if call is None else (call["name"], call["arguments"])


def normalize_json(text: str) -> str:
    """Action input as canonical JSON (sorted keys) so formatting does not count; "" when it is not JSON."""
    import json

    try:
        return json.dumps(json.loads(text), ensure_ascii=False, sort_keys=True)
    except (ValueError, TypeError):
        return ""


def rouge_l(reference: list, candidate: list) -> float:
    """Rouge-L F-measure of two token sequences (longest common subsequence; Lin 2004, beta = 1)."""
    if not reference or not candidate:
        return 0.0
    previous = [0] * (len(candidate) + 1)
    for ref_token in reference:
        current = [0]
        for j, cand_token in enumerate(candidate):
            current.append(previous[j] + 1 if ref_token == cand_token else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)
