"""The training run: data checked before the model loads, the HF Trainer, the output directory and the summary."""

import contextlib
import errno
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.utils.cpp_extension
import transformers
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import rotate_checkpoints

from qwen_generation_utils import eod_id

from ..errors import UsageError
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

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint-N directories
STAGING_DIR = ".saving"  # a checkpoint is written under OUTPUT/.saving/ and renamed into OUTPUT/ when complete
LOW_SPACE_BYTES = 64 * 2**20  # a save that fails with less free than this ran out of space


class Interrupted(Exception):
    """Training stopped on SIGINT / SIGTERM; the message (already printed) says what was saved."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class SFTTrainer(transformers.Trainer):
    """The HF Trainer, counting the supervised tokens it trains on (evaluation batches are not counted), with
    checkpoints written atomically (into OUTPUT/.saving/, then renamed) and only where the flags ask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_tokens = 0  # supervised next-token targets of every training micro-batch, this process
        self._staging = False
        self.add_callback(OnlyRequestedCheckpoints())

    def training_step(self, model, inputs, *args, **kwargs):
        self.trained_tokens += int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum())
        # A training step needs only the loss: no logits at unsupervised positions (evaluation keeps them all).
        return super().training_step(model, {**inputs, "skip_logits": True}, *args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged = run_dir / STAGING_DIR / name
        if self.args.should_save and staged.exists():
            shutil.rmtree(staged)  # left by a save that was killed
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank's shards are written
        if self.args.should_save and staged.exists():
            if (run_dir / name).exists():
                shutil.rmtree(run_dir / name)  # an incomplete one of an earlier run
            os.replace(staged, run_dir / name)
            with contextlib.suppress(OSError):
                (run_dir / STAGING_DIR).rmdir()
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == run_dir / STAGING_DIR:
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


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


class StopOnSignal(transformers.TrainerCallback):
    """SIGINT (Ctrl-C) / SIGTERM: finish the current step, save a checkpoint to resume from, and stop. Every rank
    stops at the same step (the flag is summed across ranks at each step end). Before training starts, and on a
    repeated signal a few seconds later, the signal interrupts at once."""

    REPEAT_SECONDS = 2.0  # torchrun forwards the terminal's Ctrl-C within milliseconds: not a second press

    def __init__(self, main_process: bool):
        self.main_process = main_process
        self.signum: int | None = None
        self.received_at = 0.0
        self.training = False
        self.stopped_at: int | None = None

    def install(self) -> None:
        self.previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if not self.training:
            raise KeyboardInterrupt
        if self.signum is not None:
            if time.monotonic() - self.received_at > self.REPEAT_SECONDS:
                raise KeyboardInterrupt
            return
        self.signum, self.received_at = signum, time.monotonic()
        if self.main_process:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                  "(press Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_step_end(self, args, state, control, **kwargs):
        if _all_ranks_sum(int(self.signum is not None)):
            self.signum = self.signum or signal.SIGTERM  # another rank got it
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False


def checkpoints(output_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint-N directories of `output_dir`, by step. Complete ones hold
    trainer_state.json (the Trainer writes it last); a save cut short leaves OUTPUT/.saving/ instead."""
    out = Path(output_dir)
    found = sorted((int(match[1]), path) for path in (out.iterdir() if out.is_dir() else ())
                   if path.is_dir() and (match := CHECKPOINT_NAME.match(path.name)))
    complete = [path for _, path in found if (path / TRAINER_STATE_NAME).is_file()]
    return complete, [path for _, path in found if path not in complete]


def resume_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from, or None to start; a UsageError when the output directory holds an earlier
    run's checkpoints and the flags do not say what to do with them (they are never overwritten silently)."""
    out, wanted = Path(training_args.output_dir), training_args.resume_from_checkpoint
    complete, incomplete = checkpoints(out)
    say = print if training_args.process_index == 0 else (lambda *a, **k: None)
    if isinstance(wanted, str) and wanted.lower() in ("true", "last", "latest"):
        if not complete:
            raise UsageError(f"--resume_from_checkpoint {wanted}: {out} has no complete checkpoint to resume from; "
                             "run without the flag to start training")
        for path in incomplete:
            if int(CHECKPOINT_NAME.match(path.name)[1]) > int(CHECKPOINT_NAME.match(complete[-1].name)[1]):
                say(f"Skipping {path}: incomplete (its save was cut short)", file=sys.stderr)
        chosen = complete[-1]
    elif wanted:
        chosen = Path(wanted)
        if not chosen.is_dir():
            raise UsageError(f"--resume_from_checkpoint {wanted}: no such checkpoint directory")
        if not (chosen / TRAINER_STATE_NAME).is_file():
            raise UsageError(f"--resume_from_checkpoint {wanted}: incomplete checkpoint (no {TRAINER_STATE_NAME}: "
                             "its save was cut short); pass True to resume from the last complete one")
    else:
        if complete:
            raise UsageError(
                f"{out} already holds {complete[-1].name} from an earlier run: add --resume_from_checkpoint True to "
                f"continue from it, or pass another --output_dir (or remove {out}) to start over"
            )
        if any((out / name).exists() for name in (TRAINER_STATE_NAME, "adapter_config.json", "config.json")):
            say(f"{out} holds an earlier run's model: this run replaces it", file=sys.stderr)
        return None
    step = json.loads((chosen / TRAINER_STATE_NAME).read_text(encoding="utf-8")).get("global_step")
    say(f"Resuming from {chosen} (step {step}): the steps before it are not repeated", file=sys.stderr)
    return str(chosen)


def _out_of_space(exc: BaseException, output_dir: str | os.PathLike) -> bool:
    """Whether a failed save ran out of disk (torch.save only says "unexpected pos" when it does)."""
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc):
        return True
    with contextlib.suppress(OSError):
        return shutil.disk_usage(output_dir).free < LOW_SPACE_BYTES
    return False


DEEPSPEED_CPU_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU communication op, compiled on its first use


def _say_if_deepspeed_compiles() -> None:
    """DeepSpeed on the CPU compiles its communication op the first time, silently, for minutes: say so."""
    build = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or torch.utils.cpp_extension.get_default_build_root())
    if not any(build.glob(f"**/{DEEPSPEED_CPU_OP}/*.so")):
        print(f"DeepSpeed on the CPU: compiling its communication op {DEEPSPEED_CPU_OP} once (a few minutes on a "
              f"small machine, needs a C++ compiler; cached under {build})", file=sys.stderr, flush=True)


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
    """Fine-tune; returns the summary (also printed on the main process). Raises Interrupted after saving a
    checkpoint on SIGINT / SIGTERM (KeyboardInterrupt before training starts)."""
    check_arguments(training_args, lora_args, data_args)
    resume = resume_checkpoint(training_args)
    stop = StopOnSignal(training_args.process_index == 0)
    stop.install()  # Ctrl-C while loading interrupts at once; once training, it saves a checkpoint first
    try:
        return _run(model_args, data_args, training_args, lora_args, resume, stop)
    finally:
        stop.uninstall()


