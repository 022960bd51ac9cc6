# Shared by docker_cli_demo.sh, docker_web_demo.sh, docker_openai_api.sh and docker_finetune.sh (sourced).
# Options as in the original scripts: -i IMAGE, -c CHECKPOINT_PATH, -n CONTAINER_NAME, --port PORT; plus
# --cpu (no GPUs: the CPU image) and --network host (no port mapping; the server listens on the host).
# The checkpoint is mounted read-only; the Docker socket is never mounted; the container runs as `qwen`.

IMAGE_NAME="${QWEN_IMAGE:-qwen:cuda}"
CHECKPOINT_PATH=""
CONTAINER_NAME=""
PORT=""
USE_GPU=1
NETWORK=""
BASE_PATH=""
EXTRA_ARGS=()
CONTAINER_CHECKPOINT=/models/checkpoint

die() {
    echo "Error: $*" >&2
    exit 2
}

usage_and_exit() {
    echo "Usage: $0 [-i IMAGE] -c CHECKPOINT_PATH [-n CONTAINER_NAME] [--port PORT] [--cpu] [--network host] $USAGE_MORE" >&2
    echo "  IMAGE defaults to \$QWEN_IMAGE or qwen:cuda (build it: see docker/Dockerfile)." >&2
    echo "  A LoRA adapter as CHECKPOINT_PATH brings its base checkpoint along (the path it names, or --base DIR)." >&2
    exit "${1:-2}"
}

parse_common_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -i|--image) IMAGE_NAME="${2:?-i needs an image name}"; shift 2 ;;
            -c|--checkpoint-path) CHECKPOINT_PATH="${2:?-c needs a path}"; shift 2 ;;
            -n|--name) CONTAINER_NAME="${2:?-n needs a name}"; shift 2 ;;
            --port) PORT="${2:?--port needs a number}"; shift 2 ;;
            --cpu) USE_GPU=0; shift ;;
            --network) NETWORK="${2:?--network needs a value}"; shift 2 ;;
            --base) BASE_PATH="${2:?--base needs a path}"; shift 2 ;;
            -h|--help) usage_and_exit 0 ;;
            --) shift; EXTRA_ARGS+=("$@"); break ;;
            *) if declare -F parse_more_args >/dev/null && parse_more_args "$@"; then shift "$SHIFT_BY";
               else echo "Error: unknown option $1" >&2; usage_and_exit; fi ;;
        esac
    done
    [[ -n "$CHECKPOINT_PATH" ]] || { echo "Error: -c CHECKPOINT_PATH is required (a downloaded checkpoint directory)." >&2; usage_and_exit; }
    [[ -d "$CHECKPOINT_PATH" ]] || die "$CHECKPOINT_PATH is not a directory: pass a downloaded checkpoint (e.g. hf download Qwen/Qwen-7B-Chat --local-dir Qwen-7B-Chat)."
    CHECKPOINT_PATH="$(cd "$CHECKPOINT_PATH" && pwd)"
    # Mounted under its own name, so the API server lists it as the model (e.g. Qwen-7B-Chat), as outside docker.
    CONTAINER_CHECKPOINT="/models/$(basename "$CHECKPOINT_PATH")"
    if [[ -n "$PORT" ]] && ! [[ "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1 && "$PORT" -le 65535 ]]; then
        die "--port must be a number from 1 to 65535, not '$PORT'."
    fi
    command -v docker >/dev/null || die "docker is not installed."
}

# docker run arguments every use shares: read-only model, no privileges, GPUs unless --cpu.
common_run_args() {
    RUN_ARGS=(--mount "type=bind,source=$CHECKPOINT_PATH,target=$CONTAINER_CHECKPOINT,readonly"
              --security-opt no-new-privileges)
    [[ -n "$CONTAINER_NAME" ]] && RUN_ARGS+=(--name "$CONTAINER_NAME")
    [[ -n "$NETWORK" ]] && RUN_ARGS+=(--network "$NETWORK")
    if [[ "$USE_GPU" == 1 ]]; then RUN_ARGS+=(--gpus all); fi
    adapter_base_mount
    SCRIPT_ARGS=(-c "$CONTAINER_CHECKPOINT")
    if [[ "$USE_GPU" == 0 ]]; then SCRIPT_ARGS+=(--cpu-only); fi
}

# A LoRA adapter (finetune.py --use_lora output) names its base checkpoint by path, /models/NAME when it was
# trained with docker_finetune.sh: mount the base read-only at that path, from --base DIR or from the same path here.
adapter_base_mount() {
    [[ -f "$CHECKPOINT_PATH/adapter_config.json" ]] || return 0
    local named
    named="$(sed -n 's/^ *"base_model_name_or_path": *"\([^"]*\)".*/\1/p' "$CHECKPOINT_PATH/adapter_config.json")"
    [[ "$named" == /* ]] || return 0   # a hub id: the container resolves it like any other
    local source="${BASE_PATH:-$named}"
    [[ -d "$source" ]] || die "$CHECKPOINT_PATH is a LoRA adapter on $named, which is not on this machine: pass the base checkpoint with --base DIR."
    RUN_ARGS+=(--mount "type=bind,source=$(cd "$source" && pwd),target=$named,readonly")
}

# A server's port: published as PORT:PORT, or (--network host) listened on directly.
server_port_args() {
    local default_port="$1"
    PORT="${PORT:-$default_port}"
    if [[ "$NETWORK" != host ]]; then RUN_ARGS+=(-p "$PORT:$PORT"); fi
}
