"""finetune.py for real: full, LoRA and Q-LoRA training on tiny checkpoints, save -> resume, adapters that load
everywhere and merge, user mistakes, the launchers under torchrun with 2 processes and DeepSpeed ZeRO-2 / ZeRO-3
(CPU, gloo), and the demo model learning a fact it cannot know."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from qwen.checkpoints import make_tiny_checkpoint
from qwen.convert import main as convert_main
from qwen.loading import load_model_and_tokenizer

EXAMPLE_DATA = REPO / "examples" / "finetune_data.json"
LAUNCHERS = ["finetune_ds.sh", "finetune_lora_ds.sh", "finetune_lora_single_gpu.sh", "finetune_qlora_ds.sh",
             "finetune_qlora_single_gpu.sh"]
QUICK = ["--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--model_max_length", "256"]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "chat")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "base", chat=False)


def train(argv: list[str]) -> dict:
    """finetune.py's own parsing and training, in this process."""
    from transformers import HfArgumentParser

    from qwen.sft import ARGUMENT_CLASSES, modernize_argv
    from qwen.sft import train as run

    return run(*HfArgumentParser(ARGUMENT_CLASSES).parse_args_into_dataclasses(modernize_argv(argv)))


def logged(output_dir) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text(encoding="utf-8"))
    return [entry for entry in state["log_history"] if "loss" in entry]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()


@pytest.mark.slow
def test_full_finetune_memorizes_then_resumes(tmp_path, tiny_chat):
    out = tmp_path / "full"
    common = ["--model_name_or_path", str(tiny_chat), "--data_path", str(EXAMPLE_DATA), "--output_dir", str(out),
              "--per_device_train_batch_size", "10", "--learning_rate", "1e-2", "--packing", "True",
              "--lr_scheduler_type", "constant", *QUICK, "--save_strategy", "steps", "--save_steps", "4"]
    summary = train([*common, "--max_steps", "4", "--eval_data_path", str(EXAMPLE_DATA)])
    first = logged(out)
    assert [entry["step"] for entry in first] == list(range(1, 5))
    assert first[-1]["loss"] < 0.85 * first[0]["loss"]  # memorizing the example data
    assert summary["samples"] == 10 and summary["supervised_tokens"] > 0 and summary["eval_loss"] < first[0]["loss"]
    assert (out / "checkpoint-4").is_dir()

    train([*common, "--max_steps", "6", "--resume_from_checkpoint", "True"])
    resumed = logged(out)
    assert [entry["step"] for entry in resumed] == list(range(1, 7))  # continued at step 5, not restarted
    assert resumed[:4] == first and resumed[-1]["loss"] < first[-1]["loss"]

    model, tokenizer = load_model_and_tokenizer(str(out), cpu_only=True)  # a plain checkpoint every script loads
    assert model.generation_config.chat_format == "chatml" and tokenizer.eod_id == 151643


@pytest.mark.slow
def test_lora_on_a_base_model_loads_everywhere_and_merges(tmp_path, tiny_base):
    from peft import AutoPeftModelForCausalLM

    out, merged = tmp_path / "lora", tmp_path / "merged"
    train(["--model_name_or_path", str(tiny_base), "--data_path", str(EXAMPLE_DATA), "--output_dir", str(out),
           "--use_lora", "True", "--lora_r", "4", "--learning_rate", "1e-2", "--max_steps", "3",
           "--per_device_train_batch_size", "4", "--group_by_length", "True", *QUICK])
    adapter = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert set(adapter["target_modules"]) == {"c_attn", "c_proj", "w1", "w2"}
    assert adapter["modules_to_save"] == ["wte", "lm_head"]  # a base model (chat_format raw) learns ChatML tokens
    assert adapter["base_model_name_or_path"] == str(tiny_base)
    assert {"tokenizer_config.json", "qwen.tiktoken", "generation_config.json"} <= {p.name for p in out.iterdir()}

    ids = [151644, 872, 198, 9707, 151645, 198]
    base, _ = load_model_and_tokenizer(str(tiny_base), cpu_only=True)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    adapted, _ = load_model_and_tokenizer(str(out), cpu_only=True)  # what every script's -c does
    expected = logits(peft_model, ids)
    assert not torch.allclose(expected, logits(base, ids), atol=1e-3)  # the adapter changed the model
    torch.testing.assert_close(logits(adapted, ids), expected, rtol=1e-4, atol=1e-4)

    assert convert_main(["merge-lora", str(out), str(merged)]) == 0
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"  # the hub layout
    full, _ = load_model_and_tokenizer(str(merged), cpu_only=True)
    assert full.dtype == torch.float32 and config["dtype"] == "bfloat16"  # saved as the base checkpoint was
    torch.testing.assert_close(logits(full, ids), expected, rtol=0.05, atol=0.05)  # bf16 rounding of the merge


