#!/usr/bin/env bash
# Web chat page (web_demo.py) in a container, in the background, restarted unless stopped.
#   bash docker/docker_web_demo.sh -i qwen:cuda -c /path/to/Qwen-7B-Chat --port 8080 -n qwen-web
# Arguments after -- go to web_demo.py.
set -euo pipefail
source "$(dirname "$0")/common.sh"
USAGE_MORE="[-- WEB_DEMO_ARGS...]"
CONTAINER_NAME="qwen-web"
parse_common_args "$@"
common_run_args
server_port_args 8080
docker run -d --restart unless-stopped "${RUN_ARGS[@]}" \
    --health-cmd "python /app/docker/healthcheck.py http://127.0.0.1:$PORT/" \
    "$IMAGE_NAME" \
    python web_demo.py "${SCRIPT_ARGS[@]}" --server-name 0.0.0.0 --server-port "$PORT" "${EXTRA_ARGS[@]}"
echo "Started $CONTAINER_NAME: http://127.0.0.1:$PORT (docker logs -f $CONTAINER_NAME; healthy once loaded)"
