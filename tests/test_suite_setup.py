"""How the test suite runs: the default `python -m pytest` leaves the slow end-to-end tests out, CI runs them all,
and a long test reports that it is still running."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO


def test_default_run_is_the_quick_suite_on_two_workers_and_ci_runs_everything():
    line = re.search(r'^addopts = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    addopts = shlex.split(line[1])
    value = {name: addopts[addopts.index(name) + 1] for name in ("-m", "-n", "--dist")}
    assert value == {"-m": "not slow",
                     "-n": "2",  # pytest-xdist: about 10 instead of 18 minutes
                     "--dist": "loadfile"}  # a module's tests and its fixtures on one worker
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest -m ''" in ci  # an empty marker expression selects every test


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_a_long_test_says_it_is_still_running(tmp_path, workers):
    (tmp_path / "test_long.py").write_text(
        "import time\n\ndef test_sleeps():\n    time.sleep(2.5)\n\ndef test_quick():\n    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "heartbeat", "-p", "no:cacheprovider", *workers, str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "QWEN_TEST_HEARTBEAT_S": "1", "PYTHONPATH": str(REPO / "tests")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "... still running test_long.py::test_sleeps (1 s)" in done.stdout
    assert "(2 s)" in done.stdout
    assert "test_quick" not in done.stdout  # a test is said only while it runs
