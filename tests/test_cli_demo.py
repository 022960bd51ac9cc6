"""cli_demo.py driven as a person would: a real pseudo-terminal, the real demo model, real keystrokes."""

import json
import os
import subprocess
import sys

import pexpect
import pytest
from conftest import REPO

PROMPT = "User> "


@pytest.fixture()
def cli(demo_checkpoint):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TERM="dumb")
    child = pexpect.spawn(
        sys.executable,
        ["cli_demo.py", "--temperature", "0", "--max-new-tokens", "40"],
        cwd=str(REPO), env=env, encoding="utf-8", timeout=180, dimensions=(50, 200),
    )
    child.expect_exact(PROMPT)
    yield child
    child.close(force=True)


def ask(child, text: str) -> str:
    """Send a line and return what the program printed before the next prompt."""
    child.sendline(text)
    child.expect_exact(PROMPT)
    return child.before.replace("\r", "")


def answer_of(output: str) -> str:
    return output.split("Qwen> ", 1)[1].strip()


def test_cli_session_in_a_pty(cli, demo_tokenizer, tmp_path):
    first = ask(cli, "What is the capital of France?")
    assert "Paris" in answer_of(first)

    assert "[1] User: What is the capital of France?" in ask(cli, ":his")
    assert "History cleared." in ask(cli, ":clh")
    assert "(no history)" in ask(cli, ":his")
    assert "seed = 7" in ask(cli, ":seed 7")

    assert "max_new_tokens=5" in ask(cli, ":conf max_new_tokens=5")
    short = answer_of(ask(cli, "Tell me a long story about a dragon."))
    assert 0 < len(demo_tokenizer.encode(short, add_special_tokens=False)) <= 5

    bad = ask(cli, ":conf bogus=1")
    assert "Error: unknown option 'bogus'" in bad
    assert "seed = 7" in ask(cli, ":seed")  # still running

    assert "system: Answer in French." in ask(cli, ":system Answer in French.")
    ask(cli, ":clh")
    ask(cli, ":conf max_new_tokens=20")
    ask(cli, "What is the capital of France?")
    saved = tmp_path / "chat.json"
    assert "Saved 1 turns" in ask(cli, f":save {saved}")
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["system"] == "Answer in French." and data["history"][0][0] == "What is the capital of France?"
    ask(cli, ":clh")
    assert "Loaded 1 turns" in ask(cli, f":load {saved}")
    assert "[1] User: What is the capital of France?" in ask(cli, ":his")

    # Ctrl-C mid-answer: the partial answer stays on screen, the turn stays out of the history.
    ask(cli, ":conf max_new_tokens=400")
    cli.sendline("Write a long essay about the history of Rome.")
    cli.expect_exact("Qwen> ")
    cli.expect(r"\w+ \w+")  # some words have streamed
    cli.sendintr()
    cli.expect_exact("[stopped")
    cli.expect_exact(PROMPT)
    history = ask(cli, ":his")
    assert "history of Rome" not in history and "[1] User: What is the capital of France?" in history

    cli.sendline(":q")
    cli.expect(pexpect.EOF)
    cli.close()
    assert cli.exitstatus == 0


@pytest.mark.slow
def test_ctrl_d_at_the_prompt_exits_cleanly(cli):
    cli.sendeof()
    cli.expect(pexpect.EOF)
    cli.close()
    assert cli.exitstatus == 0 and "Traceback" not in (cli.before or "")


@pytest.mark.slow
def test_missing_checkpoint_is_one_clear_line():
    result = subprocess.run(
        [sys.executable, "cli_demo.py", "-c", "/no/such/dir"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "/no/such/dir" in lines[0], result.stderr


def test_a_base_model_is_refused_at_start_in_one_line(tmp_path):
    from qwen.checkpoints import make_tiny_checkpoint

    base = make_tiny_checkpoint(tmp_path / "base", chat=False)
    result = subprocess.run([sys.executable, "cli_demo.py", "-c", str(base)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "cli_demo.py needs a chat model" in lines[-1], result.stderr
