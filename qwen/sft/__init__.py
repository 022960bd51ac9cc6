"""Supervised fine-tuning of QWen on the HF Trainer (`finetune.py` parses the flags and calls `train()`):

  args   the flags (the original's names), presets and checks made before anything loads;
  data   data files -> ChatML ids and labels (equal to the original preprocess()), the batch collator;
  model  full / LoRA / Q-LoRA setup, the output directory every script loads, merge_lora;
  train  the run itself: Trainer, checkpoints, interruption, the summary;
  launch torchrun for the finetune/*.sh launchers, with a worker's own error as the last line.
"""

from .args import (
    ARGUMENT_CLASSES,
    DataArguments,
    LoraArguments,
    ModelArguments,
    TrainingArguments,
    check_arguments,
    modernize_argv,
)
from .data import (
    IGNORE_INDEX,
    Sample,
    SFTCollator,
    SupervisedDataset,
    calibration_samples,
    conversation,
    encode_conversation,
    load_conversations,
    read_records,
)
from .model import load_for_training, merge_lora
from .train import train

__all__ = [
    "ARGUMENT_CLASSES", "DataArguments", "IGNORE_INDEX", "LoraArguments", "ModelArguments", "SFTCollator", "Sample",
    "SupervisedDataset", "TrainingArguments", "calibration_samples", "check_arguments", "conversation",
    "encode_conversation", "load_conversations", "load_for_training", "merge_lora", "modernize_argv",
    "read_records", "train",
]
