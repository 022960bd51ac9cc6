"""The model to train: full weights, LoRA, or Q-LoRA (nf4 with bitsandbytes, or the hub's GPTQ checkpoints);
saving the output directory every script loads, and merging an adapter into a full checkpoint."""

import json
import os
import stat
import warnings
from pathlib import Path

import torch

from .. import chat_api
from .args import lora_target_modules

# A base model has never seen the ChatML tokens: their embeddings and output rows must be learned too.
BASE_MODEL_MODULES_TO_SAVE = ["wte", "lm_head"]


def is_chat_model(model) -> bool:
    """From the checkpoint's generation_config (chat_api's one rule: only a base model says "raw"), never from its
    path as the original finetune.py did."""
    return chat_api.is_chat_model(model.generation_config)


def _train_dtype(training_args) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    return torch.float16 if training_args.fp16 else torch.float32


def _gptq_checkpoint(name: str | None) -> dict | None:
    """config.json of `name` when it is a GPTQ checkpoint (e.g. Qwen/Qwen-7B-Chat-Int4), else None."""
    if name is None:  # the demo model
        return None
    from ..loading import check_checkpoint, resolve_checkpoint
    from ..quantize import gptq_quantization

    config = check_checkpoint(resolve_checkpoint(name))
    return config if gptq_quantization(config) is not None else None


def load_for_training(model_args, training_args, lora_args):
    """(model, tokenizer) ready for the Trainer: full weights, or a PEFT model with LoRA (on 4-bit for Q-LoRA)."""
    from ..loading import load_model_and_tokenizer

    dtype = _train_dtype(training_args)
    kwargs = {}
    if lora_args.q_lora and (gptq := _gptq_checkpoint(model_args.model_name_or_path)) is not None:
        # Q-LoRA on the hub's Int4 (or Int8) checkpoint, as the original: LoRA on top of the GPTQ layers, through a
        # GPT-QModel kernel with a backward pass.
        from ..quantize import gptq_load_kwargs

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        kwargs.update(gptq_load_kwargs(gptq, device, trainable=True))
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    elif lora_args.q_lora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, device="cpu" if "device_map" not in kwargs else None, dtype=dtype,
        cache_dir=training_args.cache_dir, **kwargs,
    )
    model.config.use_cache = False  # no KV cache while training
    if not training_args.use_lora:
        return model, tokenizer

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_target_modules(lora_args.lora_target_modules),
        bias=lora_args.lora_bias,
        task_type="CAUSAL_LM",
        modules_to_save=None if is_chat_model(model) else list(BASE_MODEL_MODULES_TO_SAVE),
    )
    with warnings.catch_warnings():
        # peft reads model.is_gradient_checkpointing, which transformers 5 deprecates: not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        if lora_args.q_lora:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=training_args.activation_checkpointing
            )
        torch.manual_seed(training_args.seed)  # LoRA A's random init: the same --seed gives the same adapter
        model = get_peft_model(model, config)
    # The adapter names the base model as the user did (a hub id stays a hub id), or the demo model's path.
    model.peft_config["default"].base_model_name_or_path = (
        model_args.model_name_or_path or model.base_model.model.name_or_path
    )
    if training_args.activation_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need inputs that require grad
    return model, tokenizer


def save_output(trainer, tokenizer, model, output_dir: str) -> None:
    """The trained model (or adapter), tokenizer and generation_config: a directory every script's -c loads."""
    trainer.save_model(output_dir)  # gathers ZeRO-3 shards; a PEFT model saves only its adapter
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        generation_config = getattr(model, "generation_config", None) or model.get_base_model().generation_config
        generation_config.save_pretrained(output_dir)
        apply_umask(output_dir)


def apply_umask(directory: str | os.PathLike) -> None:
    """Files written private (0600: safetensors >= 0.8 writes through a private temp file) get the mode the
    user's umask gives every other file, so a Docker mount or another user can read the weights."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600:
            path.chmod(mode)


def merge_lora(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, shard_size: str = "2GB",
               base: str | None = None) -> Path:
    """A full checkpoint in the hub layout from a LoRA / Q-LoRA adapter directory: the adapter merged into the
    base weights (the unquantized ones for Q-LoRA), saved in the base checkpoint's dtype with the tokenizer and
    generation_config. `base` replaces the base model the adapter names: an adapter trained on a GPTQ Int4
    checkpoint merges into the matching bf16 one (Qwen-7B-Chat for Qwen-7B-Chat-Int4)."""
    from ..errors import CheckpointError
    from ..loading import ADAPTER_CONFIG, DTYPES, load_adapter_checkpoint, resolve_checkpoint

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{adapter_dir} is not a LoRA adapter directory (it has no {ADAPTER_CONFIG})")
    base = base or json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    base_config = json.loads((resolve_checkpoint(base) / "config.json").read_text(encoding="utf-8")) if base else {}
    if "quantization_config" in base_config:
        raise CheckpointError(
            f"{base} is a quantized checkpoint: merge into the matching full-precision model instead, e.g. "
            "--base Qwen/Qwen-7B-Chat for an adapter trained on Qwen/Qwen-7B-Chat-Int4 (then re-quantize the merge "
            "with run_gptq.py if you want it quantized)."
        )
    model, tokenizer = load_adapter_checkpoint(adapter_dir, cpu_only=True, dtype="fp32", base=base)  # merge in fp32
    saved_dtype = DTYPES.get(str(base_config.get("torch_dtype") or base_config.get("dtype")))
    if saved_dtype is not None:  # the base checkpoint's own precision (bf16 on the hub)
        model = model.to(saved_dtype)
    model.save_pretrained(out, max_shard_size=shard_size)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    apply_umask(out)
    return out


__all__ = ["BASE_MODEL_MODULES_TO_SAVE", "apply_umask", "is_chat_model", "load_for_training", "merge_lora", "save_output"]
