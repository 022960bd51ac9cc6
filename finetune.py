"""Fine-tune Qwen (full, LoRA or Q-LoRA) on the HF Trainer, with the original finetune.py's flags.

    python finetune.py --model_name_or_path Qwen/Qwen-7B-Chat --data_path data.json --output_dir out \
        --use_lora True [--q_lora True] [--packing True] [--deepspeed finetune/ds_config_zero2.json] ...

Every transformers TrainingArguments flag works. Launchers for one GPU to many nodes are in finetune/.
"""

import logging
import sys

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns at import about optional kernels


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from qwen.scripts import exit_on_user_error, quiet_libraries
    from qwen.sft import ARGUMENT_CLASSES, modernize_argv, train

    parser = HfArgumentParser(ARGUMENT_CLASSES)
    argv = modernize_argv(sys.argv[1:] if argv is None else argv)
    with exit_on_user_error():
        model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(argv)
        quiet_libraries()
        train(model_args, data_args, training_args, lora_args)


if __name__ == "__main__":
    main()
