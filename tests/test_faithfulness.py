"""Faithfulness to the original 2023 QWen code, checked without transformers' Qwen2 and without our converter.

`reference_logits` below is an independent, loop-based re-statement of the original modeling_qwen.py
(Qwen/Qwen-7B-Chat, Qwen-72B; read in the vendored copies mapengAdam/qianwen-72B/modeling_qwen.py and
undefdev/Qwen-7B-Chat/modeling_qwen.py). Facts it encodes, one per line in the code:
c_attn output split at [q | k | v], each num_heads x head_dim; scores / sqrt(head_dim); causal softmax;
c_proj; MLP c_proj(w1(x) * silu(w2(x))) over intermediate_size // 2; RMSNorm x * rsqrt(mean(x^2) + eps)
in fp32, cast back, then * weight; rotate-half RoPE over the first int(kv_channels * rotary_pct) dims with
inv_freq = 1 / base' ** (arange(0, dim, 2) / dim) and cos/sin of cat(freqs, freqs); dynamic NTK
alpha = max(2 ** ceil(log2(len / seq_length) + 1) - 1, 1) from the whole sequence length and
base' = base * alpha ** (dim / (dim - 2)); logN: query at 0-based position p times log(p + 1, seq_length)
when p + 1 > seq_length, applied after RoPE; both only in eval mode and only when their flags are set.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from qwen.compat import cache_kwargs, output_cache
from qwen.configuration_qwen import QWenConfig
from qwen.modeling_qwen import QWenLMHeadModel, native_cuda_dtype

# ------------------------------------------------------------------------------------------------------------
# An independent reference of the original forward pass (one sequence, no cache, fp32)


def _rms_norm(x, weight, eps):
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def _linear(x, sd, name):
    out = x @ sd[f"{name}.weight"].T
    return out + sd[f"{name}.bias"] if f"{name}.bias" in sd else out


def _original_ntk_alpha(length, seq_length):
    return max(2 ** math.ceil(math.log(length / seq_length, 2) + 1) - 1, 1)


def _rotate(vec, position, inv_freq):
    """One head vector [D] rotated at `position` over its first 2 * len(inv_freq) dims (rotate-half layout)."""
    half = inv_freq.shape[0]
    out = vec.clone()
    for j in range(half):
        angle = torch.tensor(float(position)) * inv_freq[j]
        a, b = vec[j], vec[j + half]
        out[j] = a * angle.cos() - b * angle.sin()
        out[j + half] = b * angle.cos() + a * angle.sin()
    return out


def reference_logits(config: dict, sd: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of the original QWenLMHeadModel in eval mode on one unpadded sequence."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim, eps, seq_length = hidden // heads, config["layer_norm_epsilon"], config["seq_length"]
    rot_dim = int(config["kv_channels"] * config["rotary_pct"])
    length = len(ids)
    alpha = _original_ntk_alpha(length, seq_length) if config["use_dynamic_ntk"] else 1
    base = config["rotary_emb_base"] * alpha ** (rot_dim / (rot_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    logn = [math.log(p + 1, seq_length) if p + 1 > seq_length else 1.0 for p in range(length)]

    x = sd["transformer.wte.weight"][torch.tensor(ids)]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"transformer.h.{layer}"
        h = _rms_norm(x, sd[f"{prefix}.ln_1.weight"], eps)
        q, k, v = _linear(h, sd, f"{prefix}.attn.c_attn").split(hidden, dim=-1)
        q, k, v = (t.reshape(length, heads, head_dim) for t in (q, k, v))
        context = torch.zeros(length, heads, head_dim)
        for head in range(heads):
            keys = [_rotate(k[j, head], j, inv_freq) for j in range(length)]
            for i in range(length):
                query = _rotate(q[i, head], i, inv_freq)
                if config["use_logn_attn"]:
                    query = query * logn[i]
                scores = torch.stack([query @ keys[j] for j in range(i + 1)]) / math.sqrt(head_dim)
                weights = torch.softmax(scores, dim=0)
                context[i, head] = sum(weights[j] * v[j, head] for j in range(i + 1))
        x = x + _linear(context.reshape(length, hidden), sd, f"{prefix}.attn.c_proj")
        h = _rms_norm(x, sd[f"{prefix}.ln_2.weight"], eps)
        x = x + _linear(_linear(h, sd, f"{prefix}.mlp.w1") * F.silu(_linear(h, sd, f"{prefix}.mlp.w2")),
                        sd, f"{prefix}.mlp.c_proj")  # fmt: skip
    x = _rms_norm(x, sd["transformer.ln_f.weight"], eps)
    return x @ sd["lm_head.weight"].T


# ------------------------------------------------------------------------------------------------------------
# Our model against the reference

TINY = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_channels=16,
    intermediate_size=96, layer_norm_epsilon=1e-6, rotary_emb_base=10000, rotary_pct=1.0, seq_length=8,
    max_position_embeddings=64, use_dynamic_ntk=True, use_logn_attn=True, no_bias=True,
)  # fmt: skip


def random_model(seed=0, **overrides) -> tuple[dict, QWenLMHeadModel]:
    config = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = QWenLMHeadModel(QWenConfig(**config, initializer_range=0.3)).eval()
    with torch.no_grad():  # random norm weights and biases, so that a skipped norm or a wrong split shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if "ln_" in name else 0.0))
    return config, model


def machine_default_dtype() -> torch.dtype:
    """What the original picks with no precision flag: the GPU's native half precision, else fp32."""
    return native_cuda_dtype() if torch.cuda.is_available() else torch.float32


