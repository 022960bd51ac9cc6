"""Make and convert QWen checkpoints in the hub's on-disk layout (the command line; the work is in qwen/).

python -m qwen.convert tiny OUT_DIR [--layers 2 --hidden 64 ...]   # random tiny checkpoint for tests
python -m qwen.convert llama SRC_DIR_OR_GGUF OUT_DIR               # Llama-layout model -> QWen layout
python -m qwen.convert demo [--cache-dir DIR]                      # prepare the offline demo model
python -m qwen.convert merge-lora ADAPTER_DIR OUT_DIR              # LoRA / Q-LoRA adapter -> full checkpoint
"""

import argparse
import sys
from pathlib import Path

from .checkpoints import TINY_FORMATS, convert_llama, load_llama, make_tiny_checkpoint
from .errors import CheckpointError


def _command_tiny(args) -> None:
    path = make_tiny_checkpoint(
        args.out_dir,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        intermediate=args.intermediate,
        seq_length=args.seq_length,
        seed=args.seed,
        chat=args.chat,
        shard_size=args.shard_size,
        format=args.format,
    )
    print(f"tiny {'chat' if args.chat else 'base'} checkpoint written to {path}")


def _command_llama(args) -> None:
    source = Path(args.source)
    if not source.exists():
        raise CheckpointError(f"{source} does not exist: give a transformers model directory or a .gguf file.")
    model, tokenizer = load_llama(source)
    print(f"QWen checkpoint written to {convert_llama(model, tokenizer, args.out_dir)}")


def _command_demo(args) -> None:
    from .demo import demo_checkpoint

    print(demo_checkpoint(args.cache_dir))


def _command_merge_lora(args) -> None:
    from .sft import merge_lora

    print(f"merged checkpoint written to {merge_lora(args.adapter_dir, args.out_dir, args.shard_size)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen.convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny", help="write a random tiny QWen checkpoint in the hub's layout")
    tiny.add_argument("out_dir")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--intermediate", type=int, default=256, help="twice the MLP width, as in config.json")
    tiny.add_argument("--seq-length", type=int, default=2048)
    tiny.add_argument("--seed", type=int, default=0)
    kind = tiny.add_mutually_exclusive_group()
    kind.add_argument("--chat", dest="chat", action="store_true", default=True, help="chat model (default)")
    kind.add_argument("--base", dest="chat", action="store_false", help="base model (chat_format raw)")
    tiny.add_argument("--shard-size", default="2MB", help="largest weight shard, e.g. 2MB (default)")
    tiny.add_argument(
        "--format",
        choices=sorted(TINY_FORMATS),
        default="safetensors",
        help="safetensors: shards + index (default); single: one model.safetensors; "
        "bin: Aug-2023 pytorch_model*.bin with the legacy config keys",
    )
    tiny.set_defaults(run=_command_tiny)

    llama = commands.add_parser("llama", help="convert a Llama-layout model (directory or .gguf) to QWen")
    llama.add_argument("source", help="a transformers model directory or a .gguf file")
    llama.add_argument("out_dir")
    llama.set_defaults(run=_command_llama)

    demo = commands.add_parser("demo", help="prepare the offline demo model and print its path")
    demo.add_argument("--cache-dir", default=None, help="default: $QWEN_DEMO_DIR or ~/.cache/qwen/demo")
    demo.set_defaults(run=_command_demo)

    merge = commands.add_parser("merge-lora", help="merge a finetune.py LoRA / Q-LoRA adapter into its base model")
    merge.add_argument("adapter_dir", help="finetune.py --use_lora output directory (adapter_config.json)")
    merge.add_argument("out_dir")
    merge.add_argument("--shard-size", default="2GB", help="largest weight shard (default 2GB)")
    merge.set_defaults(run=_command_merge_lora)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
