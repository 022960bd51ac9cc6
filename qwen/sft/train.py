"""The training run: data checked before the model loads, the HF Trainer, the output directory and the summary."""

import math
import resource
import sys
import time
from pathlib import Path

import torch
import transformers

from qwen_generation_utils import eod_id

from .args import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    TrainingArguments,
    _zero_stage,
    check_arguments,
)
from .data import IGNORE_INDEX, SFTCollator, SupervisedDataset, load_conversations
from .model import apply_umask, load_for_training, save_output


class SFTTrainer(transformers.Trainer):
    """The HF Trainer, counting the supervised tokens it trains on (evaluation batches are not counted)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_tokens = 0  # supervised next-token targets of every training micro-batch, this process
        self.add_callback(OnlyRequestedCheckpoints())

    def training_step(self, model, inputs, *args, **kwargs):
        self.trained_tokens += int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum())
        return super().training_step(model, inputs, *args, **kwargs)


class OnlyRequestedCheckpoints(transformers.TrainerCallback):
    """Checkpoints only where --save_strategy/--save_steps put them, as the original's transformers did: since 4.39
    the Trainer also writes one (optimizer state included) at the last step, next to the final model."""

    def on_step_end(self, args, state, control, **kwargs):
        last = state.global_step >= state.max_steps
        on_schedule = state.save_steps > 0 and state.global_step % state.save_steps == 0
        if last and args.save_strategy == transformers.trainer_utils.SaveStrategy.STEPS and not on_schedule:
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            apply_umask(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def _peak_memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # ru_maxrss is KiB


def _all_ranks_sum(value: int) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        on_gpu = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only
        total = torch.tensor([value], dtype=torch.long, device=torch.cuda.current_device() if on_gpu else "cpu")
        torch.distributed.all_reduce(total)
        return int(total.item())
    return value


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
          lora_args: LoraArguments) -> dict:
    """Fine-tune; returns the summary (also printed on the main process)."""
    check_arguments(training_args, lora_args, data_args)
    # Bad data fails here, before a (possibly large) model is loaded.
    paths = [data_args.data_path] + ([data_args.eval_data_path] if data_args.eval_data_path else [])
    conversations = [load_conversations(path, data_args.system_message) for path in paths]
    model, tokenizer = load_for_training(model_args, training_args, lora_args)
    main_process = training_args.process_index == 0
    max_len = training_args.model_max_length
    train_data, *evals = [
        SupervisedDataset(samples, tokenizer, max_len, path) for samples, path in zip(conversations, paths, strict=True)
    ]
    eval_data = evals[0] if evals else None
    if main_process:
        for report in [train_data.report] + ([eval_data.report] if eval_data else []):
            print("\n".join(report.lines(max_len)), file=sys.stderr)

    collator = SFTCollator(pad_id=eod_id(tokenizer), packing=data_args.packing)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        processing_class=tokenizer,
    )
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        resume = True
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    trainer.save_state()
    save_output(trainer, tokenizer, model, training_args.output_dir)
    supervised = _all_ranks_sum(trainer.trained_tokens)
    summary = {
        "samples": train_data.report.samples,
        "truncated": train_data.report.truncated,
        "dropped": train_data.report.dropped,
        "supervised_tokens": supervised,
        "tokens_per_second": supervised / seconds if seconds else math.nan,
        "train_loss": result.training_loss,
        "peak_memory": _peak_memory(),
        "output_dir": training_args.output_dir,
        "processes": training_args.world_size,
        "deepspeed_zero_stage": _zero_stage(training_args) if trainer.is_deepspeed_enabled else None,
    }
    if eval_data is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    if main_process:
        print(summary_text(summary), file=sys.stderr)
    return summary


def summary_text(summary: dict) -> str:
    lines = [
        "Fine-tuning done.",
        f"  samples           {summary['samples']} ({summary['truncated']} cut at --model_max_length, "
        f"{summary['dropped']} dropped)",
        f"  supervised tokens {summary['supervised_tokens']} trained, {summary['tokens_per_second']:.1f} tokens/s",
        f"  train loss        {summary['train_loss']:.4f}",
    ]
    if "eval_loss" in summary:
        lines.append(f"  eval loss         {summary['eval_loss']:.4f}")
    lines += [
        f"  processes         {summary['processes']}"
        + (f" (DeepSpeed ZeRO-{summary['deepspeed_zero_stage']})" if summary["deepspeed_zero_stage"] else ""),
        f"  peak memory       {summary['peak_memory']} (this process)",
        f"  output            {summary['output_dir']}",
        f"Chat with it:       python cli_demo.py -c {summary['output_dir']}",
    ]
    return "\n".join(lines)


__all__ = ["SFTTrainer", "summary_text", "train"]
