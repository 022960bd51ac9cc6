"""Chat with a Qwen (v1) chat model in the browser; several people at once, answers streamed.

    python web_demo.py                                     # the offline demo model on http://127.0.0.1:8080
    python web_demo.py -c Qwen/Qwen-7B-Chat --server-name 0.0.0.0 --auth alice:secret
"""

from __future__ import annotations

import argparse
import sys

from openmp_wait import spin_briefly

spin_briefly()  # before torch loads OpenMP

from qwen.sampling import BOUNDS  # noqa: E402
from qwen.scripts import (  # noqa: E402
    PAGE_PORT,
    add_checkpoint_args,
    add_server_args,
    exit_on_user_error,
    leave_served,
    load_checkpoint,
    prepare_server,
    quiet_libraries,
    warn_if_exposed,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Qwen web chat (gradio)")
    add_checkpoint_args(parser)
    add_server_args(parser, PAGE_PORT)
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link (needs --auth)")
    parser.add_argument("--inbrowser", action="store_true", help="open the page in the default browser")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login")
    parser.add_argument("--max-batch-size", type=int, default=8, help="answers decoded together (default 8)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="answers being written at once; more wait in line (default 16)")
    # initial values of the page's settings (default: the checkpoint's generation_config.json)
    parser.add_argument("--system", default=None, help="initial system prompt")
    parser.add_argument("--temperature", type=float, default=None, help="initial temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="initial top-p")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="initial longest answer, in tokens")
    args = parser.parse_args(argv)
    checks = [
        (args.auth is None or all(args.auth.partition(":")[::2]),
         "--auth must be USER:PASSWORD with neither part empty (an empty password would let anyone in)"),
        (not args.share or args.auth, "--share needs --auth USER:PASSWORD: a public link without a login lets "
                                      "anyone on the internet use this model"),
        (args.max_batch_size >= 1, "--max-batch-size must be at least 1"),
        (args.concurrency >= 1, "--concurrency must be at least 1"),
    ] + [  # the initial settings: the bounds every surface (API, CLI, page) reads
        (value is None or value in BOUNDS[name], f"--{name.replace('_', '-')} must be {BOUNDS[name].describe()}")
        for name, value in (("temperature", args.temperature), ("top_p", args.top_p),
                            ("max_new_tokens", args.max_new_tokens))
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warn_if_exposed(args.server_name, args.auth is not None, "--auth USER:PASSWORD")
    quiet_libraries()
    from qwen.chat_api import require_chat_model
    from qwen.loading import checkpoint_name
    from qwen.webui import create_page, serve_page

    with exit_on_user_error():
        prepare_server(args)
        model, tokenizer = load_checkpoint(args)
        require_chat_model(model.generation_config, "web_demo.py")
    title = "Demo model (SmolLM2, not Qwen)" if args.checkpoint_path is None else checkpoint_name(args.checkpoint_path)
    demo = create_page(model, tokenizer, title=title, max_batch_size=args.max_batch_size,
                       concurrency=args.concurrency, threads=args.threads, compile_decode=args.compile,
                       system=args.system,
                       temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    code = serve_page(demo, host=args.server_name, port=args.server_port, share=args.share,
                      inbrowser=args.inbrowser, auth=args.auth, concurrency=args.concurrency)
    return leave_served(demo.web_chat.engine, code)


if __name__ == "__main__":
    sys.exit(main())
