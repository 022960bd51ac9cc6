"""Chat with a Qwen (v1) chat model in the terminal.

    python cli_demo.py                       # the offline demo model
    python cli_demo.py -c Qwen/Qwen-7B-Chat  # a hub id or a local checkpoint directory
"""

from __future__ import annotations

import argparse
import sys

from qwen.scripts import add_checkpoint_args, exit_on_user_error, load_checkpoint, quiet_libraries
from qwen_generation_utils import DEFAULT_SYSTEM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Qwen terminal chat")
    add_checkpoint_args(parser)
    parser.add_argument("-s", "--seed", type=int, default=1234, help="random seed (default 1234)")
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--repetition-penalty", type=float, help="penalty for repeating tokens (1.0 = off)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()  # keep library warnings out of the conversation
    from qwen.chat_api import require_chat_model
    from qwen.cli import ChatSession, Repl, apply_conf, parse_seed

    overrides = {
        key: value
        for key in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
        if (value := getattr(args, key)) is not None
    }
    with exit_on_user_error():
        seed = parse_seed(str(args.seed))  # before loading: a bad seed costs no wait
        model, tokenizer = load_checkpoint(args, qwen_only=True)  # the chat runs QWen's chat_stream
        require_chat_model(model.generation_config, "cli_demo.py")
        config = apply_conf(model.generation_config, overrides)
    session = ChatSession(model, tokenizer, config, system=args.system, seed=seed)
    return Repl(session).run()


if __name__ == "__main__":
    sys.exit(main())
