import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Golden data produced by the original 2023 code (see tests/data/README.md); part of the repository.
REFERENCE = REPO / "tests" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require_program(path: str, install: str) -> None:
    """Skip (fail under CI, which installs everything) a test whose system program is missing, naming the install."""
    if not Path(path).exists():
        message = f"needs {path}, missing here: install it with `{install}`"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


def load_reference(name: str) -> dict:
    return json.loads((REFERENCE / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The converted offline demo model; prepared once ($QWEN_DEMO_DIR or the user cache), then reused."""
    from qwen.demo import demo_checkpoint as prepare

    return prepare()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_checkpoint)