def _run(model_args, data_args, training_args, lora_args, resume: str | None, stop: StopOnSignal) -> dict:
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

    if main_process and training_args.deepspeed and not torch.cuda.is_available():
        _say_if_deepspeed_compiles()
    collator = SFTCollator(pad_id=eod_id(tokenizer), packing=data_args.packing)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.add_callback(stop)
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - started
        if stop.stopped_at is not None:
            _report_interruption(stop, training_args, main_process)
        trainer.save_state()
        save_output(trainer, tokenizer, model, training_args.output_dir)
    except Exception as exc:
        if not _out_of_space(exc, training_args.output_dir):
            raise
        shutil.rmtree(Path(training_args.output_dir) / STAGING_DIR, ignore_errors=True)  # the cut-short save
        for callback in trainer.callback_handler.callbacks:  # so the message stays the last line
            if isinstance(callback, transformers.trainer_callback.ProgressCallback) and callback.training_bar:
                callback.training_bar.close()
                callback.training_bar = None
        raise UsageError(f"no space left on the device of {training_args.output_dir} while saving ({exc}): free "
                         "some space and rerun with --resume_from_checkpoint True (the last complete checkpoint "
                         "is used)") from None
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


def _report_interruption(stop: StopOnSignal, training_args, main_process: bool):
    checkpoint = Path(training_args.output_dir) / f"checkpoint-{stop.stopped_at}"
    if main_process:
        print(f"Interrupted ({signal.Signals(stop.signum).name}) at step {stop.stopped_at}: saved {checkpoint}. To "
              "continue, rerun the same command with --resume_from_checkpoint True added (after -- for the "
              "finetune/*.sh launchers).", file=sys.stderr, flush=True)
    raise Interrupted(stop.signum)


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


__all__ = ["Interrupted", "SFTTrainer", "checkpoints", "resume_checkpoint", "summary_text", "train"]
