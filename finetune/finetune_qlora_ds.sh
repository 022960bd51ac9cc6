#!/bin/bash
# Q-LoRA (LoRA on the 4-bit model: nf4, or the GPTQ Int4 checkpoint given) with DeepSpeed ZeRO-2, one GPU to
# many nodes.
#   bash finetune/finetune_qlora_ds.sh -m Qwen/Qwen-7B-Chat -d data.json [--deepspeed finetune/ds_config_zero2.json]
# Options, environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE), "-- extra flags" and the
# training flags of each method: finetune/launch.sh. Without GPUs it runs on the CPU (gloo), e.g. on the demo model.
METHOD=qlora
DEEPSPEED_CONFIG=zero2
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
