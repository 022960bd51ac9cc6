#!/bin/bash
# Q-LoRA (LoRA on the 4-bit model: nf4, or the GPTQ Int4 checkpoint given) on one GPU (no DeepSpeed).
#   bash finetune/finetune_qlora_single_gpu.sh -m Qwen/Qwen-7B-Chat -d data.json
# Options, environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE), "-- extra flags" and the
# training flags of each method: finetune/launch.sh. Without GPUs it runs on the CPU (gloo), e.g. on the demo model.
METHOD=qlora
DEEPSPEED_CONFIG=
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
