"""Make and convert QWen checkpoints in the hub's on-disk layout (the command line; the work is in qwen/).

python -m qwen.convert tiny OUT_DIR [--layers 2 --hidden 64 ...]   # random tiny checkpoint for tests
python -m qwen.convert llama SRC_DIR_OR_GGUF OUT_DIR               # Llama-layout model -> QWen layout
python -m qwen.convert demo [--cache-dir DIR]                      # prepare the offline demo model
python -m qwen.convert merge-lora ADAPTER_DIR OUT_DIR              # LoRA / Q-LoRA adapter -> full checkpoint
python -m qwen.convert to-qwen2 SRC_DIR OUT_DIR                    # QWen -> Qwen2ForCausalLM (vLLM, SGLang)
"""

import argparse
import json
import sys
from pathlib import Path

from .checkpoints import TINY_FORMATS, convert_llama, load_llama, make_tiny_checkpoint
from .errors import CheckpointError, UserError
from .scripts import quiet_libraries


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
    from .quantize import quiet_gptqmodel
    from .sft import merge_lora

    quiet_gptqmodel()  # peft imports GPT-QModel where it is installed: no banner in the merge's output

    print(f"merged checkpoint written to {merge_lora(args.adapter_dir, args.out_dir, args.shard_size, args.base)}")


def _command_to_qwen2(args) -> None:
    from .export import export_qwen2
    from .loading import DTYPES

    if args.dtype is not None and args.dtype not in DTYPES:
        raise CheckpointError(f"unknown --dtype {args.dtype!r}; use one of bf16, fp16, fp32.")
    out = export_qwen2(
        args.source,
        args.out_dir,
        rope=args.rope,
        max_positions=args.max_positions,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    print(f"Qwen2ForCausalLM checkpoint written to {out} (serve it with vLLM or SGLang as it is)")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    rope = config["rope_parameters"]
    if rope["rope_type"] == "longrope":
        seq_length = rope["original_max_position_embeddings"]
        print(
            f"note: identical to QWen up to {seq_length} tokens: serve with `--max-model-len {seq_length}` for that. "
            f"A larger --max-model-len (up to {config['max_position_embeddings']}) makes vLLM use NTK-scaled RoPE "
            "for every request and has no logN scaling (see examples/serving_vllm.md)."
        )


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
    merge.add_argument("--base", default=None,
                       help="full-precision base to merge into instead of the one the adapter names (an adapter "
                       "trained on Qwen-7B-Chat-Int4 merges into Qwen-7B-Chat)")
    merge.set_defaults(run=_command_merge_lora)

    to_qwen2 = commands.add_parser(
        "to-qwen2", help="export a QWen checkpoint to transformers' Qwen2ForCausalLM layout (vLLM, SGLang)"
    )
    to_qwen2.add_argument("source", help="QWen checkpoint directory (e.g. a download of Qwen/Qwen-7B-Chat)")
    to_qwen2.add_argument("out_dir")
    to_qwen2.add_argument(
        "--rope",
        choices=["longrope", "none"],
        default="longrope",
        help="past seq_length: longrope = QWen's NTK at one alpha (default), none = stop at seq_length",
    )
    to_qwen2.add_argument(
        "--max-positions", type=int, default=None, help="longest context served (default: max_position_embeddings)"
    )
    to_qwen2.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: as stored)")
    to_qwen2.set_defaults(run=_command_to_qwen2)

    args = parser.parse_args(argv)
    quiet_libraries()  # no transformers "Loading weights" bar after the GGUF's own, no library notes
    try:
        args.run(args)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
