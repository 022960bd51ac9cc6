"""Reading answers out of model text: GSM8K numbers, chat multiple-choice letters, HumanEval code, ReAct calls.

Fixes against the original eval scripts (each has a test in tests/test_eval_extract.py):
- GSM8K took the last run of digits (`re.findall(r"\\d+")[-1]`): "-3" read as 3, "20,800" as 800, "3.5" as 5,
  and "The answer is 42. (42 + 1 = 43)" as 43. Here: the number after the last "The answer is", else the last
  number, with its sign, thousands separators and decimals; compared as exact decimals. The chat script also
  read the *reference* with that extractor ("#### 1,000" → 0); the reference is always read after "####".
- HumanEval cut the completion at the first blank line (and at "def "), breaking functions that contain a blank
  line or a nested def. Here the completion ends at the first line that starts at column 0: the next top-level
  statement, which is where the function body ends.
"""

from __future__ import annotations

import difflib
import re
from decimal import Decimal, InvalidOperation

from ..react import parse_response

# ------------------------------------------------------------------------------------------------------ GSM8K

# A number as people write it: optional sign, digits with optional thousands separators, optional decimals.
# Not preceded by a word character or a dot, so "x2", "1.5.3" tails and the "2" of "3-2" keep their meaning.
_NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
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
    text = format(value.normalize(), "f")
    return text


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the earliest of `stops` (as the original's successive split(stop)[0])."""
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end]


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


_CODE_BLOCK_RE = re.compile(r"```[ \t]*(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_chat_code(response: str, entry_point: str) -> str:
    """The body of `entry_point` from a chat model's answer, to append to the HumanEval prompt.

    As the original: the function in a ```python block (else anywhere in the text), its body after the `def`
    line; when the answer has no such function, the whole answer indented as a body.
    """
    blocks = _CODE_BLOCK_RE.findall(response) or [response]
    for code in blocks + [response]:
        match = re.search(rf"^[ \t]*def\s+{re.escape(entry_point)}\s*\(.*?\)[^\n]*:[ \t]*\n", code, re.M | re.S)
        if match is None:
            match = re.search(r"^[ \t]*def\s+\w+\s*\(.*?\)[^\n]*:[ \t]*\n", code, re.M | re.S)
        if match is not None:
            return truncate_completion(code[match.end() :])
    return "".join("    " + line if line.strip() else line for line in response.splitlines(keepends=True))


# ------------------------------------------------------------------------------------ chat multiple choice

CHOICES = ("A", "B", "C", "D")
# The original chat scripts' cascade, in order: an explicit statement ("answer is B", "choose B" / 答案是B, 选B),
# "B is correct" / B正确, a bare letter at the start, the first standalone letter; else the most similar choice.
_EN_PATTERNS = [
    r"(?:choose|select|(?:answer|choice|option)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?\b(?:is|:|be)?)"
    r"[^ABCD]{0,20}?\b([ABCD])\b",
    r"\b([ABCD])\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?\b(?:correct|right)\b",
    r"^\s*\(?([ABCD])(?:\.|,|:|\)|$)",
    r"(?<![a-zA-Z])([ABCD])(?![a-zA-Z=])",
]
_ZH_PATTERNS = [
    r"(?:选|选择|选定|(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|为|：|:|】))[^ABCD]{0,10}?"
    r"(?:是|为|：|:|】))[^ABCD]{0,10}?([ABCD])(?:选项)?(?:\)|。|\.|，|,|．|、|[ABCD]|$)",
    r"([ABCD])(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对|符合))[^ABCD]{0,4}?(?:正确|对|符合)",
    r"^\s*([ABCD])(?:。|\.|，|,|．|$)",
    r"(?<![a-zA-Z])([ABCD])(?![a-zA-Z=])",
]


def extract_choice(response: str, choices: dict[str, str], language: str = "en") -> str:
    """The letter a chat model chose in `response`; `choices` maps "A".."D" to the option texts."""
    text = response
    # an answer that repeats an option's text counts as that letter (longest texts first, as the original)
    for letter, option in sorted(choices.items(), key=lambda kv: len(str(kv[1])), reverse=True):
        option = str(option).rstrip(".。")
        if option.strip():
            text = re.sub(re.escape(option), letter, text, flags=re.IGNORECASE)
    for pattern in _ZH_PATTERNS if language == "zh" else _EN_PATTERNS:
        match = re.search(pattern, text, re.M)
        if match:
            return match.group(1)
    # nothing letter-like: the option most similar to the answer (the original used thefuzz for this)
    return max(CHOICES, key=lambda c: difflib.SequenceMatcher(None, response, str(choices[c])).ratio())


# ------------------------------------------------------------------------------------------------- ReAct


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
