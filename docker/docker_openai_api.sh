#!/usr/bin/env bash
# OpenAI-compatible API (openai_api.py) in a container, in the background, restarted unless stopped.
#   bash docker/docker_openai_api.sh -i qwen:cuda -c /path/to/Qwen-7B-Chat --port 8000 -n qwen-api
#   bash docker/docker_openai_api.sh -i qwen:cpu --cpu -c ./Qwen-1_8B-Chat -- --api-key sk-mysecret
# Arguments after -- go to openai_api.py.
set -euo pipefail
source "$(dirname "$0")/common.sh"
USAGE_MORE="[-- OPENAI_API_ARGS...]"
CONTAINER_NAME="qwen-api"
parse_common_args "$@"
common_run_args
server_port_args 8000
docker run -d --restart unless-stopped "${RUN_ARGS[@]}" \
    --health-cmd "python /app/docker/healthcheck.py http://127.0.0.1:$PORT/health" \
    "$IMAGE_NAME" \
    python openai_api.py "${SCRIPT_ARGS[@]}" --server-name 0.0.0.0 --server-port "$PORT" "${EXTRA_ARGS[@]}"
echo "Started $CONTAINER_NAME: http://127.0.0.1:$PORT/v1 (docker logs -f $CONTAINER_NAME; healthy once loaded)"