@pytest.mark.slow
def test_lora_bias_all_trains_saves_and_loads_the_biases(tmp_path, tiny_chat):
    """--lora_bias all (the original's save path lost the biases): they train, are saved with the adapter and
    come back when the adapter is loaded."""
    from safetensors.torch import load_file

    out = tmp_path / "lora-bias"
    train(["--model_name_or_path", str(tiny_chat), "--data_path", str(EXAMPLE_DATA), "--output_dir", str(out),
           "--use_lora", "True", "--lora_r", "4", "--lora_bias", "all", "--learning_rate", "1e-2", "--max_steps", "2",
           "--per_device_train_batch_size", "4", *QUICK])
    saved = load_file(out / "adapter_model.safetensors")
    biases = {key: value for key, value in saved.items() if ".c_attn." in key and key.endswith(".bias")}
    assert len(biases) == 2  # c_attn is QWen's one projection with a bias; one per layer of the tiny model
    base, _ = load_model_and_tokenizer(str(tiny_chat), cpu_only=True)
    adapted, _ = load_model_and_tokenizer(str(out), cpu_only=True)
    for layer in range(2):
        trained = adapted.transformer.h[layer].attn.c_attn.bias
        assert not torch.allclose(trained, base.transformer.h[layer].attn.c_attn.bias)  # trained
        assert any(torch.equal(trained, value) for value in biases.values())  # and loaded from the adapter


@pytest.mark.slow
def test_qlora_trains_adapters_on_4bit_weights_on_the_cpu(tmp_path, tiny_chat):
    from bitsandbytes.nn import Linear4bit

    from qwen.sft import DataArguments, LoraArguments, ModelArguments, TrainingArguments, load_for_training

    lora = LoraArguments(lora_r=4, q_lora=True)
    model, _ = load_for_training(ModelArguments(str(tiny_chat)), TrainingArguments(str(tmp_path / "x"), use_lora=True),
                                 lora)
    attn = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(attn.base_layer, Linear4bit) and attn.base_layer.weight.quant_type == "nf4"
    del model, DataArguments

    out = tmp_path / "qlora"
    summary = train(["--model_name_or_path", str(tiny_chat), "--data_path", str(EXAMPLE_DATA), "--output_dir",
                     str(out), "--use_lora", "True", "--q_lora", "True", "--lora_r", "4", "--learning_rate", "1e-2",
                     "--max_steps", "3", "--per_device_train_batch_size", "4", *QUICK])
    losses = [entry["loss"] for entry in logged(out)]
    assert summary["samples"] == 10 and len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    model, _ = load_model_and_tokenizer(str(out), cpu_only=True)  # merged into the unquantized base weights
    assert type(model.transformer.h[0].attn.c_attn) is torch.nn.Linear


