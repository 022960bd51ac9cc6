#!/bin/bash
# LoRA fine-tuning on one GPU (no DeepSpeed).
#   bash finetune/finetune_lora_single_gpu.sh -m Qwen/Qwen-7B -d data.json
# Options, environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE), "-- extra flags" and the
# training flags of each method: finetune/launch.sh. Without GPUs it runs on the CPU (gloo), e.g. on the demo model.
METHOD=lora
DEEPSPEED_CONFIG=
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