def random_ids(length, seed=1):
    return torch.randint(0, TINY["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed)).tolist()


CASES = {
    "short, full rotary": dict(length=6),
    "NTK + logN, partial rotary": dict(length=21, rotary_pct=0.5),  # alpha 3, logN from position 8
    "alpha 7, logN off": dict(length=20, seq_length=4, use_logn_attn=False),
    "logN only, 72B base": dict(length=19, use_dynamic_ntk=False, rotary_emb_base=1000000),
    "no_bias=False, 1/4 rotary": dict(length=18, no_bias=False, rotary_pct=0.25),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_the_original_math(case):
    overrides = dict(CASES[case])
    length = overrides.pop("length")
    config, model = random_model(**overrides)
    ids = random_ids(length)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    expected = reference_logits(config, model.state_dict(), ids)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def _decode_errors(model, config, ids, prompt, check):
    """Prefill `prompt` tokens, then decode one token at a time; max |ours - reference| at the checked lengths."""
    errors = {}
    with torch.no_grad():
        cache = output_cache(model(torch.tensor([ids[:prompt]]), use_cache=True))
        for end in range(prompt + 1, len(ids) + 1):
            out = model(torch.tensor([ids[end - 1 : end]]), use_cache=True, **cache_kwargs(cache))
            cache = output_cache(out)
            if end in check:
                expected = reference_logits(config, model.state_dict(), ids[:end])[-1]
                errors[end] = (out.logits[0, -1] - expected).abs().max().item()
    return errors


def test_cached_decoding_within_one_ntk_alpha_equals_the_original():
    """Prompt of 10 > seq_length 8 (alpha 3), decoding to 16 (still alpha 3): the original and we agree with the
    uncached forward pass, logN factors included, at every step."""
    config, model = random_model(rotary_pct=0.5)
    errors = _decode_errors(model, config, random_ids(16), prompt=10, check=range(11, 17))
    assert max(errors.values()) < 1e-4, errors


def test_cached_decoding_across_an_ntk_boundary_is_exact_for_one_layer():
    """Crossing seq_length while decoding: cached keys are re-rotated to the new alpha. With one layer that is
    the uncached forward pass exactly (the original instead kept the prefill's alpha). With more layers the
    cached keys/values of later layers were computed from hidden states under the old alpha, so the
    re-rotation is an approximation there (see the faithfulness report)."""
    config, model = random_model(num_hidden_layers=1, rotary_pct=0.5)
    errors = _decode_errors(model, config, random_ids(20), prompt=5, check=(8, 9, 16, 17, 20))
    assert max(errors.values()) < 1e-4, errors


def test_ntk_and_logn_are_off_in_training_mode():
    config, model = random_model()
    ids = random_ids(20)
    plain = {**config, "use_dynamic_ntk": False, "use_logn_attn": False}
    model.train()  # dropout probabilities are 0, so train mode differs only by the long-context rules
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, reference_logits(plain, model.state_dict(), ids), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Real hub config.json files load with the Auto classes (no trust_remote_code) and give the original's math

_AUTO_MAP = {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
_FINAL_COMMON = {
    "architectures": ["QWenLMHeadModel"], "auto_map": _AUTO_MAP, "attn_dropout_prob": 0.0, "bf16": False,
    "emb_dropout_prob": 0.0, "fp16": False, "fp32": False, "initializer_range": 0.02, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "model_type": "qwen", "no_bias": True, "onnx_safe": None, "rotary_pct": 1.0,
    "scale_attn_weights": True, "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer",
    "transformers_version": "4.32.0", "use_cache": True, "use_dynamic_ntk": True, "use_flash_attn": "auto",
    "use_logn_attn": True,
}  # fmt: skip
_AUG_2023_COMMON = {
    "activation": "swiglu", "apply_residual_connection_post_layernorm": False, "architectures": ["QWenLMHeadModel"],
    "auto_map": _AUTO_MAP, "attn_pdrop": 0.0, "bf16": False, "fp16": False, "fp32": False, "bias_dropout_fusion": True,
    "bos_token_id": 151643, "eos_token_id": 151643, "ffn_hidden_size": 22016, "initializer_range": 0.02,
    "kv_channels": 128, "model_type": "qwen", "n_embd": 4096, "n_head": 32, "n_layer": 32, "no_bias": True,
    "onnx_safe": None, "padded_vocab_size": 151936, "params_dtype": "torch.bfloat16", "pos_emb": "rotary",
    "resid_pdrop": 0.1, "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 2048,
    "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer", "transformers_version": "4.31.0",
    "use_cache": True, "use_flash_attn": "auto", "vocab_size": 151936, "use_dynamic_ntk": True, "use_logn_attn": True,
}  # fmt: skip
# config.json as shipped (sources: vendored hub copies on GitHub, named per entry; 14B-Chat from the hub page).
REAL_CONFIGS = {
    "Qwen-7B-Chat": {  # zhangningboo/Qwen-7B, hub revision of 2023-09
        **_FINAL_COMMON, "hidden_size": 4096, "intermediate_size": 22016, "max_position_embeddings": 8192,
        "num_attention_heads": 32, "num_hidden_layers": 32, "rotary_emb_base": 10000, "seq_length": 8192,
        "vocab_size": 151936,
    },
    "Qwen-7B-Chat (later revision)": {  # max_position_embeddings raised to 32768
        **_FINAL_COMMON, "hidden_size": 4096, "intermediate_size": 22016, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_hidden_layers": 32, "rotary_emb_base": 10000, "seq_length": 8192,
        "vocab_size": 151936,
    },
    "Qwen-14B-Chat": {
        **_FINAL_COMMON, "hidden_size": 5120, "intermediate_size": 27392, "max_position_embeddings": 8192,
        "num_attention_heads": 40, "num_hidden_layers": 40, "rotary_emb_base": 10000, "seq_length": 2048,
        "vocab_size": 152064,
    },
    "Qwen-72B-Chat": {  # ds-llo/qwcs
        **{k: v for k, v in _FINAL_COMMON.items() if k != "layer_norm_epsilon"}, "layer_norm_epsilon": 1e-06,
        "hidden_size": 8192, "intermediate_size": 49152, "max_position_embeddings": 32768,
        "num_attention_heads": 64, "num_hidden_layers": 80, "rope_theta": 1000000, "rotary_emb_base": 1000000,
        "seq_length": 32768, "use_dynamic_ntk": False, "use_logn_attn": False, "vocab_size": 152064,
    },
    "Qwen-72B (first upload)": {  # mapengAdam/qianwen-72B: bf16 flag, dropout 0.1, legacy padded_vocab_size
        **{k: v for k, v in _FINAL_COMMON.items() if k != "tokenizer_class"}, "attn_dropout_prob": 0.1, "bf16": True,
        "emb_dropout_prob": 0.1, "hidden_size": 8192, "intermediate_size": 49152, "layer_norm_epsilon": 1e-05,
        "max_position_embeddings": 8192, "num_attention_heads": 64, "num_hidden_layers": 80,
        "padded_vocab_size": 152064, "params_dtype": "torch.bfloat16", "rope_theta": 1000000,
        "rotary_emb_base": 1000000, "seq_length": 8192, "softmax_in_fp32": False, "tokenizer_type": "QWenTokenizer",
        "torch_dtype": "bfloat16", "use_cache_kernel": False, "use_cache_quantization": False,
        "use_dynamic_ntk": False, "use_flash_attn": False, "use_logn_attn": False, "vocab_size": 152064,
    },
    "Qwen-1_8B-Chat": {  # CCKS2024/CCKS2024-Summary-of-incidents/qwen-1_8b-chat_model (saved by transformers 4.37)
        **_FINAL_COMMON, "bf16": True, "hidden_size": 2048, "intermediate_size": 11008,
        "max_position_embeddings": 8192, "num_attention_heads": 16, "num_hidden_layers": 24,
        "rotary_emb_base": 10000, "seq_length": 8192, "softmax_in_fp32": False, "torch_dtype": "bfloat16",
        "use_cache_kernel": False, "use_cache_quantization": False, "use_flash_attn": True, "vocab_size": 151936,
    },
    "Qwen-7B-Chat (Aug 2023)": {  # undefdev/Qwen-7B-Chat
        **_AUG_2023_COMMON, "embd_pdrop": 0.1, "layer_norm_epsilon": 1e-05, "n_positions": 6144,
    },
    "Qwen-7B (Aug 2023)": {**_AUG_2023_COMMON, "embd_pdrop": 0.0, "layer_norm_epsilon": 1e-06, "n_positions": 8192},
}

# the dimensions scaled down (under whichever name the file uses); every other key stays as shipped
_TINY_DIMS = {
    ("hidden_size", "n_embd"): 32, ("num_attention_heads", "n_head"): 2, ("num_hidden_layers", "n_layer"): 2,
    ("intermediate_size", "ffn_hidden_size"): 96, ("vocab_size", "padded_vocab_size"): 96, ("kv_channels",): 16,
}  # fmt: skip


def _shipped(config: dict, *names):
    return next(config[name] for name in names if name in config)


def _scaled(config: dict) -> dict:
    config = dict(config)
    for names, value in _TINY_DIMS.items():
        for name in names:
            if name in config:
                config[name] = value
    return config


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_hub_config_loads_with_the_auto_classes_and_matches_the_original(name, tmp_path):
    from transformers import AutoModelForCausalLM

    import qwen  # noqa: F401  (registers model_type "qwen")

    shipped = _scaled(REAL_CONFIGS[name])
    torch.manual_seed(0)
    source = QWenLMHeadModel(QWenConfig.from_dict({**shipped, "initializer_range": 0.3}))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(shipped))

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert isinstance(model, QWenLMHeadModel) and not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.auto_map == shipped["auto_map"]
    assert model.transformer.rotary_emb.base == shipped["rotary_emb_base"]
    assert model.transformer.ln_f.eps == shipped["layer_norm_epsilon"]
    reference_config = {
        "hidden_size": _shipped(shipped, "hidden_size", "n_embd"),
        "num_attention_heads": _shipped(shipped, "num_attention_heads", "n_head"),
        "num_hidden_layers": _shipped(shipped, "num_hidden_layers", "n_layer"),
        **{key: shipped[key] for key in ("kv_channels", "rotary_pct", "rotary_emb_base", "layer_norm_epsilon",
                                         "seq_length", "use_dynamic_ntk", "use_logn_attn")},
    }  # fmt: skip
    ids = random_ids(7)
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, reference_logits(reference_config, source.state_dict(), ids), rtol=1e-4, atol=1e-4)

    # Without dtype=: the config's precision flag, else fp32 on a machine without CUDA (as the original).
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    flagged = [dtype for flag, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)) if shipped.get(flag)]
    assert auto.dtype == (flagged[0] if flagged else machine_default_dtype())


