"""Weight-layout conversions between QWen (v1) and the Llama / Qwen2 layout of transformers.

Both directions are driven by the same name table. QWen fuses q/k/v into one `c_attn` (with a bias) and
names its gated MLP w1 (up) / w2 (SiLU gate) / c_proj (down); Llama and Qwen2 share one naming scheme
(`model.layers.N.self_attn.q_proj`, ...), so one table serves `qwen_to_qwen2` and `llama_to_qwen`.
"""

import re

import torch

from .configuration_qwen import QWenConfig

# Every tensor of a QWen checkpoint: (QWen name, Llama/Qwen2 name, shape), "{i}" the layer, "{kind}" weight|bias.
# Shape symbols: qkv = 3 * heads * head_dim, attn = heads * head_dim, ffn = intermediate_size // 2 (as in the
# hub's Qwen-7B-Chat model.safetensors.index.json). The fused c_attn has no one-to-one Llama name: its rows are
# [q; k; v] (the original splits its output in that order) -> HF_SPLIT_QKV.
QWEN_TENSORS = (
    ("transformer.wte.weight", "model.embed_tokens.weight", ("vocab", "hidden")),
    ("transformer.h.{i}.ln_1.weight", "model.layers.{i}.input_layernorm.weight", ("hidden",)),
    ("transformer.h.{i}.attn.c_attn.weight", None, ("qkv", "hidden")),
    ("transformer.h.{i}.attn.c_attn.bias", None, ("qkv",)),
    ("transformer.h.{i}.attn.c_proj.weight", "model.layers.{i}.self_attn.o_proj.weight", ("hidden", "attn")),
    ("transformer.h.{i}.ln_2.weight", "model.layers.{i}.post_attention_layernorm.weight", ("hidden",)),
    ("transformer.h.{i}.mlp.w1.weight", "model.layers.{i}.mlp.up_proj.weight", ("ffn", "hidden")),
    ("transformer.h.{i}.mlp.w2.weight", "model.layers.{i}.mlp.gate_proj.weight", ("ffn", "hidden")),  # SiLU gate
    ("transformer.h.{i}.mlp.c_proj.weight", "model.layers.{i}.mlp.down_proj.weight", ("hidden", "ffn")),
    ("transformer.ln_f.weight", "model.norm.weight", ("hidden",)),
    ("lm_head.weight", "lm_head.weight", ("vocab", "hidden")),
)
# QWen name -> Llama/Qwen2 name, one-to-one renames only.
QWEN_TO_HF_NAMES = {qwen: hf for qwen, hf, _ in QWEN_TENSORS if hf is not None}
# QWen name -> shape symbols (the tiny-checkpoint maker reads this).
QWEN_TENSOR_SHAPES = {qwen: dims for qwen, _, dims in QWEN_TENSORS}

QWEN_FUSED_QKV = "transformer.h.{i}.attn.c_attn.{kind}"
HF_SPLIT_QKV = tuple(f"model.layers.{{i}}.self_attn.{p}_proj.{{kind}}" for p in "qkv")


def tensor_sizes(config) -> dict[str, int]:
    """Values of the shape symbols of QWEN_TENSORS for a QWenConfig."""
    attn = config.num_attention_heads * config.kv_channels
    return {
        "vocab": config.vocab_size,
        "hidden": config.hidden_size,
        "qkv": 3 * attn,
        "attn": attn,
        "ffn": config.intermediate_size // 2,
    }


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{kind\}", r"(?P<kind>weight|bias)")
    return re.compile(escaped + "$")


def _rename(name: str, table: dict[str, str]) -> str | None:
    for source, target in table.items():
        match = _pattern(source).match(name)
        if match:
            return target.format(**match.groupdict())
    return None


def _reject_unknown(names: list[str], what: str) -> None:
    if names:
        raise ValueError(f"{what}: no conversion rule for {len(names)} tensor(s), e.g. {sorted(names)[:5]}")


def qwen_to_qwen2(config: QWenConfig, state_dict: dict[str, torch.Tensor]):
    """QWen checkpoint -> (transformers.Qwen2Config, Qwen2ForCausalLM state dict), same function."""
    from transformers import Qwen2Config

    if config.rotary_pct != 1.0:
        raise ValueError(f"Qwen2 rotates the whole head; this QWen config has rotary_pct={config.rotary_pct}.")
    if not config.no_bias:
        raise ValueError("Qwen2 has no bias on o_proj / MLP; this QWen config has no_bias=False.")
    qwen2_config = Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size // 2,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.kv_channels,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_emb_base)},
        tie_word_embeddings=config.tie_word_embeddings,
        use_sliding_window=False,
        hidden_act="silu",
    )
    fused, split = _pattern(QWEN_FUSED_QKV), HF_SPLIT_QKV
    converted, unknown = {}, []
    for name, tensor in state_dict.items():
        if match := fused.match(name):
            for target, part in zip(split, tensor.chunk(3, dim=0), strict=True):
                converted[target.format(**match.groupdict())] = part.clone()
        elif (target := _rename(name, QWEN_TO_HF_NAMES)) is not None:
            converted[target] = tensor
        elif not name.endswith("rotary_emb.inv_freq"):
            unknown.append(name)
    _reject_unknown(unknown, "qwen_to_qwen2")
    if config.tie_word_embeddings:
        converted.pop("lm_head.weight", None)
    return qwen2_config, converted


