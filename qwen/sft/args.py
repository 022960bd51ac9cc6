"""finetune.py's flags: the original's names (and its renamed ones), the LoRA presets, and the checks of flag
combinations that cannot work, made before anything is loaded."""

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from qwen_generation_utils import DEFAULT_SYSTEM

from ..errors import UsageError

# --lora_target_modules presets; "qwen" is the original's default list (c_proj is in both attn and mlp).
LORA_TARGET_PRESETS = {
    "qwen": ["c_attn", "c_proj", "w1", "w2"],
    "attention": ["c_attn", "attn.c_proj"],
    "mlp": ["w1", "w2", "mlp.c_proj"],
    "all-linear": "all-linear",
}


# Flags of the original's launch commands that transformers has since renamed: old -> new.
RENAMED_FLAGS = {
    "--evaluation_strategy": "--eval_strategy",
    "--warmup_ratio": "--warmup_steps",  # a float in [0, 1) is a ratio of the total steps
    "--gradient_checkpointing": "--activation_checkpointing",  # the old name warns (FutureWarning) in transformers 5
    "--gradient_checkpointing_kwargs": "--activation_checkpointing_kwargs",
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "hub id or checkpoint directory (default: the offline demo model)"}
    )


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "training data: JSON list or JSONL"})
    eval_data_path: str | None = field(default=None, metadata={"help": "evaluation data, same formats"})
    lazy_preprocess: bool = field(
        default=False,
        metadata={"help": "accepted for the original's commands; samples are always tokenized up front so "
                  "bad data fails before training and truncation is counted"},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "pack each batch's samples into one row (positions restart per sample, attention "
                  "stays inside each sample): no padding at all"},
    )
    system_message: str = field(default=DEFAULT_SYSTEM, metadata={"help": "system prompt of samples without one"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(
        default=8192, metadata={"help": "longest sample in tokens; longer ones are cut (and counted)"}
    )
    use_lora: bool = field(default=False)

    def __post_init__(self):
        if not self.deepspeed and not torch.cuda.is_available():
            # DeepSpeed (imported by accelerate when installed) warns "Setting accelerator to CPU" unless told
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # torchrun on a machine without GPUs: train on the CPU over gloo, with DeepSpeed too. transformers and
        # accelerate only wire DeepSpeed to a GPU backend, so the process group is set up here and handed over.
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.ddp_backend = self.ddp_backend or "gloo"
            if self.deepspeed:
                _deepspeed_state_on_cpu(self.ddp_backend)
                if self.accelerator_config is None:
                    self.accelerator_config = {"use_configured_state": True}
            else:
                self.use_cpu = True
        super().__post_init__()


class _OneProcessGroupNote(logging.Filter):
    """Drops transformers' "process group is initialized, but parallel_mode != DISTRIBUTED" warning for one
    process under torchrun (the launchers' CPU default): accelerate makes a group of one, and nothing is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
        return not (one_process and "parallel_mode != ParallelMode.DISTRIBUTED" in record.getMessage())


logging.getLogger("transformers.training_args").addFilter(_OneProcessGroupNote())


def _deepspeed_state_on_cpu(backend: str) -> None:
    """accelerate's process state for DeepSpeed over a CPU backend (it would otherwise run one process alone)."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read once, by this PartialState
    try:
        PartialState(backend=backend)
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


@dataclass
class LoraArguments:
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGET_PRESETS["qwen"]),
        metadata={"help": f"module names, or one preset: {', '.join(LORA_TARGET_PRESETS)}"},
    )
    lora_weight_path: str = field(default="", metadata={"help": "unused, as in the original"})
    lora_bias: str = field(default="none", metadata={"choices": ["none", "all", "lora_only"]})
    q_lora: bool = field(default=False, metadata={"help": "LoRA on the model quantized to 4-bit nf4"})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments, LoraArguments)


def modernize_argv(argv: Sequence[str]) -> list[str]:
    """The original's commands as today's transformers reads them (renamed flags; --group_by_length [True])."""
    out, args = [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name == "--group_by_length":
            if not eq and i + 1 < len(args) and args[i + 1].lower() in ("true", "false"):
                value, i = args[i + 1], i + 1
            if (value or "true").lower() == "true":
                out += ["--train_sampling_strategy", "group_by_length"]
        else:
            out.append(RENAMED_FLAGS.get(name, name) + eq + value if name in RENAMED_FLAGS else arg)
        i += 1
    return out


def lora_target_modules(names: Sequence[str]) -> list[str] | str:
    if len(names) == 1 and names[0] in LORA_TARGET_PRESETS:
        return LORA_TARGET_PRESETS[names[0]]
    return list(names)


def check_arguments(training_args: TrainingArguments, lora_args: LoraArguments, data_args: DataArguments) -> None:
    """UsageError for flag combinations that cannot work, before anything is loaded."""
    if data_args.data_path is None:
        raise UsageError("--data_path is required: a JSON list or JSONL file of conversations")
    if lora_args.q_lora and not training_args.use_lora:
        raise UsageError("--q_lora True needs --use_lora True (Q-LoRA trains LoRA adapters on a 4-bit model)")
    if lora_args.q_lora and _zero_stage(training_args) == 3:
        raise UsageError("--q_lora does not work with ZeRO-3 (4-bit weights cannot be partitioned): use "
                         "finetune/ds_config_zero2.json")
    if training_args.model_max_length < 2:
        raise UsageError("--model_max_length must be at least 2")


def _zero_stage(training_args) -> int:
    config = training_args.deepspeed
    if not config:
        return 0
    if isinstance(config, str):
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--deepspeed {training_args.deepspeed}: cannot read the DeepSpeed config ({exc})") from None
    return int(config.get("zero_optimization", {}).get("stage", 0))


__all__ = ["ARGUMENT_CLASSES", "DataArguments", "LORA_TARGET_PRESETS", "LoraArguments", "ModelArguments", "TrainingArguments", "check_arguments", "lora_target_modules", "modernize_argv"]
