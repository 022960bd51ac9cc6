"""Facts of the hub's on-disk checkpoint layout, and the code that writes checkpoints in it.

The tiny-checkpoint factory (tests, and users trying things) and the Llama -> QWen converter (the demo model)
both write what `qwen.loading` reads: config.json with the hub's auto_map, generation_config.json,
tokenizer_config.json, qwen.tiktoken (or the source's own tokenizer), safetensors shards + index.
"""

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from qwen_generation_utils import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_WINDOW_SIZE

from .configuration_qwen import LEGACY_CONFIG_KEYS
from .errors import CheckpointError
from .weights import QWEN_TENSOR_SHAPES

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
    "max_window_size": DEFAULT_MAX_WINDOW_SIZE,
    "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
    "transformers_version": "4.32.0",
}
HUB_VOCAB_SIZE = 151936  # qwen.tiktoken's 151643 ranks + 208 special tokens, padded

# final config.json key -> the Aug-2023 name its first release used (the rest kept their names); the Aug-2023
# files also carried padded_vocab_size beside vocab_size.
AUG_2023_KEY_NAMES = {final: legacy for legacy, final in LEGACY_CONFIG_KEYS.items() if legacy != "padded_vocab_size"}
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
    for template, dims in QWEN_TENSOR_SHAPES.items():
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
    config_file = source / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text(encoding="utf-8")).get("model_type") == "qwen":
        raise CheckpointError(
            f"{source} is already a QWen checkpoint: `convert llama` takes a Llama-layout model (a transformers "
            "directory or a .gguf file). Use the QWen checkpoint as it is with -c."
        )
    location, gguf = (source.parent, {"gguf_file": source.name}) if source.is_file() else (source, {})
    with _bars_on_a_terminal_only():
        tokenizer = AutoTokenizer.from_pretrained(location, **gguf)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **gguf)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _bars_on_a_terminal_only():
    """Progress bars on a terminal only: transformers' GGUF reading draws its bar with tqdm directly (no hook or
    switch), redrawn ten times a second, and in a log or a pipe every redraw is a line of its own."""
    if sys.stderr.isatty():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # errors still raise
        yield


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
        max_window_size=min(DEFAULT_MAX_WINDOW_SIZE, config.max_position_embeddings),
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=model.generation_config.pad_token_id
        if model.generation_config.pad_token_id is not None
        else eos[0],
        bos_token_id=model.generation_config.bos_token_id,
        # Greedy by default: a small model sampled even at low temperature can open in the wrong language;
        # users opt into sampling per run (--temperature, :conf, the API's temperature).
        do_sample=False,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
    )
    generation.save_pretrained(out)
    return out


