"""Make and convert QWen checkpoints in the hub's on-disk layout.

python -m qwen.convert tiny OUT_DIR [--layers 2 --hidden 64 ...]   # random tiny checkpoint for tests
python -m qwen.convert llama SRC_DIR_OR_GGUF OUT_DIR               # Llama-layout model -> QWen layout
python -m qwen.convert demo [--cache-dir DIR]                      # prepare the offline demo model
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

# Files of the hub's Qwen-7B-Chat that describe the model (facts of the published layout).
HUB_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
HUB_TOKENIZER_CONFIG = {
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    "tokenizer_class": "QWenTokenizer",
}
# generation_config.json of Qwen-7B-Chat; the base models differ only in chat_format "raw".
HUB_GENERATION_CONFIG = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "stop_words_ids": [[151643]],
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
    "transformers_version": "4.32.0",
}
HUB_VOCAB_SIZE = 151936  # qwen.tiktoken's 151643 ranks + 208 special tokens, padded

# The hub's tensor names and shapes (as in Qwen-7B-Chat's model.safetensors.index.json); "{i}" is the layer.
# Sizes: qkv = 3 * heads * head_dim, attn = heads * head_dim, ffn = intermediate_size // 2.
HUB_TENSOR_SHAPES = {
    "transformer.wte.weight": ("vocab", "hidden"),
    "transformer.h.{i}.ln_1.weight": ("hidden",),
    "transformer.h.{i}.attn.c_attn.weight": ("qkv", "hidden"),
    "transformer.h.{i}.attn.c_attn.bias": ("qkv",),
    "transformer.h.{i}.attn.c_proj.weight": ("hidden", "attn"),
    "transformer.h.{i}.ln_2.weight": ("hidden",),
    "transformer.h.{i}.mlp.w1.weight": ("ffn", "hidden"),
    "transformer.h.{i}.mlp.w2.weight": ("ffn", "hidden"),
    "transformer.h.{i}.mlp.c_proj.weight": ("hidden", "ffn"),
    "transformer.ln_f.weight": ("hidden",),
    "lm_head.weight": ("vocab", "hidden"),
}

# final config.json key -> the Aug-2023 name its first release used (the rest of the keys kept their names).
AUG_2023_KEY_NAMES = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
    "max_position_embeddings": "n_positions",
    "intermediate_size": "ffn_hidden_size",
    "emb_dropout_prob": "embd_pdrop",
    "attn_dropout_prob": "attn_pdrop",
}
# Keys only the Aug-2023 config.json carried (Megatron leftovers the model never read).
AUG_2023_EXTRA_KEYS = {
    "activation": "swiglu",
    "apply_residual_connection_post_layernorm": False,
    "bias_dropout_fusion": True,
    "params_dtype": "torch.bfloat16",
    "pos_emb": "rotary",
    "resid_pdrop": 0.1,
    "tokenizer_type": "QWenTokenizer",
}

TINY_FORMATS = {  # --format -> (safetensors?, sharded?)
    "safetensors": (True, True),
    "single": (True, False),
    "bin": (False, True),
}


def hub_config_dict(
    *, layers: int, hidden: int, heads: int, intermediate: int, seq_length: int, legacy: bool = False
) -> dict:
    """config.json of a QWen checkpoint as the hub publishes it (legacy: with the Aug-2023 key names)."""
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": HUB_AUTO_MAP,
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "kv_channels": hidden // heads,
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": 4 * seq_length,  # Qwen-7B-Chat: 32768 for seq_length 8192
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": seq_length,
        "softmax_in_fp32": False,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_cache_kernel": False,
        "use_cache_quantization": False,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": HUB_VOCAB_SIZE,
    }
    if legacy:
        config = {AUG_2023_KEY_NAMES.get(key, key): value for key, value in config.items()}
        config.update(AUG_2023_EXTRA_KEYS, padded_vocab_size=HUB_VOCAB_SIZE, transformers_version="4.31.0")
        for key in (
            "softmax_in_fp32",
            "use_cache_kernel",
            "use_cache_quantization",
        ):  # came with the final release
            del config[key]
    return dict(sorted(config.items()))


def tiny_state_dict(
    *, layers: int, hidden: int, heads: int, intermediate: int, seed: int, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Seeded random weights under the hub's tensor names; norms near 1, everything else small."""
    head_dim = hidden // heads
    sizes = {
        "vocab": HUB_VOCAB_SIZE,
        "hidden": hidden,
        "qkv": 3 * heads * head_dim,
        "attn": heads * head_dim,
        "ffn": intermediate // 2,
    }
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for template, dims in HUB_TENSOR_SHAPES.items():
        for i in range(layers) if "{i}" in template else [None]:
            name = template.format(i=i)
            noise = torch.randn([sizes[d] for d in dims], generator=generator)
            is_norm = len(dims) == 1 and name.endswith("weight")
            state_dict[name] = (1.0 + 0.1 * noise if is_norm else 0.02 * noise).to(dtype)
    return state_dict


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    out_dir: Path,
    *,
    safetensors: bool = True,
    shard_size: str | int | None = None,
) -> None:
    """Weights in the transformers layout: one file, or shards plus the *.index.json (via huggingface_hub)."""
    from huggingface_hub import save_torch_state_dict

    pattern = "model{suffix}.safetensors" if safetensors else "pytorch_model{suffix}.bin"
    save_torch_state_dict(
        state_dict,
        out_dir,
        filename_pattern=pattern,
        safe_serialization=safetensors,
        max_shard_size=shard_size or "1000GB",
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_checkpoint(
    out_dir: str | os.PathLike,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 256,
    seq_length: int = 2048,
    seed: int = 0,
    chat: bool = True,
    shard_size: str | int = "2MB",
    format: str = "safetensors",
) -> Path:
    """A random QWen checkpoint in the hub's exact on-disk layout (weights in bf16, like the hub's).

    format: "safetensors" (shards + model.safetensors.index.json), "single" (one model.safetensors), or
    "bin" (Aug-2023 release: pytorch_model*.bin and config.json with the legacy key names).
    """
    from .tokenization_qwen import VOCAB_FILES_NAMES, default_vocab_file

    if format not in TINY_FORMATS:
        raise ValueError(f"format must be one of {sorted(TINY_FORMATS)}, not {format!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    safetensors, sharded = TINY_FORMATS[format]
    sizes = {"layers": layers, "hidden": hidden, "heads": heads, "intermediate": intermediate}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", hub_config_dict(**sizes, seq_length=seq_length, legacy=format == "bin"))
    generation = {**HUB_GENERATION_CONFIG, "chat_format": "chatml" if chat else "raw"}
    _write_json(out / "generation_config.json", generation)
    _write_json(out / "tokenizer_config.json", {**HUB_TOKENIZER_CONFIG, "model_max_length": seq_length})
    shutil.copyfile(default_vocab_file(), out / VOCAB_FILES_NAMES["vocab_file"])
    state_dict = tiny_state_dict(**sizes, seed=seed)
    save_state_dict(state_dict, out, safetensors=safetensors, shard_size=shard_size if sharded else None)
    return out


def load_llama(source: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a Llama-layout model: a transformers directory or a .gguf file (dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(source)
    location, gguf = (source.parent, {"gguf_file": source.name}) if source.is_file() else (source, {})
    tokenizer = AutoTokenizer.from_pretrained(location, **gguf)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **gguf)
    return model.eval(), tokenizer


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted({eos} if isinstance(eos, int) else set(eos))


def convert_llama(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save a loaded Llama-layout model as a QWen checkpoint; the tokenizer and chat template stay its own.

    Deterministic: converting the same model twice gives byte-identical files.
    """
    from transformers import GenerationConfig

    from .weights import llama_to_qwen

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    config, qwen_state_dict = llama_to_qwen(model.config, state_dict)
    config.architectures = ["QWenLMHeadModel"]
    config.save_pretrained(out)
    save_state_dict(qwen_state_dict, out)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF tokenizers come without one
    tokenizer.save_pretrained(out)

    vocab = tokenizer.get_vocab()
    has_chatml = all(token in vocab for token in ("<|im_start|>", "<|im_end|>"))
    if not has_chatml:
        print(
            f"warning: {tokenizer.name_or_path} has no <|im_start|>/<|im_end|> tokens: saved with "
            "chat_format 'raw' (a base model: model.chat() will not work)",
            file=sys.stderr,
        )
    eos = _eos_ids(model, tokenizer)
    generation = GenerationConfig(
        chat_format="chatml" if has_chatml else "raw",
        max_window_size=min(6144, config.max_position_embeddings),
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=model.generation_config.pad_token_id
        if model.generation_config.pad_token_id is not None
        else eos[0],
        bos_token_id=model.generation_config.bos_token_id,
        # Greedy by default: a small model sampled even at low temperature can open in the wrong language;
        # users opt into sampling per run (--temperature, :conf, the API's temperature).
        do_sample=False,
        max_new_tokens=512,
    )
    generation.save_pretrained(out)
    return out


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
        from .loading import CheckpointError

        raise CheckpointError(
            f"{source} does not exist: give a transformers model directory or a .gguf file."
        )
    model, tokenizer = load_llama(source)
    print(f"QWen checkpoint written to {convert_llama(model, tokenizer, args.out_dir)}")


def _command_demo(args) -> None:
    from .demo import demo_checkpoint

    print(demo_checkpoint(args.cache_dir))


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

    args = parser.parse_args(argv)
    from .loading import CheckpointError

    try:
        args.run(args)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
