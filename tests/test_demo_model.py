"""The offline demo model: SmolLM2-135M-Instruct converted to the QWen layout (qwen.demo).

Uses the session fixture `demo_checkpoint` (tests/conftest.py), prepared once per run in $QWEN_DEMO_DIR.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen.demo import READY_MARKER, demo_gguf
from qwen.demo import demo_checkpoint as prepare_demo
from qwen.loading import CheckpointError, load_model_and_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Qwen, 通义千问, is a model family"]


@pytest.fixture(scope="module")
def demo(demo_checkpoint):
    return load_model_and_tokenizer(str(demo_checkpoint), cpu_only=True)


@pytest.fixture(scope="module")
def llama_from_gguf(demo_checkpoint):
    """transformers' own LlamaForCausalLM and tokenizer, read from the GGUF the demo was converted from."""
    from qwen.checkpoints import load_llama

    return load_llama(demo_gguf(demo_checkpoint.parent))


def test_the_demo_is_a_qwen_checkpoint(demo_checkpoint, demo):
    model, tokenizer = demo
    assert type(model).__name__ == "QWenLMHeadModel"
    assert json.loads((demo_checkpoint / "config.json").read_text())["model_type"] == "qwen"
    assert (demo_checkpoint / READY_MARKER).is_file()
    assert model.generation_config.chat_format == "chatml"
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert im_start != im_end and tokenizer.unk_token_id not in (im_start, im_end)
    assert "<|im_start|>" in tokenizer.chat_template


def test_a_second_call_reuses_the_cache(demo_checkpoint):
    before = {p.name: p.stat().st_mtime_ns for p in demo_checkpoint.iterdir()}
    assert prepare_demo(demo_checkpoint.parent, progress=False) == demo_checkpoint
    assert {p.name: p.stat().st_mtime_ns for p in demo_checkpoint.iterdir()} == before


def test_chat_answers_and_keeps_the_history(demo):
    model, tokenizer = demo
    # the demo's own generation_config (greedy) gives a newcomer a sensible first answer
    response, history = model.chat(tokenizer, "What is the capital of France?", history=None, max_new_tokens=32)
    assert "Paris" in response
    assert history == [("What is the capital of France?", response)]
    # "And Germany?" only means "the capital of Germany" through the first turn.
    follow_up, history = model.chat(
        tokenizer, "And Germany?", history=history, do_sample=False, max_new_tokens=32
    )
    assert "Berlin" in follow_up
    assert [query for query, _ in history] == ["What is the capital of France?", "And Germany?"]


def test_logits_equal_transformers_llama_from_the_same_gguf(demo, llama_from_gguf):
    model, tokenizer = demo
    llama, llama_tokenizer = llama_from_gguf
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids.tolist() == llama_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
        with torch.no_grad():
            ours, theirs = model(ids).logits, llama(ids).logits
        assert ours.dtype == theirs.dtype == torch.float32
        assert (ours - theirs).abs().max().item() <= 1e-4, prompt