def llama_to_qwen(llama_config, state_dict: dict[str, torch.Tensor], **overrides):
    """Llama-layout checkpoint (LlamaForCausalLM / SmolLM2 / Qwen2) -> (QWenConfig, QWenLMHeadModel state dict).

    Grouped K/V heads are repeated to full multi-head attention; the c_attn bias is zero unless the source
    has q/k/v biases (Qwen2). `overrides` set or replace QWenConfig keys (e.g. seq_length, bf16).
    """
    rope = getattr(llama_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"QWen only has plain RoPE; the source uses rope_type={rope['rope_type']!r}.")
    if getattr(llama_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"QWen's MLP is SwiGLU; the source uses hidden_act={llama_config.hidden_act!r}.")
    if getattr(llama_config, "mlp_bias", False):
        raise ValueError("QWen's MLP has no bias; the source has mlp_bias=True.")
    heads = llama_config.num_attention_heads
    kv_heads = getattr(llama_config, "num_key_value_heads", None) or heads
    head_dim = getattr(llama_config, "head_dim", None) or llama_config.hidden_size // heads
    fields = {
        "vocab_size": llama_config.vocab_size,
        "hidden_size": llama_config.hidden_size,
        "num_hidden_layers": llama_config.num_hidden_layers,
        "num_attention_heads": heads,
        "kv_channels": head_dim,
        "intermediate_size": 2 * llama_config.intermediate_size,
        "rotary_pct": 1.0,
        "rotary_emb_base": float(rope.get("rope_theta", getattr(llama_config, "rope_theta", 10000.0))),
        "layer_norm_epsilon": llama_config.rms_norm_eps,
        "seq_length": llama_config.max_position_embeddings,
        "max_position_embeddings": llama_config.max_position_embeddings,
        "use_dynamic_ntk": False,
        "use_logn_attn": False,
        "tie_word_embeddings": bool(getattr(llama_config, "tie_word_embeddings", False)),
        "initializer_range": getattr(llama_config, "initializer_range", 0.02),
        "no_bias": True,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fields[key] = getattr(llama_config, key, None)
    config = QWenConfig(**{**fields, **overrides})

    hf_to_qwen = {target: source for source, target in QWEN_TO_HF_NAMES.items()}
    split = {kind: _pattern(template) for kind, template in zip("qkv", HF_SPLIT_QKV, strict=True)}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q,k,v}
    converted, unknown = {}, []
    for name, tensor in state_dict.items():
        matches = {p: m for p, pattern in split.items() if (m := pattern.match(name))}
        if matches:
            (part, match), = matches.items()
            qkv_parts.setdefault((match["i"], match["kind"]), {})[part] = tensor
        elif (target := _rename(name, hf_to_qwen)) is not None:
            converted[target] = tensor
        elif not name.endswith("rotary_emb.inv_freq"):
            unknown.append(name)
    _reject_unknown(unknown, "llama_to_qwen")

    repeats = heads // kv_heads
    for layer in range(config.num_hidden_layers):
        weights = qkv_parts.get((str(layer), "weight"))
        if weights is None or set(weights) != {"q", "k", "v"}:
            raise ValueError(f"llama_to_qwen: layer {layer} lacks one of q_proj/k_proj/v_proj weights.")
        biases = qkv_parts.get((str(layer), "bias"), {})
        full = {}
        for part in "qkv":
            w = weights[part]
            b = biases.get(part, torch.zeros(w.shape[0], dtype=w.dtype))
            if part != "q":  # kv head j serves query heads j*repeats .. (j+1)*repeats-1 (transformers' repeat_kv)
                w = w.view(kv_heads, head_dim, -1).repeat_interleave(repeats, dim=0).reshape(heads * head_dim, -1)
                b = b.view(kv_heads, head_dim).repeat_interleave(repeats, dim=0).reshape(-1)
            full[part] = (w, b)
        converted[QWEN_FUSED_QKV.format(i=layer, kind="weight")] = torch.cat([full[p][0] for p in "qkv"], dim=0)
        converted[QWEN_FUSED_QKV.format(i=layer, kind="bias")] = torch.cat([full[p][1] for p in "qkv"], dim=0)

    if config.tie_word_embeddings:
        converted.pop("lm_head.weight", None)
    elif "lm_head.weight" not in converted:
        converted["lm_head.weight"] = converted["transformer.wte.weight"].clone()  # source tied implicitly
    return config, converted


__all__ = ["qwen_to_qwen2", "llama_to_qwen", "QWEN_TENSORS", "QWEN_TO_HF_NAMES", "QWEN_TENSOR_SHAPES", "tensor_sizes"]
