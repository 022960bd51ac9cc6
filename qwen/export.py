"""Export a QWen (v1) checkpoint to transformers' Qwen2ForCausalLM layout, which vLLM and SGLang serve as is.

`python -m qwen.convert to-qwen2 SRC OUT` writes:
- weights renamed and split by `qwen.weights.qwen_to_qwen2` (the one tensor table), shard by shard, so a 72B
  checkpoint never has to fit in memory at once;
- config.json (Qwen2Config): the same math up to `seq_length`. Past it QWen scales RoPE with dynamic NTK and
  the queries with logN; no serving engine has that pair, so the export encodes NTK as the closest thing the
  engines run (see `long_context_rope`) and logN is dropped;
- the tokenizer as a transformers *fast* tokenizer (tokenizer.json) with the same ids: qwen.tiktoken's ranks as
  byte-level BPE, the same pre-tokenization regex and NFC normalisation, the 208 special tokens at their ids;
  a checkpoint that already has a fast tokenizer (the demo model) keeps its own;
- a ChatML chat template that renders make_context()'s layout, and generation_config.json with the chat
  model's stop tokens.
GPTQ checkpoints (the hub's Int4 / Int8) export too: their packed q/k/v are split along the output columns.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig

from qwen_generation_utils import DEFAULT_SYSTEM, ENDOFTEXT, IM_END, IM_START

from .chat_api import chat_stop_tokens, is_chat_model
from .configuration_qwen import QWenConfig
from .errors import CheckpointError, UsageError
from .modeling_qwen import dynamic_ntk_alpha
from .weights import qwen_to_qwen2

ROPE_MODES = ("longrope", "none")
# The tensors of a GPTQ-quantized Linear (auto-gptq v1, the hub's Qwen-*-Int4/Int8): packed int32 qweight
# [in*bits/32, out], qzeros [groups, out*bits/32], scales [groups, out], g_idx [in]; the output runs along columns.
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
SHARD_INDEX = "model.safetensors.index.json"
# generation_config.json keys whose meaning is the same in transformers, vLLM and SGLang (the Qwen-only keys
# chat_format / max_window_size / stop_words_ids have no counterpart there; the stop ids become eos_token_id).
PORTABLE_GENERATION_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


# ---------------------------------------------------------------------------------------------------------------
# Long context


def ntk_long_factor(alpha: float, rotary_dim: int) -> list[float]:
    """Per-frequency divisors that turn RoPE(base) into RoPE(base * alpha ** (d / (d - 2))): NTK-aware scaling.

    inv_freq_i = base ** (-2i/d); with the NTK base it is divided by alpha ** (d/(d-2) * 2i/d) = alpha ** (2i/(d-2)).
    """
    return [float(alpha ** (2 * i / (rotary_dim - 2))) for i in range(rotary_dim // 2)]


def long_context_rope(config: QWenConfig, max_positions: int, mode: str = "longrope") -> dict:
    """Qwen2 `rope_parameters` for serving up to `max_positions` tokens.

    "longrope" (default when max_positions > seq_length): transformers' and vLLM's LongRoPE with short factors 1
    (plain RoPE, exact, while the sequence fits in seq_length) and long factors that are QWen's NTK at the alpha
    QWen uses for a max_positions-token context (7 for 4 x seq_length), attention factor 1. What differs from
    QWen past seq_length: one alpha for the whole band instead of 3, 7, 15 ... per doubling, no logN query
    scaling, and the engine switches per batch (vLLM: when any sequence of the step is long), not per sequence.
    "none": plain RoPE; set max_position_embeddings = seq_length so engines refuse longer prompts.
    """
    base = {"rope_type": "default", "rope_theta": float(config.rotary_emb_base)}
    seq_length = config.check_seq_length()
    if mode == "none" or max_positions <= seq_length or not config.use_dynamic_ntk:
        return base
    if mode != "longrope":
        raise UsageError(f"unknown rope mode {mode!r}: use one of {', '.join(ROPE_MODES)}")
    alpha = dynamic_ntk_alpha(max_positions, seq_length)
    rotary_dim = config.rotary_dim
    return {
        "rope_type": "longrope",
        "rope_theta": float(config.rotary_emb_base),
        "original_max_position_embeddings": seq_length,
        "short_factor": [1.0] * (rotary_dim // 2),
        "long_factor": ntk_long_factor(alpha, rotary_dim),
        "factor": max_positions / seq_length,
        "attention_factor": 1.0,  # transformers' name
        "short_mscale": 1.0,  # vLLM's names for the same cos/sin factor
        "long_mscale": 1.0,
    }


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def chatml_template() -> str:
    """Jinja chat template giving make_context()'s layout: every turn "<|im_start|>role\\ncontent<|im_end|>\\n",
    the default system prompt when the conversation has none, then "<|im_start|>assistant\\n" when asked for."""
    turn = IM_START + "{{ message['role'] }}\n{{ message['content'] }}" + IM_END + "\n"
    default_system = f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n"
    return (
        "{% for message in messages %}"
        f"{{% if loop.first and message['role'] != 'system' %}}{default_system}{{% endif %}}"
        f"{turn}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{IM_START}assistant\n{{% endif %}}"
    )


def qwen_fast_tokenizer(qwen_tokenizer):
    """QWenTokenizer (tiktoken) -> transformers fast tokenizer with the same ids, via transformers' converter.

    tiktoken and byte-level BPE agree when the merges are derived from the ranks (TikTokenConverter does that)
    and a pre-token that is itself in the vocabulary is taken whole (ignore_merges), as tiktoken does.
    """
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from .tokenization_qwen import PAT_STR

    ranks = dict(qwen_tokenizer.mergeable_ranks)
    special = dict(sorted(qwen_tokenizer.special_tokens.items(), key=lambda item: item[1]))

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_):  # our ranks, extra vocabulary included, instead of re-reading a file
            return ranks

    backend = _Converter(vocab_file="qwen.tiktoken", pattern=PAT_STR, extra_special_tokens=list(special)).converted()
    backend.normalizer = normalizers.NFC()  # QWenTokenizer NFC-normalises before encoding
    for token, index in special.items():
        if backend.token_to_id(token) != index:
            raise ValueError(f"special token {token} got id {backend.token_to_id(token)}, expected {index}")
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)


def _export_tokenizer(source: Path, out: Path, *, chat: bool, max_length: int) -> object:
    from transformers import AutoTokenizer

    from .tokenization_qwen import QWenTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if isinstance(tokenizer, QWenTokenizer):
        fast = qwen_fast_tokenizer(tokenizer)
        fast.eos_token = IM_END if chat else ENDOFTEXT
        fast.pad_token = ENDOFTEXT
    elif tokenizer.is_fast:
        fast = tokenizer  # e.g. the demo model: already a fast tokenizer with its own ChatML tokens
    else:
        raise CheckpointError(f"{source}: cannot export a {type(tokenizer).__name__}: no fast tokenizer exists for it.")
    fast.model_max_length = max_length
    if chat:
        fast.chat_template = chatml_template()
    fast.save_pretrained(out)
    return fast


# ---------------------------------------------------------------------------------------------------------------
# Weights


def _weight_files(source: Path) -> list[Path]:
    for index_name in (SHARD_INDEX, "pytorch_model.bin.index.json"):
        if (source / index_name).is_file():
            weight_map = json.loads((source / index_name).read_text(encoding="utf-8"))["weight_map"]
            return [source / name for name in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (source / single).is_file():
            return [source / single]
    raise CheckpointError(f"{source} has no weights (model*.safetensors or pytorch_model*.bin).")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _readable(path: Path) -> None:
    """Give a written file the usual permissions (safetensors writes 0600): containers read exports as non-root."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _gptq_to_qwen2(config: QWenConfig, tensors: dict[str, torch.Tensor], bits: int):
    """qwen_to_qwen2 for a GPTQ shard: the table renames each quantized Linear and splits c_attn's output rows into
    q/k/v; packed tensors hold the output along columns, so they go through it transposed. g_idx (per input
    column) is the same for q, k and v."""
    plain, packed = {}, {}
    for name, tensor in tensors.items():
        prefix, _, part = name.rpartition(".")
        if part in GPTQ_PARTS:
            packed.setdefault(prefix, {})[part] = tensor
        else:
            plain[name] = tensor
    qwen2_config, converted = qwen_to_qwen2(config, plain)
    per_word = 32 // bits
    for prefix, parts in packed.items():
        targets = list(qwen_to_qwen2(config, {f"{prefix}.weight": torch.zeros(3, 1)})[1])
        if len(targets) > 1 and (config.num_attention_heads * config.kv_channels) % per_word:
            raise CheckpointError(f"{prefix}: q/k/v widths are not a multiple of {per_word}; qzeros cannot be split.")
        for part, tensor in parts.items():
            if part == "g_idx":
                converted.update({target[: -len("weight")] + part: tensor.clone() for target in targets})
                continue
            _, split = qwen_to_qwen2(config, {f"{prefix}.weight": tensor.T})
            converted.update({target[: -len("weight")] + part: value.T for target, value in split.items()})
    return qwen2_config, converted


