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
EXTRA_ARGS=()
CONTAINER_CHECKPOINT=/models/checkpoint

die() {
    echo "Error: $*" >&2
    exit 2
}

usage_and_exit() {
    echo "Usage: $0 [-i IMAGE] -c CHECKPOINT_PATH [-n CONTAINER_NAME] [--port PORT] [--cpu] [--network host] $USAGE_MORE" >&2
    echo "  IMAGE defaults to \$QWEN_IMAGE or qwen:cuda (build it: see docker/Dockerfile)." >&2
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
    SCRIPT_ARGS=(-c "$CONTAINER_CHECKPOINT")
    if [[ "$USE_GPU" == 0 ]]; then SCRIPT_ARGS+=(--cpu-only); fi
}

# A server's port: published as PORT:PORT, or (--network host) listened on directly.
server_port_args() {
    local default_port="$1"
    PORT="${PORT:-$default_port}"
    if [[ "$NETWORK" != host ]]; then RUN_ARGS+=(-p "$PORT:$PORT"); fi
}