# ------------------------------------------------------------------------------------------------------------
# chat() honours the real -Chat generation_config.json

# generation_config.json of Qwen-1_8B-Chat (CCKS2024/...qwen-1_8b-chat_model); the 7B/14B/72B-Chat files have
# the same keys and values (transformers_version aside).
REAL_CHAT_GENERATION_CONFIG = {
    "chat_format": "chatml", "do_sample": True, "eos_token_id": 151643, "max_new_tokens": 512,
    "max_window_size": 6144, "pad_token_id": 151643, "repetition_penalty": 1.1, "top_k": 0, "top_p": 0.8,
    "transformers_version": "4.37.2",
}  # fmt: skip


class _FirstScores:
    """Records the scores of the first step as the last processor sees them, then ends the reply."""

    def __init__(self, end_id):
        self.end_id, self.scores = end_id, None

    def __call__(self, input_ids, scores):
        if self.scores is None:
            self.scores = scores[0].clone()
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.end_id] = 0.0
        return forced


def test_chat_applies_the_real_generation_config():
    from transformers import GenerationConfig

    from qwen.tokenization_qwen import QWenTokenizer
    from qwen_generation_utils import make_context

    tokenizer = QWenTokenizer()
    torch.manual_seed(0)
    config = QWenConfig(vocab_size=151936, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        kv_channels=16, intermediate_size=64, seq_length=8192, initializer_range=0.5)  # fmt: skip
    model = QWenLMHeadModel(config).eval()
    model.generation_config = GenerationConfig.from_dict(REAL_CHAT_GENERATION_CONFIG)
    recorder = _FirstScores(tokenizer.im_end_id)
    built = []  # the processors generate() builds from the generation config
    build = model._get_logits_processor
    model._get_logits_processor = lambda *args, **kwargs: built.append(build(*args, **kwargs)) or built[-1]
    response, history = model.chat(tokenizer, "你好", history=None, logits_processor=[recorder])
    assert response == "" and history == [("你好", "")]
    kinds = {type(p).__name__: p for p in built[0]}
    assert kinds["TopPLogitsWarper"].top_p == 0.8 and "TopKLogitsWarper" not in kinds  # top_k 0: no cut
    assert "StopWordsLogitsProcessor" in kinds  # <|im_end|> / <|im_start|> end the reply

    _, prompt = make_context(tokenizer, "你好", history=[], system="You are a helpful assistant.",
                             max_window_size=6144, chat_format="chatml")  # fmt: skip
    with torch.no_grad():
        raw = model(torch.tensor([prompt])).logits[0, -1]
    seen = torch.zeros_like(raw, dtype=torch.bool)
    seen[torch.tensor(prompt)] = True
    penalized = torch.where(seen, torch.where(raw > 0, raw / 1.1, raw * 1.1), raw)  # repetition_penalty 1.1
    kept = torch.isfinite(recorder.scores)
    torch.testing.assert_close(recorder.scores[kept], penalized[kept])


