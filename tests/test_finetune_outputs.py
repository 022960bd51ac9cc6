"""What a fine-tuning run leaves behind and reports: the original launchers' output directory (no extra
checkpoint with optimizer state at the end), files readable as the user's umask says, and a summary that
counts the training tokens and the dropped samples."""

import json
import os
import stat
import subprocess
import sys

import pytest
from conftest import REPO

from qwen.checkpoints import make_tiny_checkpoint

EXAMPLE_DATA = REPO / "examples" / "finetune_data.json"
# The original finetune.py's LoRA output (transformers 4.37, peft 0.7.1): the adapter, peft's model card, the
# tokenizer, trainer_state.json and training_args.bin. transformers 5 writes no special_tokens_map.json, and
# the tokenizer's code comes from `import qwen` instead of a copied tokenization_qwen.py.
ORIGINAL_LORA_OUTPUT = {"README.md", "adapter_config.json", "adapter_model.safetensors", "qwen.tiktoken",
                        "tokenizer_config.json", "trainer_state.json", "training_args.bin"}
OUR_EXTRAS = {"generation_config.json"}  # so every script's -c chats with the right stop tokens


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "chat")


def run_as_user(*command: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    """A command from the repository root as a user runs it, under umask 027 (group may read, others not)."""
    return subprocess.run(["bash", "-c", 'umask 027 && exec "$@"', "bash", *command], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def modes(directory) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in directory.iterdir() if path.is_file()}


def test_lora_launcher_writes_what_the_original_wrote_with_the_users_umask(tmp_path, tiny_chat):
    out, merged = tmp_path / "output_qwen", tmp_path / "merged"
    result = run_as_user("bash", "finetune/finetune_lora_single_gpu.sh", "-m", str(tiny_chat), "-d", str(EXAMPLE_DATA),
                         "--", "--output_dir", str(out), "--max_steps", "2", "--gradient_accumulation_steps", "1",
                         "--model_max_length", "256", env={"MASTER_PORT": "29471"})
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("FutureWarning", "parallel_mode", "Setting accelerator to CPU"):  # nothing the user can act on
        assert noise not in result.stderr + result.stdout
    # the launchers' --save_strategy steps --save_steps 1000: no checkpoint-2/ (optimizer state) at the end
    assert {path.name for path in out.iterdir()} == ORIGINAL_LORA_OUTPUT | OUR_EXTRAS
    assert set(modes(out).values()) == {0o640}  # the weights too (safetensors writes them 0600)

    result = run_as_user(sys.executable, "-m", "qwen.convert", "merge-lora", str(out), str(merged))
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(modes(merged).values()) == {0o640} and "model.safetensors" in modes(merged)


def train(argv: list[str]) -> dict:
    from transformers import HfArgumentParser

    from qwen.sft import ARGUMENT_CLASSES, modernize_argv
    from qwen.sft import train as run

    return run(*HfArgumentParser(ARGUMENT_CLASSES).parse_args_into_dataclasses(modernize_argv(argv)))


def test_summary_counts_training_tokens_and_dropped_samples(tmp_path, tiny_chat, capsys):
    from qwen.sft import SupervisedDataset, load_conversations
    from qwen.tokenization_qwen import QWenTokenizer

    data = tmp_path / "data.json"
    samples = [{"conversations": [{"from": "user", "value": f"Question {i}?"},
                                  {"from": "assistant", "value": f"Answer number {i}."}]} for i in range(4)]
    samples.append({"conversations": [{"from": "user", "value": "word " * 200},
                                      {"from": "assistant", "value": "lost to the cut"}]})
    data.write_text(json.dumps(samples), encoding="utf-8")
    summary = train(["--model_name_or_path", str(tiny_chat), "--data_path", str(data), "--eval_data_path",
                     str(EXAMPLE_DATA), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                     "--per_device_train_batch_size", "2", "--num_train_epochs", "1", "--model_max_length", "64",
                     "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "no"])
    expected = SupervisedDataset(load_conversations(data), QWenTokenizer.from_pretrained(tiny_chat), 64).report
    assert summary["samples"] == 4 and summary["dropped"] == 1 == expected.dropped
    assert summary["supervised_tokens"] == expected.supervised_tokens  # one epoch; eval batches not counted
    assert "(1 cut at --model_max_length, 1 dropped)" in capsys.readouterr().err


def test_a_data_error_under_the_launcher_is_the_last_line(tmp_path, tiny_chat):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": 5}]}]')
    result = run_as_user("bash", "finetune/finetune_lora_ds.sh", "-m", str(tiny_chat), "-d", str(bad), "--",
                         "--output_dir", str(tmp_path / "out"), env={"MASTER_PORT": "29472", "GPUS_PER_NODE": "2"})
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert lines[-1] == f'Error: {bad}, sample 0, turn 1: "value" must be a string, not a number'
    assert lines.count(lines[-1]) == 1  # said once, by rank 0


def test_the_launchers_flags_parse_and_load_without_deprecation_warnings(tiny_chat, tmp_path):
    import shlex
    import warnings

    from transformers import HfArgumentParser

    from qwen.sft import ARGUMENT_CLASSES, modernize_argv
    from qwen.sft.model import load_for_training

    command = subprocess.run(["bash", "finetune/finetune_lora_ds.sh", "-m", str(tiny_chat), "-d", str(EXAMPLE_DATA)],
                             cwd=REPO, env={**os.environ, "FINETUNE_DRY_RUN": "1"}, capture_output=True, text=True,
                             check=True).stdout
    argv = shlex.split(command)
    argv = argv[argv.index(str(REPO / "finetune.py")) + 1:]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model_args, _, training_args, lora_args = HfArgumentParser(ARGUMENT_CLASSES).parse_args_into_dataclasses(
            modernize_argv(argv))
        assert training_args.activation_checkpointing and training_args.use_lora
        training_args.deepspeed = None  # DeepSpeed wants its process group; the LoRA setup is what is checked
        load_for_training(model_args, training_args, lora_args)


def test_loaded_lines_name_the_adapter_and_the_4bit_weights(tmp_path, tiny_chat, capsys):
    from qwen.loading import load_model_and_tokenizer

    out = tmp_path / "qlora"
    train(["--model_name_or_path", str(tiny_chat), "--data_path", str(EXAMPLE_DATA), "--output_dir", str(out),
           "--use_lora", "True", "--q_lora", "True", "--lora_r", "4", "--max_steps", "1", "--report_to", "none",
           "--save_strategy", "no", "--model_max_length", "128"])
    assert "Loaded chat: nf4 4-bit weights (bitsandbytes), compute float32 on cpu" in capsys.readouterr().err
    load_model_and_tokenizer(str(out), cpu_only=True)
    loaded = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Loaded ")]
    assert loaded == ["Loaded qlora (LoRA adapter on chat, merged in): float32 weights on cpu, KV cache full "
                      "precision."]


def test_deepspeed_on_the_cpu_says_it_compiles_only_when_it_will(tmp_path, monkeypatch, capsys):
    from qwen.sft.train import DEEPSPEED_CPU_OP, _say_if_deepspeed_compiles

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _say_if_deepspeed_compiles()
    assert capsys.readouterr().err.startswith(f"DeepSpeed on the CPU: compiling its communication op {DEEPSPEED_CPU_OP}")
    (tmp_path / "py311_cpu" / DEEPSPEED_CPU_OP).mkdir(parents=True)
    (tmp_path / "py311_cpu" / DEEPSPEED_CPU_OP / f"{DEEPSPEED_CPU_OP}.so").write_bytes(b"")
    _say_if_deepspeed_compiles()
    assert capsys.readouterr().err == ""