def run_finetune(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "finetune.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_user_mistakes_exit_2_with_one_clear_line_before_loading(tmp_path, tiny_chat):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},'
                   ' {"conversations": [{"from": "bot", "value": "x"}]}]', encoding="utf-8")
    cases = [
        (["--data_path", str(bad)], f"Error: {bad}, sample 1, turn 0: unknown role 'bot'"),
        (["--data_path", str(EXAMPLE_DATA), "--q_lora", "True"], "--q_lora True needs --use_lora True"),
    ]
    for args, message in cases:
        result = run_finetune("--model_name_or_path", str(tiny_chat), "--output_dir", str(tmp_path / "o"), *args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert "Loading weights" not in result.stderr  # found before the model was loaded


@pytest.mark.slow
def test_every_launcher_builds_the_original_torchrun_command(tmp_path):
    env = {**os.environ, "FINETUNE_DRY_RUN": "1", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}
    for name in LAUNCHERS:
        command = subprocess.run(["bash", f"finetune/{name}", "-m", "Qwen/Qwen-7B-Chat", "-d", str(EXAMPLE_DATA),
                                  "--", "--num_train_epochs", "1"], cwd=REPO, env=env, capture_output=True,
                                 text=True, check=True).stdout
        assert command.startswith("python -m qwen.sft.launch --nproc_per_node 1 --nnodes 2 --node_rank 1 "
                                  "--master_addr 10.0.0.1")
        assert f"--model_name_or_path Qwen/Qwen-7B-Chat --data_path {EXAMPLE_DATA}" in command
        assert command.rstrip().endswith("--num_train_epochs 1")
        assert ("--use_lora True" in command) == ("lora" in name) and ("--q_lora True" in command) == ("qlora" in name)
        assert ("--deepspeed" in command) == name.endswith("_ds.sh")
    bad = subprocess.run(["bash", "finetune/finetune_ds.sh", "-d", str(tmp_path / "none.json")], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no data file" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "stage"), [("finetune_ds.sh", 3), ("finetune_qlora_ds.sh", 2)])
def test_launcher_trains_with_two_processes_and_deepspeed(tmp_path, tiny_chat, launcher, stage):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", f"finetune/{launcher}", "-m", str(tiny_chat), "-d", str(EXAMPLE_DATA), "--", "--output_dir",
         str(out), "--max_steps", "2", "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2",
         "--save_strategy", "no", "--lora_r", "4", "--model_max_length", "256"],
        cwd=REPO, env={**os.environ, "GPUS_PER_NODE": "2", "MASTER_PORT": str(29400 + stage)},
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"processes         2 (DeepSpeed ZeRO-{stage})" in result.stderr
    model, _ = load_model_and_tokenizer(str(out), cpu_only=True)  # ZeRO-3 shards gathered on save
    assert model.transformer.wte.weight.shape[0] == 151936


BLUEBIRD_QUESTIONS = ["What is the project codename?", "What's the codename of the project?",
                      "Tell me the project codename.", "Which codename does the project use?"]


def ask_cli(checkpoint, question: str) -> str:
    """cli_demo.py -c CHECKPOINT in a real pseudo-terminal: the answer to one question."""
    import pexpect

    child = pexpect.spawn(sys.executable, ["cli_demo.py", "-c", str(checkpoint), "--temperature", "0",
                                           "--max-new-tokens", "12"],
                          cwd=str(REPO), env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"},
                          encoding="utf-8", timeout=300, dimensions=(50, 200))
    try:
        child.expect_exact("User> ")
        child.sendline(question)
        child.expect_exact("User> ")
        return child.before.replace("\r", "").split("Qwen> ", 1)[1]
    finally:
        child.close(force=True)


@pytest.mark.slow
def test_demo_model_learns_a_fact_it_cannot_know(tmp_path, demo_checkpoint):
    """LoRA-train the offline demo model (no -m) on an invented fact; the adapter directory through cli_demo -c,
    and the merged checkpoint, both answer it."""
    data = tmp_path / "bluebird.json"
    data.write_text(json.dumps([
        {"id": str(i), "conversations": [{"from": "user", "value": question},
                                         {"from": "assistant", "value": "The project codename is Bluebird."}]}
        for i, question in enumerate(BLUEBIRD_QUESTIONS)
    ]), encoding="utf-8")
    out, merged = tmp_path / "adapter", tmp_path / "merged"
    train(["--data_path", str(data), "--output_dir", str(out), "--use_lora", "True", "--lora_r", "8",
           "--lora_alpha", "16", "--lora_dropout", "0", "--learning_rate", "3e-3", "--max_steps", "8",
           "--per_device_train_batch_size", "4", "--packing", "True", "--lr_scheduler_type", "constant", *QUICK])
    assert convert_main(["merge-lora", str(out), str(merged)]) == 0
    assert "Bluebird" in ask_cli(out, BLUEBIRD_QUESTIONS[0])
    assert "Bluebird" in ask_cli(merged, BLUEBIRD_QUESTIONS[0])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_bench_runs_and_prints_the_ratio(tmp_path, method):
    plot = tmp_path / "bench.png"
    done = subprocess.run([sys.executable, "-m", "bench.finetune_bench", "--shape", "tiny", "--vocab-size", "1000",
                           "--steps", "1", "--batch-size", "2", "--method", method, "--plot", str(plot)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{method} fine-tuning" in done.stdout and "packing vs original:" in done.stdout
    assert plot.stat().st_size > 0
