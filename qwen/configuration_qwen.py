"""QWenConfig: the configuration of the Qwen (v1) architecture, as stored in the hub's config.json.

Reads both the final 2023 hub configs and the Aug-2023 ones, whose keys used GPT-2/Megatron names
(n_embd, n_head, ...). Keys the model does not use (auto_map, onnx_safe, tokenizer_class, ...) are kept
as plain attributes, so a hub config.json loads unchanged and saves back without losing anything.
"""

from transformers import PretrainedConfig

# Aug-2023 config.json key -> final key. Values read under a legacy name win over the default of the
# final name (the Aug-2023 model sized its embedding from padded_vocab_size, not vocab_size).
LEGACY_CONFIG_KEYS = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_positions": "max_position_embeddings",
    "ffn_hidden_size": "intermediate_size",
    "padded_vocab_size": "vocab_size",
    "embd_pdrop": "emb_dropout_prob",
    "attn_pdrop": "attn_dropout_prob",
}

# config flag -> torch dtype name, in the order the original checked them.
PRECISION_FLAGS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the output field, as transformers names it now and did
    # Reading or writing a legacy name reads or writes the final attribute.
    attribute_map = LEGACY_CONFIG_KEYS

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128  # the head dimension
    intermediate_size: int = 22016  # twice the MLP width: w1/w2 map hidden -> intermediate_size // 2
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    seq_length: int | None = None  # training context: the threshold of dynamic NTK and logN scaling
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: str | bool = "auto"
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    use_cache_quantization: bool = False
    use_cache_kernel: bool = False
    softmax_in_fp32: bool = False
    no_bias: bool = True
    tie_word_embeddings: bool = False
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    scale_attn_weights: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)

    def check_seq_length(self) -> int:
        """seq_length is required to build a model: it decides when NTK / logN scaling start."""
        if self.seq_length is None:
            raise ValueError(
                "QWenConfig has no 'seq_length': it is the training context length, the threshold above "
                "which dynamic NTK and logN attention scaling act. Add it to config.json "
                '(e.g. "seq_length": 2048 for Qwen-14B, 8192 for Qwen-7B v1.1 and Qwen-1.8B, 32768 for Qwen-72B).'
            )
        return self.seq_length

    def precision_dtype_name(self) -> str | None:
        """The dtype the bf16/fp16/fp32 flags ask for, or None when no flag is set (auto)."""
        chosen = [name for flag, name in PRECISION_FLAGS.items() if getattr(self, flag, False)]
        if len(chosen) > 1:
            raise ValueError(
                f"QWenConfig sets more than one of bf16/fp16/fp32 ({chosen}); set at most one of them to true."
            )
        return chosen[0] if chosen else None


__all__ = ["QWenConfig", "LEGACY_CONFIG_KEYS"]
