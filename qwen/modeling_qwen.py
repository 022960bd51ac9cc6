"""The Qwen (v1) architecture for transformers: QWenModel and QWenLMHeadModel (chat API: qwen.chat_api).

Parameter names are those of the 2023 checkpoints (transformer.h.N.attn.c_attn, mlp.w1/w2/c_proj, ...), so
hub state dicts load as they are. The math follows the original: RMSNorm and rotate-half RoPE in fp32, a
gated MLP c_proj(w1(x) * silu(w2(x))), dynamic NTK-aware RoPE and logN query scaling above seq_length.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LogitsProcessorList,
    PretrainedConfig,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from qwen_generation_utils import (
    StopWordsLogitsProcessor,
)

from . import quantize
from .chat_api import QWenChatMixin
from .compat import CACHE_ARG, LEGACY_CACHE_ARG, accepts_legacy_cache_name, cache_kwargs, output_cache
from .configuration_qwen import QWenConfig
from .kv_cache import Int8KVCache, make_cache

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100  # labels the loss skips (torch's cross_entropy and transformers' ForCausalLMLoss default)

# ----------------------------------------------------------------------------------------------------------------
# Long-context formulas of the original (modeling_qwen.py, 2023): dynamic NTK-aware RoPE and logN attention.


def dynamic_ntk_alpha(key_length: int, seq_length: int) -> int:
    """NTK alpha for a sequence of `key_length` tokens: 1 up to seq_length, then 3, 7, 15, ... per doubling."""
    # log2 rather than the original's math.log(x, 2): identical for practical lengths, exact at powers of two.
    context_value = math.log2(key_length / seq_length) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def ntk_scaled_base(base: float, ntk_alpha: float, rotary_dim: int) -> float:
    return base * ntk_alpha ** (rotary_dim / (rotary_dim - 2))


def logn_query_scale(position_ids: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Per-query factor log(p + 1) / log(seq_length), at least 1 (so 1 up to seq_length), in float64 as the original."""
    return (torch.log(position_ids.double() + 1) / math.log(seq_length)).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class QWenRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale (the original's order of operations).
        normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.eps)
        return normed.type_as(hidden_states) * self.weight

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class QWenRotaryEmbedding(nn.Module):
    """cos/sin of rotate-half RoPE over the first `rotary_dim` dims of each head, in fp32.

    At NTK alpha 1 the values come from a table indexed by position (grown on demand); rows that need another
    alpha get theirs computed on the fly with the same fp32 arithmetic, so both give identical numbers.
    """

    def __init__(self, config: QWenConfig):
        super().__init__()
        self.dim = config.rotary_dim
        self.base = float(config.rotary_emb_base)
        self.inv_freq = nn.Buffer(self.compute_inv_freq(1.0), persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def compute_inv_freq(self, ntk_alpha: float, device=None) -> torch.Tensor:
        base = ntk_scaled_base(self.base, ntk_alpha, self.dim)
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def _cos_sin(self, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def table(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None or self._table[0].shape[0] < length or self._table[0].device != device:
            size = max(2 * length, 4096)
            inv_freq = self.compute_inv_freq(1.0, device=device)
            self._table = self._cos_sin(torch.outer(torch.arange(size, device=device).float(), inv_freq))
        return self._table

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, max_position: int, ntk_alphas: list[float] | None = None):
        """position_ids [B, T] -> cos, sin [B, T, rotary_dim]; ntk_alphas: one alpha per row, or None for all 1."""
        if ntk_alphas is None:
            cos, sin = self.table(max_position + 1, position_ids.device)
            return cos[position_ids], sin[position_ids]
        inv_freq = torch.stack([self.compute_inv_freq(a, device=position_ids.device) for a in ntk_alphas])
        return self._cos_sin(position_ids.float()[..., None] * inv_freq[:, None, :])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated over its first cos.shape[-1] dims; cos/sin [B, T, R] fp32. Computed in fp32."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    x_rot = x[..., :rotary_dim].float()
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    if rotary_dim < x.shape[-1]:
        x_rot = torch.cat((x_rot, x[..., rotary_dim:].float()), dim=-1)
    return x_rot.type_as(x)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # The original's softmax runs in the activation dtype unless config.softmax_in_fp32.
    softmax_dtype = torch.float32 if module.softmax_in_fp32 else attn_weights.dtype
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=softmax_dtype).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_key_value_groups = 1
        self.is_causal = True
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.softmax_in_fp32 = config.softmax_in_fp32
        self.attention_dropout = config.attn_dropout_prob
        projection_size = self.num_heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection_size)  # the only projection with a bias
        self.c_proj = nn.Linear(projection_size, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        query_scale: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        # c_attn's output is [q | k | v], each num_heads * head_dim wide.
        qkv = self.c_attn(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim).transpose(1, 3)
        cos, sin = position_embeddings
        query_key = apply_rotary_pos_emb(qkv[:, :, :2].flatten(1, 2), cos, sin).unflatten(1, (self.num_heads, 2))
        query, key, value = query_key[:, :, 0], query_key[:, :, 1], qkv[:, :, 2]
        if query_scale is not None:  # logN scaling, [B, 1, T, 1]
            query = query * query_scale.type_as(query)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if (length == 1 and query.device.type == "cpu" and torch.compiler.is_compiling()
                and self.config._attn_implementation == "sdpa"):
            # one query per row, compiled on the CPU (the engine's decode step without qwen.cpu_kernels' attention):
            # inductor fuses the mask and the softmax between two matmuls, faster than SDPA's flash kernel, which is
            # built for many query rows
            attention_interface = eager_attention_forward
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.c_proj(attn_output.reshape(batch, length, -1))
        return attn_output, attn_weights


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(hidden_states) * F.silu(self.w2(hidden_states)))  # w2 is the gate


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        query_scale: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(
            self.ln_1(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            query_scale=query_scale,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


# ----------------------------------------------------------------------------------------------------------------
# Models


def native_cuda_dtype() -> torch.dtype:
    """The original's automatic GPU precision: bf16 where it is native, fp16 from compute capability 7, else fp32."""
    # Native bf16 only: torch now also reports emulated bf16 (T4 / V100) as supported.
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    if torch.cuda.get_device_capability()[0] >= 7:
        return torch.float16
    return torch.float32


def auto_dtype(flagged: str | None, on_gpu: bool, gptq: bool = False) -> torch.dtype:
    """The one automatic precision (from_pretrained without dtype=, and qwen.loading's "auto"), as the original:
    config.json's bf16/fp16/fp32 flag (`flagged`: its torch dtype name), else the GPU's native half precision,
    else fp32; always fp32 for GPTQ weights on the CPU, whose kernel is exact in fp32 only."""
    if gptq and not on_gpu:
        return torch.float32
    if flagged is not None:
        return getattr(torch, flagged)
    return native_cuda_dtype() if on_gpu else torch.float32


def _on_gpu(device_map) -> bool:
    """from_pretrained's target: a GPU unless there is none or device_map keeps everything on the CPU (or disk)."""
    on_cpu = device_map in ("cpu", torch.device("cpu")) or (
        isinstance(device_map, dict) and set(map(str, device_map.values())) <= {"cpu", "disk"}
    )
    return torch.cuda.is_available() and not on_cpu


def _resolve_precision(config: QWenConfig, device_map) -> torch.dtype:
    """auto_dtype for from_pretrained."""
    gptq = quantize.gptq_quantization(config.to_dict()) is not None
    return auto_dtype(config.precision_dtype_name(), _on_gpu(device_map), gptq)


def _flash_attn_usable(config: QWenConfig) -> bool:
    if config.use_flash_attn is False or not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


# from_pretrained keyword arguments that also locate config.json
_CONFIG_LOOKUP_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": QWenBlock, "attentions": QWenAttention}

    def __init__(self, config: QWenConfig, *inputs, **kwargs):
        config.check_seq_length()
        super().__init__(config, *inputs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, QWenRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(1.0, device=module.inv_freq.device))
        # GPT-2 scheme, as the original: residual output projections get std / sqrt(2 * layers).
        if isinstance(module, (QWenAttention, QWenMLP)):
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.c_proj.weight, mean=0.0, std=std)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As PreTrainedModel.from_pretrained; without dtype= the precision follows the original (see README), and
        a GPTQ checkpoint gets the scripts' kernel (qwen.quantize) unless quantization_config= names one."""
        dtype = kwargs.pop("dtype", None)
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            lookup = {k: kwargs[k] for k in _CONFIG_LOOKUP_KWARGS if k in kwargs}
            config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path, **lookup)
        if dtype in (None, "auto"):
            dtype = _resolve_precision(config, kwargs.get("device_map"))
        half = dtype in (torch.bfloat16, torch.float16, "bfloat16", "float16")
        if "attn_implementation" not in kwargs and half and _flash_attn_usable(config):
            kwargs["attn_implementation"] = "flash_attention_2"
        kernel = quantize.default_kernel_kwargs(config.to_dict(), _on_gpu(kwargs.get("device_map")), kwargs)
        with quantize.kernel_choice_quietly(bool(kernel)):
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, dtype=dtype, **kernel, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) on output_loading_info
        if quantize.model_gptq(model) is not None:
            quantize.run_kernels_eagerly(model)  # as qwen.loading: no per-Linear recompiles (and dynamo's warning)
        return loaded


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_emb = QWenRotaryEmbedding(config)
        self.h = nn.ModuleList([QWenBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def _rerotate_cache(self, cache: Cache, position_ids: torch.Tensor, old: list[float], new: list[float]):
        """Bring cached keys of rows whose NTK alpha changed from RoPE(old alpha) to RoPE(new alpha).

        Rotations in the same planes compose, so rotating by position * (inv_freq_new - inv_freq_old) is exact up
        to rounding. Row b's cached keys hold positions position_ids[b, 0] - past .. position_ids[b, 0] - 1
        (left padding sits at negative positions and is masked anyway).
        """
        past = cache.get_seq_length()
        device = position_ids.device
        for row, (alpha_old, alpha_new) in enumerate(zip(old, new, strict=True)):
            if alpha_old == alpha_new:
                continue
            delta = self.rotary_emb.compute_inv_freq(alpha_new, device) - self.rotary_emb.compute_inv_freq(
                alpha_old, device
            )
            positions = torch.arange(past, device=device) - past + position_ids[row, 0]
            cos, sin = self.rotary_emb._cos_sin(positions.float()[:, None] * delta)
            for layer in cache.layers:
                if not isinstance(getattr(layer, "keys", None), torch.Tensor):
                    raise NotImplementedError(f"dynamic NTK needs plain cached keys; {type(layer).__name__} has none")
                keys = layer.keys[row : row + 1, :, :past]
                keys.copy_(apply_rotary_pos_emb(keys, cos[None], sin[None]))

    @accepts_legacy_cache_name
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = make_cache(self.config)  # int8 when config.use_cache_quantization
        past_length = cache.get_seq_length() if cache is not None else 0

        positions_given = position_ids is not None
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                # Left-padded rows count positions from their first real token.
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
                position_ids = position_ids[:, -length:]
            else:
                position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)[None]
        position_ids = position_ids.to(inputs_embeds.device).expand(batch, -1)

        if isinstance(attention_mask, dict):  # already prepared by generate()
            causal_mask = attention_mask["full_attention"]
        else:  # None for sdpa whenever is_causal (or nothing) does the job: plain prefill, unpadded decode
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                # An empty DynamicCache masks as no cache at all; passing it would switch off transformers'
                # packed-sequence masking (samples packed in one row, told apart by restarting position_ids).
                **cache_kwargs(None if isinstance(cache, DynamicCache) and past_length == 0 else cache),
            )

        # Long context (inference only, as the original): per-row NTK alpha and logN query scaling.
        seq_length = self.config.seq_length
        if cache is not None or not positions_given:
            # positions count tokens, so none reaches past the cache plus the new tokens: a bound known on the host,
            # where reading position_ids would wait for the device at every step
            max_position = past_length + length - 1
        else:  # a caller's own positions and no cache: read them
            max_position = int(position_ids.max())
        ntk_alphas, query_scale = None, None
        if not self.training and max_position + 1 > seq_length:
            if self.config.use_dynamic_ntk:
                lengths = (position_ids.max(dim=-1).values + 1).tolist()
                ntk_alphas = [dynamic_ntk_alpha(n, seq_length) for n in lengths]
                if past_length > 0:  # cached keys carry the alpha of the length they were computed at
                    past_lengths = position_ids[:, 0].tolist()
                    old = [dynamic_ntk_alpha(max(n, 1), seq_length) for n in past_lengths]
                    self._rerotate_cache(cache, position_ids, old, ntk_alphas)
                if all(alpha == 1 for alpha in ntk_alphas):
                    ntk_alphas = None
            if self.config.use_logn_attn:
                query_scale = logn_query_scale(position_ids, seq_length)[:, None, :, None]
        position_embeddings = self.rotary_emb(position_ids, max_position, ntk_alphas)

        hidden_states = self.drop(inputs_embeds)
        for block in self.h:
            hidden_states = block(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                query_scale=query_scale,
                **kwargs,
            )
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **cache_kwargs(cache if use_cache else None))


