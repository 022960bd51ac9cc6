"""README "Using the models in Python": its first snippet (the offline demo path) runs as written."""

import re
import subprocess
import sys

import pytest
from conftest import REPO


def readme_python_snippet() -> str:
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Using the models in Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_the_snippet_starts_with_the_offline_demo_model():
    assert "load_model_and_tokenizer(None)" in readme_python_snippet()


@pytest.mark.slow
def test_the_readme_python_snippet_answers_offline(demo_checkpoint):
    done = subprocess.run([sys.executable, "-c", readme_python_snippet()], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Paris" in done.stdout
