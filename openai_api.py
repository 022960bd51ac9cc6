"""OpenAI-compatible API server for Qwen (v1) chat models: many clients at once, streaming, function calling.

    python openai_api.py                                  # the offline demo model on http://127.0.0.1:8000
    QWEN_API_KEY=sk-mysecret python openai_api.py -c Qwen/Qwen-7B-Chat --server-name 0.0.0.0
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

from openmp_wait import spin_briefly

spin_briefly()  # before torch loads OpenMP

from qwen.scripts import (  # noqa: E402
    API_PORT,
    add_checkpoint_args,
    add_server_args,
    exit_on_user_error,
    leave_served,
    load_checkpoint,
    prepare_server,
    quiet_libraries,
)

API_KEY_VARIABLE = "QWEN_API_KEY"  # read when --api-key is not given: a key in the environment stays out of `ps`


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="OpenAI-compatible API server for Qwen chat models")
    add_checkpoint_args(parser)
    add_server_args(parser, API_PORT)
    parser.add_argument("--api-auth", default=None, metavar="USER:PASSWORD", help="require HTTP Basic auth")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE),
                        help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_VARIABLE} when set)")
    parser.add_argument("--disable-gc", action="store_true", help="disable the garbage collector while serving")
    parser.add_argument("--model-name", action="append", dest="model_names", metavar="NAME",
                        help="model name listed by /v1/models (repeatable; default: the checkpoint's name, qwen-demo for "
                             "the demo model)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests running or waiting before new ones get 429 (default 64)")
    add_safety_args(parser)
    args = parser.parse_args(argv)
    if args.api_auth is not None and ":" not in args.api_auth:
        parser.error("--api-auth must be USER:PASSWORD")
    if args.max_batch_size < 1 or args.max_queue < args.max_batch_size:
        parser.error("--max-batch-size must be >= 1 and --max-queue >= --max-batch-size")
    check_safety_args(parser, args)
    return args


def add_safety_args(parser: argparse.ArgumentParser) -> None:
    """Who may call the server, how much one request may hold, how it stops (README: Running it safely); the
    defaults are qwen.serving's."""
    from qwen.serving import DEFAULT_MAX_MESSAGES, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_SHUTDOWN_TIMEOUT
    from qwen.serving.guard import (
        DEFAULT_BODY_TIMEOUT,
        DEFAULT_HEADER_TIMEOUT,
        DEFAULT_STALL_TIMEOUT,
        FD_RESERVE,
        MAX_CONNECTIONS_CAP,
    )

    group = parser.add_argument_group("access, limits and shutdown")
    group.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                       help="web origins (https://app.example) whose pages may call the API from a browser, "
                            "or '*' for any (default: none, no cross-origin access)")
    group.add_argument("--allowed-hosts", nargs="+", default=[], metavar="HOST",
                       help="host names the server answers to (the Host header), besides the defaults: loopback "
                            "names, plus --server-name's address; any with --server-name 0.0.0.0; '*' for any")
    group.add_argument("--allow-credentials", action="store_true",
                       help="let those pages send cookies / HTTP auth (needs explicit --allowed-origins, not '*')")
    group.add_argument("--strict-model-name", action="store_true",
                       help="answer only requests naming a --model-name, others get 404 model_not_found (default: "
                            "any name is answered, as OpenAI clients send theirs, e.g. gpt-3.5-turbo)")
    group.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="BYTES",
                       help=f"largest request body; larger gets 413 (default {DEFAULT_MAX_REQUEST_BYTES // 2**20} MiB)")
    group.add_argument("--max-messages", type=int, default=DEFAULT_MAX_MESSAGES, metavar="N",
                       help=f"most messages in one chat request; more get 400 (default {DEFAULT_MAX_MESSAGES:,})")
    group.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="SECONDS",
                       help="on SIGTERM / Ctrl-C, how long running requests may finish before they are stopped "
                            f"(default {DEFAULT_SHUTDOWN_TIMEOUT:.0f})")
    group.add_argument("--max-connections", type=int, default=None, metavar="N",
                       help="open connections at most; beyond, the oldest one still sending its request is closed "
                            f"(default: the fd limit less {FD_RESERVE}, at most {MAX_CONNECTIONS_CAP})")
    group.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                       help=f"a connection must send its request headers within this (default {DEFAULT_HEADER_TIMEOUT:.0f})")
    group.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                       help=f"a request body may pause this long between pieces (default {DEFAULT_BODY_TIMEOUT:.0f})")
    group.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                       help="a stream whose client reads nothing for this long is dropped, freeing its slot "
                            f"(default {DEFAULT_STALL_TIMEOUT:.0f})")


def check_safety_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.api_key is not None and not args.api_key.strip():
        parser.error(f"--api-key (or ${API_KEY_VARIABLE}) is empty, which would turn authentication off; "
                     "give a key, or none at all")
    if args.api_auth is not None and not all(args.api_auth.partition(":")[::2]):
        parser.error("--api-auth must be USER:PASSWORD with neither part empty")
    if args.allow_credentials and (not args.allowed_origins or "*" in args.allowed_origins):
        parser.error("--allow-credentials needs --allowed-origins listing the origins, not '*'")
    if min(args.max_request_bytes, args.max_messages) < 1:
        parser.error("--max-request-bytes and --max-messages must be at least 1")
    if args.shutdown_timeout < 0:
        parser.error("--shutdown-timeout must be >= 0")
    if args.max_connections is not None and args.max_connections < 1:
        parser.error("--max-connections must be at least 1")
    if not all(v > 0 for v in (args.header_timeout, args.body_timeout, args.stall_timeout)):
        parser.error("--header-timeout, --body-timeout and --stall-timeout must be above 0")


def safety_settings(args: argparse.Namespace) -> dict:
    """create_app() keyword arguments of the flags above."""
    from qwen.serving.guard import ConnectionLimits, default_allowed_hosts

    limits = ConnectionLimits(max_connections=args.max_connections, header_timeout=args.header_timeout,
                              body_timeout=args.body_timeout, stall_timeout=args.stall_timeout)
    return {"allowed_origins": args.allowed_origins, "allow_credentials": args.allow_credentials,
            "accept_any_model": not args.strict_model_name, "max_request_bytes": args.max_request_bytes,
            "max_messages": args.max_messages, "shutdown_timeout": args.shutdown_timeout,
            "allowed_hosts": default_allowed_hosts(args.server_name) + args.allowed_hosts,
            "limits": limits}


def default_model_name(checkpoint: str | None) -> str:
    """The checkpoint's name ('Qwen-7B-Chat' for 'Qwen/Qwen-7B-Chat'); 'qwen-demo' for the demo model."""
    from qwen.loading import checkpoint_name

    return "qwen-demo" if checkpoint is None else checkpoint_name(checkpoint)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from qwen.serving import create_app, serve

    with exit_on_user_error():
        prepare_server(args)
        model, tokenizer = load_checkpoint(args)
    app = create_app(model, tokenizer, model_names=args.model_names or [default_model_name(args.checkpoint_path)],
                     api_key=args.api_key, api_auth=args.api_auth, max_batch_size=args.max_batch_size,
                     max_queue=args.max_queue, threads=args.threads, compile_decode=args.compile,
                     **safety_settings(args))
    if args.disable_gc:
        gc.disable()
    serve(app, host=args.server_name, port=args.server_port)
    return leave_served(app.state.server.backend.engine)


if __name__ == "__main__":
    sys.exit(main())