class QWenLMHeadModel(QWenChatMixin, QWenPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        # transformers derives the loss from the class name, and "QWenLMHeadModel" matches none: declared, the
        # Trainer counts shifted labels (labels[..., 1:]) for num_items_in_batch, as the loss itself does.
        self.loss_type = "ForCausalLM"
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    @accepts_legacy_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`skip_logits=True` with `labels` (finetune.py's training steps): only the loss is computed, the output
        layer runs only at the positions a label supervises, and `logits` is None (as with Liger's fused loss)."""
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, H)
        loss = logits = None
        if labels is not None and skip_logits:
            # The 151,936-wide output layer is most of a small model's step: prompts, padding and packed
            # separators carry no label, so their logits are never materialized. Same loss, same gradients.
            shift_labels = kwargs.pop("shift_labels", None)
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (B, T)
            supervised = shift_labels != IGNORE_INDEX  # (B, T)
            loss = self.loss_function(
                logits=self.lm_head(hidden_states[supervised]), labels=None, shift_labels=shift_labels[supervised],
                vocab_size=self.config.vocab_size, **kwargs,
            )  # fmt: skip
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Dynamic NTK during generation: a cache computed under another alpha is recomputed, not patched

    def needs_cache_recompute(self, cached_length: int, total_length: int) -> bool:
        """Whether a row whose cache holds `cached_length` tokens must be recomputed to go on at `total_length`.

        Under dynamic NTK every position is rotated with the alpha of the whole length; once the alpha changes,
        the cached keys AND everything deeper layers computed from them are stale. Re-rotating keys in place is
        exact for the first layer only, so callers that still have the token ids (generate(), the engine)
        feed the whole sequence again, at most once per doubling of the length.
        """
        if not self.config.use_dynamic_ntk or self.training or cached_length == 0:
            return False
        seq_length = self.config.seq_length
        return dynamic_ntk_alpha(cached_length, seq_length) != dynamic_ntk_alpha(total_length, seq_length)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, attention_mask=None, **kwargs):
        cache = kwargs.get(CACHE_ARG)  # generate() passes the cache under its release's name
        cached = cache.get_seq_length() if cache is not None else 0
        if cached and next_sequence_length is not None:
            totals = attention_mask.sum(-1).tolist() if attention_mask is not None else [input_ids.shape[1]]
            new = input_ids.shape[1] - cached
            if any(self.needs_cache_recompute(total - new, total) for total in totals):
                cache.crop(-cached)
                next_sequence_length = None  # the whole sequence, under the new alpha
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, attention_mask=attention_mask, **kwargs
        )

    # ------------------------------------------------------------------------------------------------------------
    # Generation with stop words (chat() and chat_stream() come from QWenChatMixin)

    def generate(self, inputs=None, generation_config=None, logits_processor=None, stop_words_ids=None, **kwargs):
        """GenerationMixin.generate, plus the original's `stop_words_ids` (lists of token ids ending generation)."""
        config = generation_config if generation_config is not None else self.generation_config
        if self.config.use_cache_quantization and kwargs.get("use_cache", True):
            # generate() would make a DynamicCache; hand it the int8 one instead (unless the caller passed a cache)
            if kwargs.get(CACHE_ARG) is None and kwargs.get(LEGACY_CACHE_ARG) is None:
                kwargs[CACHE_ARG] = Int8KVCache(self.config)
        if stop_words_ids is None:
            stop_words_ids = getattr(config, "stop_words_ids", None)
        if stop_words_ids:
            eos_token_id = kwargs.get("eos_token_id", config.eos_token_id)
            if isinstance(eos_token_id, list):
                eos_token_id = eos_token_id[0]
            logits_processor = LogitsProcessorList(logits_processor or [])
            logits_processor.append(StopWordsLogitsProcessor(stop_words_ids=stop_words_ids, eos_token_id=eos_token_id))
        return super().generate(inputs, generation_config=generation_config, logits_processor=logits_processor, **kwargs)


__all__ = [
    "QWenPreTrainedModel",
    "QWenModel",
    "QWenLMHeadModel",
    "dynamic_ntk_alpha",
    "logn_query_scale",
]