# ------------------------------------------------------------------------------------------------------------
# Automatic precision (no bf16/fp16/fp32 flag in config.json), as the original chose it


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16), ((7, 0), torch.float16),
     ((6, 1), torch.float32)],
)  # fmt: skip
def test_automatic_precision_follows_the_gpu_as_the_original(monkeypatch, capability, expected):
    """Native bf16 (compute capability 8+) -> bf16; else fp16 from capability 7 (V100, T4); else fp32.
    torch's is_bf16_supported() now also says True for emulated bf16 (T4, V100), which the original never used."""
    from qwen.loading import resolve_dtype
    from qwen.modeling_qwen import _resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    emulated = capability[0] >= 6  # what torch reports with including_emulation=True on these GPUs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability[0] >= 8 or (including_emulation and emulated))  # fmt: skip
    config = QWenConfig(**TINY)
    assert _resolve_precision(config, device_map=None) == expected
    assert _resolve_precision(config, device_map="cpu") == torch.float32
    # the scripts' loader makes the same choice
    assert resolve_dtype("auto", "cuda") == expected and resolve_dtype(None, "cpu") == torch.float32


def test_chat_accepts_the_originals_append_history_flag():
    from qwen.tokenization_qwen import QWenTokenizer

    tokenizer = QWenTokenizer()
    torch.manual_seed(0)
    config = QWenConfig(vocab_size=151936, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        kv_channels=16, intermediate_size=64, seq_length=8192)  # fmt: skip
    model = QWenLMHeadModel(config).eval()
    model.generation_config.update(chat_format="chatml", max_window_size=6144, do_sample=False, max_new_tokens=4)
    history = [("a", "b")]
    end = [_FirstScores(tokenizer.im_end_id)]
    assert model.chat(tokenizer, "hi", history, append_history=False, logits_processor=end)[1] == history
    assert model.chat(tokenizer, "hi", history, logits_processor=end)[1] == [("a", "b"), ("hi", "")]
