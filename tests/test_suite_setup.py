"""How the test suite runs: the default `python -m pytest` leaves the slow end-to-end tests out, CI runs them all,
and a long test reports that it is still running."""

import os
import subprocess
import sys

from conftest import REPO


def test_default_run_is_the_quick_suite_and_ci_runs_everything():
    assert '\naddopts = "-ra --durations=15 -m \'not slow\'"\n' in (REPO / "pyproject.toml").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest -m ''" in ci  # an empty marker expression selects every test


def test_a_long_test_says_it_is_still_running(tmp_path):
    (tmp_path / "test_long.py").write_text("import time\n\ndef test_sleeps():\n    time.sleep(2.5)\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "heartbeat", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "QWEN_TEST_HEARTBEAT_S": "1", "PYTHONPATH": str(REPO / "tests")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "... still running test_long.py::test_sleeps (1 s)" in done.stdout
    assert "(2 s)" in done.stdout