def _export_weights(config: QWenConfig, source: Path, out: Path, dtype: torch.dtype | None):
    """Convert shard by shard; returns the Qwen2Config and the dtype the weights were written in."""
    from safetensors.torch import save_file

    files = _weight_files(source)
    gptq_bits = (getattr(config, "quantization_config", None) or {}).get("bits")
    weight_map, total_size, qwen2_config, written_dtype = {}, 0, None, dtype
    for number, path in enumerate(files, start=1):
        if gptq_bits:
            qwen2_config, tensors = _gptq_to_qwen2(config, _read_weights(path), gptq_bits)
        else:
            qwen2_config, tensors = qwen_to_qwen2(config, _read_weights(path))
        if dtype is not None:
            tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
        tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
        if written_dtype is None:
            written_dtype = next((t.dtype for n, t in tensors.items() if n.endswith("norm.weight")), None)
        shard = f"model-{number:05d}-of-{len(files):05d}.safetensors" if len(files) > 1 else "model.safetensors"
        save_file(tensors, out / shard, metadata={"format": "pt"})
        _readable(out / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return qwen2_config, written_dtype


# ---------------------------------------------------------------------------------------------------------------
# The export


def _source_generation_config(source: Path) -> dict:
    """The checkpoint's generation_config.json ({} when it has none)."""
    source_file = source / "generation_config.json"
    return json.loads(source_file.read_text(encoding="utf-8")) if source_file.is_file() else {}


def _generation_config(source_config: dict, tokenizer):
    """generation_config.json for the export, from the checkpoint's (`source_config`)."""
    from qwen_generation_utils import eod_id

    # Every id that ends a reply here (eos, <|im_end|>, <|im_start|>, one-token stop words) is an eos id there.
    stop = chat_stop_tokens(tokenizer, GenerationConfig(**source_config))[0]
    kwargs = {key: source_config[key] for key in PORTABLE_GENERATION_KEYS if key in source_config}
    if kwargs.get("top_k") == 0:  # QWen's "no top-k"; engines disagree on what 0 means, so leave it out
        del kwargs["top_k"]
    pad = source_config.get("pad_token_id", eod_id(tokenizer))
    return GenerationConfig(eos_token_id=list(stop), pad_token_id=pad, bos_token_id=None, **kwargs)


def export_qwen2(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rope: str = "longrope",
    max_positions: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `source` (a QWen checkpoint directory) to `out_dir` in the Qwen2ForCausalLM layout; returns out_dir.

    max_positions: the longest context the export is served with (default: the checkpoint's
    max_position_embeddings); dtype: cast the weights (default: as stored).
    """
    from .loading import check_checkpoint

    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a directory: pass a QWen checkpoint directory (with config.json).")
    if rope not in ROPE_MODES:
        raise UsageError(f"unknown rope mode {rope!r}: use one of {', '.join(ROPE_MODES)}")
    if not (source / "config.json").is_file():
        check_checkpoint(source)  # names what is missing
    raw_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    quantization = raw_config.get("quantization_config") or {}
    if quantization and quantization.get("quant_method") != "gptq":
        raise CheckpointError(f"{source}: cannot export {quantization.get('quant_method')!r} quantization, only GPTQ.")
    if quantization and dtype is not None:
        raise UsageError("--dtype cannot recast a GPTQ checkpoint: its packed weights keep their format.")
    if not quantization:  # (the loader's check, which also names missing shards; GPTQ files are checked as read)
        check_checkpoint(source)
    if raw_config.get("model_type") != "qwen":
        raise CheckpointError(
            f"{source} is not a QWen (v1) checkpoint (model_type {raw_config.get('model_type')!r}); "
            "to-qwen2 exports Qwen (v1) checkpoints such as Qwen/Qwen-7B-Chat."
        )
    config = QWenConfig.from_pretrained(source)
    seq_length = config.check_seq_length()
    max_positions = max_positions or max(config.max_position_embeddings, seq_length)
    if max_positions < 1:
        raise UsageError(f"--max-positions must be positive, not {max_positions}")
    out = Path(out_dir)
    if out.resolve() == source.resolve():
        raise UsageError("the export must go to a new directory, not over the source checkpoint.")
    out.mkdir(parents=True, exist_ok=True)

    source_generation = _source_generation_config(source)
    chat = is_chat_model(GenerationConfig(**source_generation))

    qwen2_config, written_dtype = _export_weights(config, source, out, dtype)
    rope_parameters = long_context_rope(config, max_positions, rope)
    qwen2_config.rope_parameters = rope_parameters
    qwen2_config.max_position_embeddings = max_positions if rope_parameters["rope_type"] != "default" else min(
        max_positions, seq_length
    )
    tokenizer = _export_tokenizer(source, out, chat=chat, max_length=qwen2_config.max_position_embeddings)
    generation = _generation_config(source_generation, tokenizer)
    qwen2_config.architectures = ["Qwen2ForCausalLM"]
    qwen2_config.sliding_window = None
    qwen2_config.eos_token_id = generation.eos_token_id
    qwen2_config.pad_token_id = generation.pad_token_id
    qwen2_config.bos_token_id = None
    qwen2_config.dtype = written_dtype
    if quantization:  # vLLM / SGLang / transformers read it from config.json; auto-gptq from quantize_config.json
        qwen2_config.quantization_config = quantization
        if (source / "quantize_config.json").is_file():
            shutil.copyfile(source / "quantize_config.json", out / "quantize_config.json")
    qwen2_config.save_pretrained(out)
    generation.save_pretrained(out)
    for extra in ("LICENSE", "NOTICE", "README.md"):
        if (source / extra).is_file():
            shutil.copyfile(source / extra, out / extra)
    return out


__all__ = ["export_qwen2", "qwen_fast_tokenizer", "chatml_template", "long_context_rope", "ntk_long_factor"]
