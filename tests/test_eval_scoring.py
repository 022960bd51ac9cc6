"""Choice scoring and data layouts: batched scoring equals the original's one-question forward pass."""

import pytest
import torch

from qwen.errors import DataError
from qwen.evaluation import data, prompts
from qwen.evaluation.scoring import choice_probabilities, common_prefix_length
from qwen_generation_utils import encode_plain

FIXTURES = __import__("conftest").REFERENCE / "eval"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qwen.checkpoints import make_tiny_checkpoint
    from qwen.loading import load_model_and_tokenizer

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), layers=2, hidden=64, heads=4)
    model, tokenizer = load_model_and_tokenizer(str(path), dtype="fp32")
    # random weights give near-uniform choices; sharpen the logits so a scoring mistake shows in the probabilities
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model, tokenizer


def direct(model, ids, choice_ids):
    """The original's computation for one question: a plain forward pass, the last position's choice logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return torch.softmax(torch.log_softmax(logits, -1)[choice_ids], -1)


@pytest.mark.parametrize("name, layout", [("mmlu", data.MMLU), ("ceval", data.CEVAL), ("cmmlu", data.CMMLU)])
def test_batched_choice_probabilities_equal_one_question_forward(tiny, name, layout):
    model, tokenizer = tiny
    found = data.load_choice_benchmark(layout, FIXTURES / name)
    choice_ids = [encode_plain(tokenizer, t)[0] for t in prompts.CHOICE_TOKENS[name]]
    for subject, (shots, questions) in found.items():
        ids = [encode_plain(tokenizer, prompts.choice_prompt(name, subject, shots, q)) for q in questions]
        assert len({len(i) for i in ids}) > 1  # different lengths: padding is exercised
        assert common_prefix_length(ids) > 50  # the 5-shot prefix is shared
        expected = torch.stack([direct(model, i, choice_ids) for i in ids])
        assert expected.max() > 0.4  # not uniform: the comparison can fail
        for batch_size, share_prefix in ((2, True), (8, False)):
            got = choice_probabilities(model, ids, choice_ids, batch_size=batch_size, share_prefix=share_prefix)
            assert torch.allclose(got, expected, atol=1e-5, rtol=0), (subject, batch_size, share_prefix)


def test_choice_tokens_are_the_originals(tiny):
    _, tokenizer = tiny
    assert prompts.CHOICE_TOKENS["mmlu"] == (" A", " B", " C", " D")
    assert prompts.CHOICE_TOKENS["ceval"] == prompts.CHOICE_TOKENS["cmmlu"] == ("A", "B", "C", "D")
    for tokens in prompts.CHOICE_TOKENS.values():
        assert all(len(encode_plain(tokenizer, t)) == 1 for t in tokens)


def test_layouts_read_the_fixtures():
    mmlu = data.load_choice_benchmark(data.MMLU, FIXTURES / "mmlu")
    assert list(mmlu) == ["abstract_algebra", "high_school_geography"]
    shots, questions = mmlu["abstract_algebra"]
    assert len(shots) == 5 and len(questions) == 3
    assert questions[1].options["B"] == "No, not closed" and questions[1].answer == "A"  # quoted comma kept
    ceval = data.load_choice_benchmark(data.CEVAL, FIXTURES / "ceval")
    assert set(ceval) == {"advanced_mathematics", "logic"} and ceval["logic"][1][2].answer == "B"
    cmmlu = data.load_choice_benchmark(data.CMMLU, FIXTURES / "cmmlu")
    assert cmmlu["agronomy"][1][0].question == "玉米原产于____。"
    assert data.subjects_of(data.CMMLU_CATEGORIES)["ancient_chinese"] == ["Social Science", "China specific"]
    assert len(data.subjects_of(data.MMLU_CATEGORIES)) == 57
    assert len(data.subjects_of(data.CEVAL_CATEGORIES)) == 52
    assert len(data.subjects_of(data.CMMLU_CATEGORIES)) == 67


def test_prompts_have_the_original_layout():
    shots, questions = data.load_choice_benchmark(data.MMLU, FIXTURES / "mmlu")["abstract_algebra"]
    text = prompts.choice_prompt("mmlu", "abstract_algebra", shots, questions[0])
    assert text.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                           "Question: Find the order of the element 2 in Z_5 under addition.\nA. 1\nB. 2\nC. 5\n"
                           "D. 10\nAnswer: C\n\nQuestion: ")
    assert text.endswith("Question: Find the number of elements in Z_4 x Z_2.\nA. 2\nB. 4\nC. 6\nD. 8\nAnswer:")
    shots, questions = data.load_choice_benchmark(data.CEVAL, FIXTURES / "ceval")["logic"]
    text = prompts.choice_prompt("ceval", "logic", shots, questions[0])
    assert text.startswith("问题：“所有的鸟都会飞”的矛盾命题是____。\nA. 所有的鸟都不会飞\n")
    assert text.endswith("\nD. 既真又假\n答案：") and text.count("答案：") == 6


def test_bad_data_is_named(tmp_path):
    with pytest.raises(DataError, match="no mmlu files found"):
        data.load_choice_benchmark(data.MMLU, tmp_path)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "logic_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"logic_val.csv: row 1: answer 'E'"):
        data.load_choice_benchmark(data.CEVAL, tmp_path)
    (tmp_path / "test.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="line 1 has no answer field"):
        data.load_gsm8k(tmp_path)
