"""Fine-tune Qwen (full, LoRA or Q-LoRA) on the HF Trainer, with the original finetune.py's flags.

    python finetune.py --model_name_or_path Qwen/Qwen-7B-Chat --data_path data.json --output_dir out \
        --use_lora True [--q_lora True] [--packing True] [--deepspeed finetune/ds_config_zero2.json] ...

Every transformers TrainingArguments flag works. Launchers for one GPU to many nodes are in finetune/.
"""

import contextlib
import logging
import os
import signal
import sys

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns at import about optional kernels


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from qwen.errors import UserError
    from qwen.scripts import exit_on_user_error, quiet_libraries
    from qwen.sft import ARGUMENT_CLASSES, modernize_argv, train
    from qwen.sft.train import Interrupted

    parser = HfArgumentParser(ARGUMENT_CLASSES)
    argv = modernize_argv(sys.argv[1:] if argv is None else argv)
    try:
        with exit_on_user_error() if int(os.environ.get("RANK", "0")) == 0 else _silently(UserError):
            model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(argv)
            quiet_libraries()
            train(model_args, data_args, training_args, lora_args)
    except Interrupted as stopped:  # the checkpoint is saved and the way to resume printed
        raise SystemExit(stopped.exit_code) from None
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print("\nInterrupted before training started: nothing was saved.", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


@contextlib.contextmanager
def _silently(error: type[Exception]):
    """Exit 2 without a word: under torchrun every rank meets the same mistake, and rank 0 says it."""
    try:
        yield
    except error:
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
