#!/bin/bash
# Shared by the finetune_*.sh launchers (sourced, not run): options, environment and the torchrun line.
#
#   -m, --model PATH_OR_ID   checkpoint to fine-tune (hub id or directory; default: the offline demo model)
#   -d, --data PATH          training data (JSON list or JSONL; see the README)
#   --deepspeed PATH         DeepSpeed config (the DeepSpeed launchers; default: theirs)
#   -- ARGS...               passed on to finetune.py (override any default, e.g. -- --num_train_epochs 1)
#
# Environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (multi-node through torchrun's rendezvous) and
# GPUS_PER_NODE (default: every GPU; without GPUs the launchers train on the CPU over gloo, 1 process unless
# GPUS_PER_NODE says more). FINETUNE_DRY_RUN=1 prints the command instead of running it. -h prints all of it.
set -euo pipefail

# The original launchers' training flags; METHOD (full | lora | qlora) picks the rows that differ.
MODEL=""  # default: the offline demo model (pass -m Qwen/Qwen-7B-Chat, -m /path/to/checkpoint)
DATA=""
DS_CONFIG_PATH=${DEEPSPEED_CONFIG:+"$(dirname "${BASH_SOURCE[0]}")/ds_config_${DEEPSPEED_CONFIG}.json"}
case "$METHOD" in  #       per-device batch  gradient accumulation  learning rate  method flags      GPU precision
    full )  METHOD_ARGS=(--per_device_train_batch_size 1 --gradient_accumulation_steps 16 --learning_rate 1e-5)
            GPU_PRECISION_ARGS=(--bf16 True) ;;
    lora )  METHOD_ARGS=(--per_device_train_batch_size 2 --gradient_accumulation_steps 8 --learning_rate 3e-4
                         --use_lora True)
            GPU_PRECISION_ARGS=(--bf16 True) ;;
    qlora ) METHOD_ARGS=(--per_device_train_batch_size 2 --gradient_accumulation_steps 8 --learning_rate 3e-4
                         --use_lora True --q_lora True)
            GPU_PRECISION_ARGS=(--fp16 True) ;;
    * ) echo "launch.sh: METHOD must be full, lora or qlora" >&2; exit 2 ;;
esac
TRAIN_ARGS=(
    --output_dir output_qwen
    --num_train_epochs 5
    "${METHOD_ARGS[@]}"
    --per_device_eval_batch_size 1
    --evaluation_strategy "no"
    --save_strategy "steps"
    --save_steps 1000
    --save_total_limit 10
    --weight_decay 0.1
    --adam_beta2 0.95
    --warmup_ratio 0.01
    --lr_scheduler_type "cosine"
    --logging_steps 1
    --report_to "none"
    --model_max_length 512
    --lazy_preprocess True
    --gradient_checkpointing True
)

usage() {
    cat <<EOF
Usage: bash $0 [-m MODEL] [-d DATA]${DS_CONFIG_PATH:+ [--deepspeed CONFIG]} [-- finetune.py flags...]

  -m, --model PATH_OR_ID  checkpoint to fine-tune: hub id or directory (default: the offline demo model)
  -d, --data PATH         training data, a JSON list or JSONL file (required; see the README's Fine-tuning)
${DS_CONFIG_PATH:+  --deepspeed PATH        DeepSpeed config (default: ${DS_CONFIG_PATH})
}  -- FLAGS...             passed on to finetune.py, overriding the defaults below (python finetune.py -h)
  -h, --help              this help

Training flags ($METHOD):
  ${TRAIN_ARGS[*]}
  on a GPU also: ${GPU_PRECISION_ARGS[*]} (fp32 on the CPU)

Environment:
  GPUS_PER_NODE   processes on this machine (default: every GPU; without GPUs 1, on the CPU over gloo)
  NNODES          machines (default 1); NODE_RANK this machine's rank (default 0)
  MASTER_ADDR     rank 0's address (default localhost); MASTER_PORT its port (default 6001)
  FINETUNE_DRY_RUN=1  print the command instead of running it

Ctrl-C (or SIGTERM) saves a checkpoint in the output directory after the current step; add
-- --resume_from_checkpoint True to the same command to continue from it.
EOF
}

EXTRA_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -m | --model ) shift; MODEL="$1" ;;
        -d | --data ) shift; DATA="$1" ;;
        --deepspeed ) shift; DS_CONFIG_PATH="$1" ;;
        -h | --help ) usage; exit 0 ;;
        -- ) shift; EXTRA_ARGS=("$@"); break ;;
        * ) echo "Unknown argument ${1}" >&2; usage >&2; exit 1 ;;
    esac
    shift
done

if [[ ! -f "${DATA:-}" ]]; then
    echo "Error: no data file ${DATA}: pass -d path/to/data.json" >&2
    exit 2
fi

GPU_COUNT=$(python -c 'import torch; print(torch.cuda.device_count())')
if [[ "$GPU_COUNT" -gt 0 ]]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$GPU_COUNT}
    PRECISION_ARGS=("${GPU_PRECISION_ARGS[@]}")
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-1}
    PRECISION_ARGS=()  # fp32 on the CPU
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}
export CUDA_DEVICE_MAX_CONNECTIONS=1

MODEL_ARGS=()
if [[ -n "${MODEL:-}" ]]; then
    MODEL_ARGS=(--model_name_or_path "$MODEL")
fi
DS_ARGS=()
if [[ -n "${DS_CONFIG_PATH:-}" ]]; then
    DS_ARGS=(--deepspeed "$DS_CONFIG_PATH")
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# torchrun through qwen.sft.launch: a worker's own error or interruption message stays the last line
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
CMD=(python -m qwen.sft.launch --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
    "$REPO/finetune.py"
    "${MODEL_ARGS[@]}"
    --data_path "$DATA"
    "${PRECISION_ARGS[@]}"
    "${TRAIN_ARGS[@]}"
    "${DS_ARGS[@]}"
    "${EXTRA_ARGS[@]}")
if [[ -n "${FINETUNE_DRY_RUN:-}" ]]; then  # print the command instead of running it
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
exec "${CMD[@]}"
