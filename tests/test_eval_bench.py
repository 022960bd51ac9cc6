"""bench/eval_bench.py runs on the installed versions and prints its ratio (run by hand; not timed here)."""

import subprocess
import sys

import pytest
from conftest import REPO

from qwen.checkpoints import make_tiny_checkpoint


@pytest.mark.slow
def test_eval_bench_runs_and_prints_the_ratio(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    done = subprocess.run(
        [sys.executable, "-m", "bench.eval_bench", "-c", str(checkpoint), "--questions", "1", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "batched vs one-at-a-time (the original's way)" in done.stdout and "2 questions in 2 subjects" in done.stdout
