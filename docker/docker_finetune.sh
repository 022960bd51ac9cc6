#!/usr/bin/env bash
# Fine-tuning with the repository's launchers (finetune/*.sh) in the same image, in the foreground.
#   bash docker/docker_finetune.sh -i qwen:cuda -c /path/to/Qwen-7B-Chat -d ./data.json -o ./output_qwen
#   bash docker/docker_finetune.sh ... -l finetune_qlora_single_gpu.sh -- --extra-launcher-args
# The model and the data are mounted read-only; OUTPUT_DIR is the only writable mount and gets the files
# (mounted where the launchers write, output_qwen/) owned by you (the container runs with your uid; as the image's `qwen` user when you are root).
# Build the image with --build-arg EXTRAS="api web finetune" (deepspeed, bitsandbytes). A LoRA adapter records its
# base as /models/NAME (the base's path in this container): serve it with
#   bash docker/docker_openai_api.sh -i IMAGE -c OUTPUT_DIR --base CHECKPOINT_PATH
set -euo pipefail
source "$(dirname "$0")/common.sh"
USAGE_MORE="-d DATA_FILE -o OUTPUT_DIR [-l LAUNCHER] [-- LAUNCHER_ARGS...]"
DATA_FILE=""
OUTPUT_DIR=""
LAUNCHER="finetune_lora_single_gpu.sh"
parse_more_args() {
    case "$1" in
        -d|--data) DATA_FILE="${2:?-d needs a file}"; SHIFT_BY=2 ;;
        -o|--output) OUTPUT_DIR="${2:?-o needs a directory}"; SHIFT_BY=2 ;;
        -l|--launcher) LAUNCHER="${2:?-l needs a launcher name}"; SHIFT_BY=2 ;;
        *) return 1 ;;
    esac
}
parse_common_args "$@"
[[ -f "$DATA_FILE" ]] || die "-d DATA_FILE must be an existing training data file (JSON in the ChatML conversation layout)."
[[ -n "$OUTPUT_DIR" ]] || die "-o OUTPUT_DIR is required: where the fine-tuned weights are written."
[[ "$LAUNCHER" =~ ^[A-Za-z0-9_.-]+\.sh$ ]] || die "-l takes a launcher file name from finetune/, e.g. finetune_lora_single_gpu.sh."
mkdir -p "$OUTPUT_DIR"
OUTPUT_DIR="$(cd "$OUTPUT_DIR" && pwd)"
DATA_FILE="$(cd "$(dirname "$DATA_FILE")" && pwd)/$(basename "$DATA_FILE")"
common_run_args
if [[ "$(id -u)" == 0 ]]; then
    chown 1000:1000 "$OUTPUT_DIR"      # the image's `qwen` user writes there
else
    RUN_ARGS+=(--user "$(id -u):$(id -g)" -e HOME=/tmp -e HF_HOME=/tmp/huggingface)
fi
echo "Training in $IMAGE_NAME; the output goes to $OUTPUT_DIR. A LoRA adapter serves with: bash docker/docker_openai_api.sh -i $IMAGE_NAME -c $OUTPUT_DIR --base $CHECKPOINT_PATH" >&2
tty_flags=()
if [[ -t 0 && -t 1 ]]; then tty_flags=(-it); fi
exec docker run --rm "${tty_flags[@]}" --no-healthcheck --shm-size 8g "${RUN_ARGS[@]}" \
    --mount "type=bind,source=$DATA_FILE,target=/data/$(basename "$DATA_FILE"),readonly" \
    --mount "type=bind,source=$OUTPUT_DIR,target=/app/output_qwen" \
    "$IMAGE_NAME" \
    bash -c 'python -c "import importlib.util as u, sys; sys.exit(u.find_spec(\"deepspeed\") is None)" || { echo "Error: this image has no fine-tuning packages: build it with --build-arg EXTRAS=\"api web finetune\" (see docker/Dockerfile)." >&2; exit 2; }; exec bash "$@"' \
    finetune "finetune/$LAUNCHER" -m "$CONTAINER_CHECKPOINT" -d "/data/$(basename "$DATA_FILE")" \
    "${EXTRA_ARGS[@]}"
