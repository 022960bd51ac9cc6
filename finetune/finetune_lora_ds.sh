#!/bin/bash
# LoRA fine-tuning with DeepSpeed ZeRO-2, one GPU to many nodes.
#   bash finetune/finetune_lora_ds.sh -m Qwen/Qwen-7B -d data.json [--deepspeed finetune/ds_config_zero2.json]
# Options, environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE) and "-- extra flags": see
# finetune/launch.sh. Without GPUs it runs on the CPU (gloo), e.g. on the offline demo model.
MODEL=""  # default: the offline demo model (pass -m Qwen/Qwen-7B-Chat, -m /path/to/checkpoint)
DATA=""
DS_CONFIG_PATH="$(dirname "${BASH_SOURCE[0]}")/ds_config_zero2.json"
GPU_PRECISION_ARGS=(--bf16 True)
TRAIN_ARGS=(
    --output_dir output_qwen
    --num_train_epochs 5
    --per_device_train_batch_size 2
    --per_device_eval_batch_size 1
    --gradient_accumulation_steps 8
    --evaluation_strategy "no"
    --save_strategy "steps"
    --save_steps 1000
    --save_total_limit 10
    --learning_rate 3e-4
    --weight_decay 0.1
    --adam_beta2 0.95
    --warmup_ratio 0.01
    --lr_scheduler_type "cosine"
    --logging_steps 1
    --report_to "none"
    --model_max_length 512
    --lazy_preprocess True
    --gradient_checkpointing True
    --use_lora True
)
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
