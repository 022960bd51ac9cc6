#!/bin/bash
# Full-parameter fine-tuning with DeepSpeed ZeRO-3, one GPU to many nodes.
#   bash finetune/finetune_ds.sh -m Qwen/Qwen-7B -d data.json [--deepspeed finetune/ds_config_zero3.json]
# Options, environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE), "-- extra flags" and the
# training flags of each method: finetune/launch.sh. Without GPUs it runs on the CPU (gloo), e.g. on the demo model.
METHOD=full
DEEPSPEED_CONFIG=zero3
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
