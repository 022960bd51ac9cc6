#!/usr/bin/env bash
# Terminal chat (cli_demo.py) in an interactive container, removed when you leave it.
#   bash docker/docker_cli_demo.sh -i qwen:cuda -c /path/to/Qwen-7B-Chat
# Arguments after -- go to cli_demo.py.
set -euo pipefail
source "$(dirname "$0")/common.sh"
USAGE_MORE="[-- CLI_DEMO_ARGS...]"
parse_common_args "$@"
common_run_args
tty_flags=(-i)
if [[ -t 0 && -t 1 ]]; then tty_flags=(-it); fi
exec docker run --rm "${tty_flags[@]}" --no-healthcheck "${RUN_ARGS[@]}" "$IMAGE_NAME" \
    python cli_demo.py "${SCRIPT_ARGS[@]}" "${EXTRA_ARGS[@]}"
