"""Result files: the sample log resumes (a torn last line is redone), refuses another run's file, and the chart."""

import json

import pytest

from qwen.errors import UsageError
from qwen.evaluation.results import SampleLog, fingerprint, format_table, plot_bars


def test_sample_log_resumes_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "res.jsonl"
    run = fingerprint({"task": "mmlu", "checkpoint": "x"})
    log = SampleLog(path, run)
    log.add([{"id": "a/0", "pred": "A"}, {"id": "a/1", "pred": "B"}])
    with open(path, "a") as f:
        f.write('{"id": "a/2", "run": "' + run + '", "pre')  # the run was killed mid-write
    again = SampleLog(path, run)
    assert set(again.done) == {"a/0", "a/1"} and again.done["a/1"]["pred"] == "B"
    again.add([{"id": "a/2", "pred": "C"}])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["a/0", "a/1", "a/2"] and all(r["run"] == run for r in lines)
    assert SampleLog(path, run, overwrite=True).done == {} and path.read_text() == ""


def test_sample_log_refuses_another_runs_file(tmp_path):
    path = tmp_path / "res.jsonl"
    SampleLog(path, fingerprint({"checkpoint": "a"})).add([{"id": "0"}])
    with pytest.raises(UsageError, match="--overwrite"):
        SampleLog(path, fingerprint({"checkpoint": "b"}))
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def test_table_and_chart(tmp_path):
    rows = [("STEM", 50.0, 4), ("Average", 62.5, 8)]
    table = format_table("MMLU", rows)
    assert "STEM" in table and "62.50" in table and table.splitlines()[-1].split() == ["Average", "62.50", "8"]
    plot_bars(tmp_path / "chart.png", "MMLU", rows)
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
