"""Answer extraction: the original's readings reproduced (golden cases from running the original eval scripts'
functions, tests/data/eval/original_golden.json), the corrected readings, and the HumanEval completion cuts."""

from decimal import Decimal

import pytest
from conftest import load_reference

from qwen.evaluation import extract

GOLDEN = load_reference("eval/original_golden.json")


def test_original_gsm8k_readings_match_the_original_scripts():
    for case in GOLDEN["gsm8k_base"]:
        assert extract.original_gsm8k_base_correct(case["completion"], case["answer"]) == case["correct"], case
        read = extract.original_gsm8k_base_answer(case["completion"])
        assert (repr("[invalid]") if read is None else str(int(read))) == case["extracted"], case
    for case in GOLDEN["gsm8k_chat"]:
        assert extract.original_gsm8k_chat_answer(case["completion"]) == case["extracted"], case
        assert extract.original_gsm8k_chat_correct(case["completion"], case["answer"]) == case["correct"], case
    for case in GOLDEN["gsm8k_chat_reference"]:  # HEAD's chat script reads "#### 1,000" as 1000
        assert extract.original_gsm8k_chat_answer(case["answer"]) == case["extracted"]


@pytest.mark.parametrize("completion, expected", [
    ("所以她每天赚18美元。", "18"), ("答案是540", "540"), ("He paid $.75", "0.75"),  # the original chat script read these
    ("The answer is 1,000", "1000"),
])
def test_corrected_gsm8k_reads_what_the_original_chat_script_read(completion, expected):
    original = next(c for c in GOLDEN["gsm8k_chat"] if c["completion"] == completion)
    assert original["correct"]  # the oracle: the original got it right
    assert extract.extract_gsm8k_answer(completion) == Decimal(expected)


def test_original_humaneval_cuts_match_the_original_scripts():
    for case in GOLDEN["humaneval_cut"]:
        assert extract.original_humaneval_cut(case["text"]) == case["completion"]
    for case in GOLDEN["chat_humaneval_extract_code"]:
        assert extract.original_chat_code(case["response"], case["entry_point"]) == case["completion"]


def test_chat_code_keeps_helpers_after_the_entry_point():
    response = GOLDEN["chat_humaneval_extract_code"][0]["response"]
    assert "def helper" in GOLDEN["chat_humaneval_extract_code"][0]["completion"]  # the original kept it
    completion = extract.extract_chat_code(response, "add")
    program = "def add(a, b):\n" + completion + "\nassert add(1, 2) == 3\n"
    exec(compile(program, "chat_code", "exec"), {})


def test_chat_code_keeps_the_imports_above_the_function():
    case = next(c for c in GOLDEN["chat_humaneval_extract_code"] if c["entry_point"] == "root")
    assert "import math" not in case["completion"]  # the original dropped it
    completion = extract.extract_chat_code(case["response"], "root")
    scope = {}
    exec(compile("def root(x):\n" + completion + "\nvalue = root(9.0)\n", "chat_code", "exec"), scope)
    assert scope["value"] == 3.0


def test_chat_choice_letters_match_the_original_scripts():
    # one case reaches the fuzzy fallback ("None of these": no letter at all), where the original used thefuzz
    for case in GOLDEN["chat_mmlu"]:
        if case["response"] != "None of these":
            assert extract.extract_choice(case["response"], case["options"]) == case["pred"], case
    for case in GOLDEN["chat_ceval"]:
        row = case["row"]
        options = {c: row[c] for c in "ABCD"}
        assert extract.extract_choice(case["response"], options, "zh", row["question"]) == case["pred"], case


@pytest.mark.parametrize(
    "completion, expected, original_read",
    [
        ("The temperature falls to -3 degrees.\nThe answer is -3", "-3", "3"),
        ("So he makes 400*52=$20,800 per year more\nThe answer is 20,800", "20800", "800"),
        ("Each bottle holds 7/2 = 3.5 liters.\nThe answer is 3.5", "3.5", "5"),
        ("The answer is 42. Check: 42 + 1 = 43", "42", "43"),
        ("She pays 2,000 dollars in total.", "2000", "000"),
        ("5 - 8 = -3, so it is -3 degrees", "-3", "3"),
        ("In 2005, 60/2=30 kids came.", "30", "30"),
        ("The answer is: $1,250.50.", "1250.50", "50"),
    ],
)
def test_gsm8k_answer_fixes_the_originals_last_digits(completion, expected, original_read):
    import re

    assert extract.extract_gsm8k_answer(completion) == Decimal(expected)
    # the original extractor (last run of digits) got these wrong or only right by luck
    assert re.findall(r"\d+", completion)[-1] == original_read


