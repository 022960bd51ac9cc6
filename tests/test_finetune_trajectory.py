"""finetune.py trains step for step like the original: per-step losses and eval losses of full and LoRA runs on
the golden's tiny fp32 checkpoint equal the original finetune.py's own (tests/data/finetune_trajectory_golden.json),
and the same --seed gives the same LoRA adapter."""

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, load_reference, tiny_model
from safetensors.torch import load_file

from qwen.checkpoints import (
    HUB_GENERATION_CONFIG,
    HUB_TOKENIZER_CONFIG,
    hub_config_dict,
    save_state_dict,
    tiny_state_dict,
)
from qwen.tokenization_qwen import VOCAB_FILES_NAMES, default_vocab_file

GOLDEN = load_reference("finetune_trajectory_golden.json")
SIZES = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128}  # the golden's checkpoint recipe
WEIGHT_SEED = 1234
LORA_SEED = 1234  # the golden seeded torch with 1234 right before get_peft_model; ours seeds there with --seed
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def golden_checkpoint(tmp_path_factory):
    """The golden's tiny checkpoint, rebuilt from its recipe and checked against its per-tensor checksums."""
    out = tmp_path_factory.mktemp("trajectory") / "tiny"
    out.mkdir()
    config = {**hub_config_dict(**SIZES, seq_length=2048), "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps({**HUB_GENERATION_CONFIG, "chat_format": "chatml"}))
    (out / "tokenizer_config.json").write_text(json.dumps({**HUB_TOKENIZER_CONFIG, "model_max_length": 2048}))
    shutil.copyfile(default_vocab_file(), out / VOCAB_FILES_NAMES["vocab_file"])
    state_dict = tiny_state_dict(**SIZES, seed=WEIGHT_SEED, dtype=torch.float32)
    for name, expected in GOLDEN["checkpoint"]["tensor_checksums"].items():
        tensor = state_dict[name].double()
        assert list(tensor.shape) == expected["shape"], name
        assert tensor.sum().item() == pytest.approx(expected["sum"], rel=1e-9, abs=1e-9), name
        assert tensor.abs().sum().item() == pytest.approx(expected["abs_sum"], rel=1e-9), name
    save_state_dict(state_dict, out)
    for name in ("train", "eval"):
        (out.parent / f"{name}.json").write_text(json.dumps(GOLDEN[f"{name}_data"]), encoding="utf-8")
    return out


def golden_argv(checkpoint, output_dir, batch: int, lora: bool) -> list[str]:
    """The golden's flags (the original's names) with this run's paths, in file order, no saving, LoRA seeded."""
    flags = shlex.split(GOLDEN["flags"].split(";")[0].replace(" B ", f" {batch} ").replace(" B", f" {batch}"))
    flags[flags.index("--seed") + 1] = str(LORA_SEED)
    argv = [*flags, "--model_name_or_path", str(checkpoint), "--data_path", str(checkpoint.parent / "train.json"),
            "--eval_data_path", str(checkpoint.parent / "eval.json"), "--output_dir", str(output_dir),
            "--report_to", "none", "--save_strategy", "no", "--train_sampling_strategy", "sequential",
            "--disable_tqdm", "True"]
    return argv + (["--use_lora", "True", "--lora_dropout", "0"] if lora else [])


def run(argv: list[str]) -> list[dict]:
    from transformers import HfArgumentParser

    from qwen.sft import ARGUMENT_CLASSES, modernize_argv, train

    parsed = HfArgumentParser(ARGUMENT_CLASSES).parse_args_into_dataclasses(modernize_argv(argv))
    train(*parsed)
    state = json.loads((Path(parsed[2].output_dir) / "trainer_state.json").read_text(encoding="utf-8"))
    return state["log_history"]


@pytest.mark.parametrize("name,batch,lora", [("full_b1", 1, False), ("full_b2", 2, False), ("lora_b1", 1, True)])
def test_per_step_losses_equal_the_original(tmp_path, golden_checkpoint, name, batch, lora):
    expected = GOLDEN["runs"][name]
    history = run(golden_argv(golden_checkpoint, tmp_path / name, batch, lora))
    losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(losses) == len(expected["steps"])
    for step, (ours, theirs) in enumerate(zip(losses, expected["steps"], strict=True), start=1):
        assert abs(ours - theirs["loss"]) <= TOLERANCE, f"step {step}: {ours} vs the original's {theirs['loss']}"
    # the last eval runs again at the end of train(); the ones at --eval_steps come first
    for ours, theirs in zip(eval_losses, expected["eval_loss_at_steps"], strict=False):
        assert abs(ours - theirs) <= TOLERANCE, f"eval loss {ours} vs the original's {theirs}"


def test_same_seed_gives_the_same_lora_adapter(tmp_path, golden_checkpoint):
    adapters = []
    for name in ("first", "second"):
        argv = golden_argv(golden_checkpoint, tmp_path / name, 1, True)
        argv += ["--max_steps", "1", "--eval_strategy", "no"]
        run(argv)
        adapters.append(load_file(tmp_path / name / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key


def test_training_steps_compute_the_output_layer_only_where_a_label_is_supervised(tmp_path):
    from transformers import TrainingArguments

    from qwen.sft import SFTCollator
    from qwen.sft.train import SFTTrainer

    torch.manual_seed(0)
    samples = []
    for length, prompt in ((12, 5), (7, 3), (9, 8), (5, 1)):
        ids = torch.randint(1, TINY_VOCAB, (length,)).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    model = tiny_model().train()
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=samples, data_collator=SFTCollator(pad_id=0))
    trainer.train()
    # labels are shifted by one: a sample of n tokens with p unsupervised ones has n - p targets
    assert rows == [(12 - 5) + (7 - 3) + (9 - 8) + (5 - 1)]  # not 4 x 12 padded positions
    assert trainer.trained_tokens == sum(rows)