def test_converting_twice_gives_identical_files(llama_from_gguf, tmp_path):
    from qwen.checkpoints import convert_llama

    llama, tokenizer = llama_from_gguf
    digests = []
    for name in ("first", "second"):
        out = convert_llama(llama, tokenizer, tmp_path / name)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())})
    assert digests[0] == digests[1]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(digests[0])
    from safetensors import safe_open

    with safe_open(tmp_path / "first" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # no timestamps or paths that would differ between runs


def test_load_without_checkpoint_runs_the_demo_and_says_so(demo_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("QWEN_DEMO_DIR", str(demo_checkpoint.parent))
    model, _ = load_model_and_tokenizer(None, cpu_only=True)
    assert model.config.hidden_size == 576
    notes = [line for line in capsys.readouterr().err.splitlines() if "demo model" in line]
    assert len(notes) == 1
    assert "SmolLM2-135M-Instruct" in notes[0] and "-c Qwen/Qwen-7B-Chat" in notes[0]


def test_an_incomplete_cache_is_never_used(tmp_path, monkeypatch):
    partial = tmp_path / "SmolLM2-135M-Instruct-qwen"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # a conversion that died before writing the marker
    rebuilt = []

    def no_download(cache_dir=None, progress=True):
        rebuilt.append(cache_dir)
        raise CheckpointError("stop here")

    monkeypatch.setattr("qwen.demo.demo_gguf", no_download)
    with pytest.raises(CheckpointError, match="stop here"):
        prepare_demo(tmp_path, progress=False)
    assert rebuilt == [tmp_path]


def registry_down_env(demo_dir):
    """The environment of a process whose pip can only reach a closed local port, with its own demo cache."""
    return {
        **os.environ,
        "QWEN_DEMO_DIR": str(demo_dir),
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_FIND_LINKS": "",
    }


def test_unreachable_registry_says_how_to_use_a_real_checkpoint(tmp_path):
    # A fresh process whose pip can only reach a closed local port: the registry is "down".
    env = registry_down_env(tmp_path)
    code = "from qwen.demo import demo_checkpoint; demo_checkpoint()"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert done.returncode != 0
    assert "CheckpointError: Could not prepare the offline demo model (SmolLM2-135M-Instruct)" in done.stderr
    assert "-c Qwen/Qwen-7B-Chat" in done.stderr
    assert not list(tmp_path.glob("*.gguf"))


def test_a_second_process_waits_for_the_first_then_uses_its_result(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    from qwen.demo import DEMO_NAME, _ready_record

    checkpoint = tmp_path / f"{DEMO_NAME}-qwen"
    env = registry_down_env(tmp_path)  # it must not download
    with open(tmp_path / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "the first process" is preparing
        code = "from qwen.demo import demo_checkpoint; print(demo_checkpoint())"
        waiter = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert "another process is preparing the demo model; waiting" in waiter.stderr.readline()
        checkpoint.mkdir()  # the first process finishes: marker last
        (checkpoint / READY_MARKER).write_text(json.dumps(_ready_record()))
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert out.strip() == str(checkpoint)


def convert_demo_env(demo_checkpoint, demo_dir):
    """`python -m qwen.convert demo` into a fresh QWEN_DEMO_DIR holding (a link to) the cached GGUF: it converts,
    never downloads, and leaves the prepared demo model alone."""
    gguf = demo_gguf(demo_checkpoint.parent)
    (demo_dir / gguf.name).symlink_to(gguf)
    return registry_down_env(demo_dir)


def test_converting_away_from_a_terminal_prints_a_few_lines_and_no_bars(demo_checkpoint, tmp_path):
    done = subprocess.run([sys.executable, "-m", "qwen.convert", "demo"], env=convert_demo_env(demo_checkpoint, tmp_path),
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, timeout=600)  # fmt: skip
    err = done.stderr.decode()  # bytes: text mode would turn a bar's "\r" redraws into lines
    assert done.returncode == 0, err[-3000:]
    assert done.stdout.decode().strip() == str(tmp_path / "SmolLM2-135M-Instruct-qwen")
    assert "\r" not in err  # no bar redrawn into the log
    assert [line.split(" ")[2] for line in err.splitlines()] == ["converting", "demo"], err


def test_converting_on_a_terminal_draws_one_bar_in_place(demo_checkpoint, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "qwen.convert", "demo"], env=convert_demo_env(demo_checkpoint, tmp_path),
                          cwd=str(Path(__file__).resolve().parents[1]), dimensions=(24, 100), timeout=600,
                          encoding="utf-8")  # fmt: skip
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before[-3000:]
    rows = child.before.split("\r\n")  # the terminal's lines; a bar redraws its own row after "\r"
    bars = [row for row in rows if "%|" in row]
    assert len(bars) == 1 and "GGUF tensors" in bars[0], rows  # transformers' "Loading weights" bar is not drawn
    redraws = bars[0].strip("\r").split("\r")
    assert len(redraws) > 1 and redraws[-1].split(":")[1].lstrip().startswith("100%"), redraws
    assert max(map(len, redraws)) <= 100  # each fits the terminal's width, so "\r" goes back to its start
    assert [row.split(" ")[2] for row in rows if row.startswith("[qwen demo]")] == ["converting", "demo"]
