"""Nothing lost when fine-tuning stops early: Ctrl-C / SIGTERM (real signals to real processes, through the
launcher's torchrun and to finetune.py alone) save a checkpoint and say how to resume; a rerun never overwrites
checkpoints silently; a resume says where it resumes from and skips checkpoints whose save was cut short; a full
disk is one line."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

from qwen.checkpoints import make_tiny_checkpoint
from qwen.errors import UsageError
from qwen.sft.train import resume_checkpoint

EXAMPLE_DATA = REPO / "examples" / "finetune_data.json"
LAUNCHER = ["bash", "finetune/finetune_lora_single_gpu.sh"]
FLAGS = ["--gradient_accumulation_steps", "1", "--model_max_length", "256", "--lora_r", "4"]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "chat")


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    """A process in its own process group, as a terminal's foreground job (Ctrl-C signals the whole group)."""
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})})


def read_until(process: subprocess.Popen, needle: str, timeout: float = 240) -> str:
    """Output up to `needle` (the training loop's first logged step)."""
    output, deadline = b"", time.monotonic() + timeout
    while needle.encode() not in output:
        assert time.monotonic() < deadline and process.poll() is None, output.decode(errors="replace")[-3000:]
        if select.select([process.stdout], [], [], 1)[0]:
            output += os.read(process.stdout.fileno(), 65536)
    return output.decode(errors="replace")


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output.decode(errors="replace")


def run(command: list[str], env: dict | None = None) -> tuple[int, str]:
    return finish(start(command, env))


def last_line(output: str) -> str:
    return output.replace("\r", "\n").strip().splitlines()[-1]


def logged_steps(checkpoint_or_output: Path) -> list[int]:
    state = json.loads((checkpoint_or_output / "trainer_state.json").read_text(encoding="utf-8"))
    return [entry["step"] for entry in state["log_history"] if "loss" in entry]


def test_ctrl_c_on_a_launcher_saves_a_checkpoint_and_the_same_command_then_says_what_it_does(tmp_path, tiny_chat):
    out = tmp_path / "output_qwen"
    command = [*LAUNCHER, "-m", str(tiny_chat), "-d", str(EXAMPLE_DATA), "--", "--output_dir", str(out),
               "--max_steps", "1000", *FLAGS]
    env = {"MASTER_PORT": "29481"}
    process = start(command, env)
    read_until(process, "'loss'")
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    code, output = finish(process)
    assert code == 130 and "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    checkpoints = [path for path in out.iterdir() if path.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert last_line(output).startswith(f"Interrupted (SIGINT) at step {step}: saved {checkpoints[0]}. To continue")
    assert "--resume_from_checkpoint True" in last_line(output) and not (out / ".saving").exists()

    code, output = run(command, env)  # the same command again: refuses to overwrite, says what to do
    assert code == 2 and "Traceback" not in output and "Loading weights" not in output, output[-3000:]
    assert last_line(output) == (f"Error: {out} already holds checkpoint-{step} from an earlier run: add "
                                 "--resume_from_checkpoint True to continue from it, or pass another --output_dir "
                                 f"(or remove {out}) to start over")

    code, output = run([*command, "--resume_from_checkpoint", "True", "--max_steps", str(step + 1)], env)
    assert code == 0, output[-3000:]
    assert f"Resuming from {checkpoints[0]} (step {step}): the steps before it are not repeated" in output
    assert logged_steps(out) == list(range(1, step + 2))  # step + 1 trained after the checkpoint's steps


def test_sigterm_to_finetune_py_saves_a_checkpoint(tmp_path, tiny_chat):
    out = tmp_path / "out"
    process = start([sys.executable, "finetune.py", "--model_name_or_path", str(tiny_chat), "--data_path",
                     str(EXAMPLE_DATA), "--output_dir", str(out), "--use_lora", "True", "--max_steps", "1000",
                     "--logging_steps", "1", "--report_to", "none", *FLAGS])
    read_until(process, "'loss'")
    process.terminate()  # a job scheduler's SIGTERM, to the process alone
    code, output = finish(process)
    assert code == 143 and "Traceback" not in output, output[-3000:]
    assert last_line(output).startswith("Interrupted (SIGTERM) at step ")
    (checkpoint,) = out.glob("checkpoint-*")
    assert logged_steps(checkpoint)[-1] == int(checkpoint.name.split("-")[1])  # trainer_state: complete


def test_resume_without_a_checkpoint_is_one_line_before_loading(tmp_path, tiny_chat):
    code, output = run([sys.executable, "finetune.py", "--model_name_or_path", str(tiny_chat), "--data_path",
                        str(EXAMPLE_DATA), "--output_dir", str(tmp_path / "none"), "--resume_from_checkpoint", "True"])
    assert code == 2 and "Traceback" not in output and "Loading weights" not in output, output
    assert last_line(output) == (f"Error: --resume_from_checkpoint True: {tmp_path / 'none'} has no complete "
                                 "checkpoint to resume from; run without the flag to start training")


def fake_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "README.md").write_text("x")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_resume_skips_a_checkpoint_whose_save_was_cut_short(tmp_path, capsys):
    out = tmp_path / "out"
    good = fake_checkpoint(out, 20)
    cut = fake_checkpoint(out, 30, complete=False)
    args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint="True", process_index=0)
    assert resume_checkpoint(args) == str(good)
    assert capsys.readouterr().err.splitlines() == [
        f"Skipping {cut}: incomplete (its save was cut short)",
        f"Resuming from {good} (step 20): the steps before it are not repeated",
    ]
    with pytest.raises(UsageError, match="incomplete checkpoint"):
        resume_checkpoint(SimpleNamespace(output_dir=str(out), resume_from_checkpoint=str(cut), process_index=0))
    with pytest.raises(UsageError, match="already holds checkpoint-20 from an earlier run"):
        resume_checkpoint(SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None, process_index=0))


def test_earlier_model_without_checkpoints_is_replaced_saying_so(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert resume_checkpoint(SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None,
                                             process_index=0)) is None
    assert capsys.readouterr().err == f"{tmp_path} holds an earlier run's model: this run replaces it\n"


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB file system: the tiny model's LoRA checkpoints (the tokenizer is 2.5 MB of them) soon fill it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"needs permission to mount a small tmpfs (root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tiny_chat, small_disk):
    out = small_disk / "out"
    code, output = run([sys.executable, "finetune.py", "--model_name_or_path", str(tiny_chat), "--data_path",
                        str(EXAMPLE_DATA), "--output_dir", str(out), "--use_lora", "True", "--max_steps", "3",
                        "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none", *FLAGS])
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert last_line(output).startswith(f"Error: no space left on the device of {out} while saving")
    saved = sorted(out.iterdir())
    assert saved and all(path.name.startswith("checkpoint-") for path in saved)  # the cut-short save removed
    for path in saved:  # each one complete, to resume from
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        assert state["global_step"] == int(path.name.split("-")[1]) and (path / "optimizer.pt").is_file()