def test_gsm8k_answer_edge_cases():
    assert extract.extract_gsm8k_answer("no number here") is None
    assert extract.extract_gsm8k_answer("3-2 is 1") == Decimal(1)  # "-2" is not a negative number here
    assert extract.extract_gsm8k_answer("x2 and 7.") == Decimal(7)
    assert extract.extract_gsm8k_answer("The answer is 18.00") == Decimal(18)
    assert extract.format_number(Decimal("18.00")) == "18"


def test_gsm8k_reference_reads_after_hashes():
    assert extract.extract_gsm8k_reference("12-2=10 apples\n#### 1,000") == Decimal(1000)  # the chat script read 0
    assert extract.extract_gsm8k_reference("#### -3") == Decimal(-3)
    with pytest.raises(ValueError):
        extract.extract_gsm8k_reference("no final line")


def test_gsm8k_cut_at_stop_words_like_the_original():
    assert extract.cut_at_stop("a\nThe answer is 4\n\nQuestion: next", ["\n\n", "Question:"]) == "a\nThe answer is 4"
    assert extract.cut_at_stop("no stop", ["\n\n"]) == "no stop"


HUMANEVAL_BODY_WITH_BLANK_LINE = """    total = 0
    for x in numbers:
        total += x

    # a blank line inside the body: the original cut here
    def helper(y):
        return y * 2

    return helper(total)

def another():
    pass
"""


def test_humaneval_completion_ends_at_the_next_top_level_statement():
    cut = extract.truncate_completion(HUMANEVAL_BODY_WITH_BLANK_LINE)
    assert cut.endswith("    return helper(total)\n\n")
    assert "def another" not in cut
    # the original (first blank line, then "def ") lost the return statement
    original = HUMANEVAL_BODY_WITH_BLANK_LINE.split("\n\n")[0].split("def ")[0]
    assert "return" not in original
    assert extract.truncate_completion("    return 1\nif __name__ == '__main__':\n    main()") == "    return 1\n"
    assert extract.truncate_completion("print('top level first')\n") == ""
    assert extract.ends_function_body("    x = 1\n\n    y") is False
    assert extract.ends_function_body("    x = 1\nprint(x)") is True


def test_chat_code_takes_the_body_of_the_entry_point():
    response = "Here it is:\n```python\ndef add(a, b):\n    \"\"\"Sum.\"\"\"\n\n    return a + b\n```\nDone."
    assert extract.extract_chat_code(response, "add") == '    """Sum."""\n\n    return a + b'
    assert extract.extract_chat_code("return a + b", "add") == "    return a + b"


OPTIONS = {"A": "Paris", "B": "London", "C": "Berlin", "D": "Madrid"}


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is C.", "C"),
        ("I would choose B", "B"),
        ("D is correct", "D"),
        ("A. Paris", "A"),
        ("The capital of Germany is Berlin.", "C"),  # the option text stands for its letter
        ("Madrid", "D"),
        ("I think it could be London, the answer is not A", "B"),
    ],
)
def test_chat_choice_english(response, expected):
    assert extract.extract_choice(response, OPTIONS) == expected


def test_chat_choice_chinese():
    options = {"A": "真", "B": "假", "C": "不确定", "D": "既真又假"}
    assert extract.extract_choice("答案是B。", options, "zh") == "B"
    assert extract.extract_choice("应该选C选项", options, "zh") == "C"
    assert extract.extract_choice("A选项正确", options, "zh") == "A"


def test_react_call_and_rouge_l():
    text = 'Thought: look it up\nAction: search\nAction Input: {"q": "x"}\nObservation: ...'
    assert extract.react_call(text) == ("search", '{"q": "x"}')
    assert extract.react_call("Thought: I now know the final answer.\nFinal Answer: 4") is None
    assert extract.normalize_json('{"b": 1,  "a": 2}') == '{"a": 2, "b": 1}'
    assert extract.normalize_json("not json") == ""
    assert extract.rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert extract.rouge_l([1, 2, 3, 4], []) == 0.0
    # LCS 3 of 4 and 5: P = 3/5, R = 3/4, F = 2PR/(P+R)
    assert extract.rouge_l([1, 2, 3, 4], [1, 9, 2, 3, 8]) == pytest.approx(2 * 0.6 * 0.75 / 1.35)


def test_chat_humaneval_prompt_is_the_originals_byte_for_byte():
    from qwen.evaluation import prompts
    from qwen.evaluation.data import load_humaneval

    problems = {p["task_id"]: p for p in load_humaneval()}
    assert len(GOLDEN["chat_humaneval_prompts"]) == 5
    for case in GOLDEN["chat_humaneval_prompts"]:
        assert prompts.humaneval_chat_query(problems[case["task_id"]]).encode() == case["query"].encode()
