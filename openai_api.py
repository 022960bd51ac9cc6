"""OpenAI-compatible API server for Qwen (v1) chat models: many clients at once, streaming, function calling.

    python openai_api.py                                  # the offline demo model on http://127.0.0.1:8000
    python openai_api.py -c Qwen/Qwen-7B-Chat --server-name 0.0.0.0 --api-key sk-mysecret
"""

from __future__ import annotations

import argparse
import gc
import sys

from qwen.scripts import (
    add_checkpoint_args,
    check_port_free,
    exit_on_user_error,
    load_checkpoint,
    port,
    quiet_libraries,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="OpenAI-compatible API server for Qwen chat models")
    add_checkpoint_args(parser)
    parser.add_argument("--api-auth", default=None, metavar="USER:PASSWORD", help="require HTTP Basic auth")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>'")
    parser.add_argument("--server-port", type=port, default=8000, help="port (default 8000)")
    parser.add_argument("--server-name", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--disable-gc", action="store_true", help="disable the garbage collector while serving")
    parser.add_argument("--model-name", action="append", dest="model_names", metavar="NAME",
                        help="model name listed by /v1/models (repeatable; default: the checkpoint's name)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests running or waiting before new ones get 429 (default 64)")
    args = parser.parse_args(argv)
    if args.api_auth is not None and ":" not in args.api_auth:
        parser.error("--api-auth must be USER:PASSWORD")
    if args.max_batch_size < 1 or args.max_queue < args.max_batch_size:
        parser.error("--max-batch-size must be >= 1 and --max-queue >= --max-batch-size")
    return args


def default_model_name(checkpoint: str | None) -> str:
    """The checkpoint's name ('Qwen-7B-Chat' for 'Qwen/Qwen-7B-Chat'); 'qwen-demo' for the demo model."""
    from qwen.loading import checkpoint_name

    return "qwen-demo" if checkpoint is None else checkpoint_name(checkpoint)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()  # before the libraries are imported: some log while importing
    import uvicorn

    from qwen.serving import create_app

    with exit_on_user_error():
        check_port_free(args.server_name, args.server_port)
        model, tokenizer = load_checkpoint(args)
    app = create_app(model, tokenizer, model_names=args.model_names or [default_model_name(args.checkpoint_path)],
                     api_key=args.api_key, api_auth=args.api_auth, max_batch_size=args.max_batch_size,
                     max_queue=args.max_queue)
    if args.disable_gc:
        gc.disable()
    uvicorn.run(app, host=args.server_name, port=args.server_port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
