"""The int8 KV cache (`use_cache_quantization: true` in config.json): keys and values stored as uint8, in pure torch.

The scheme is the original's (modeling_qwen.py 2023, quantize_cache_v / dequantize_cache_torch): asymmetric,
per token — for each cached position the min and max over all of that position's heads x head dims give

    scale = (max - min) / 255        zero = -min / scale        q = clamp(x / scale + zero, 0, 255)
    x ~= scale * (q - zero)

with one (scale, zero) pair per position, kept in fp32. The original's CUDA kernels only sped up the dequantize
matmul; the numbers are the same without them. Two deliberate differences: q is rounded to nearest (the
original's `.to(uint8)` truncated, a bias of half a step), and scale/zero are stored once per position rather
than repeated per head (same values, less memory).

Layout per layer: data [batch, heads, seq, head_dim] uint8; scale and zero [batch, 1, seq, 1] fp32. Every stored
tensor has batch in dim 0 and the sequence in dim 2, so the engine pads, merges and selects rows of it exactly
as it does with a DynamicLayer's keys and values (see `row_tensors`).
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

QMAX = 255  # uint8


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, H, T, D] -> (q uint8 [B, H, T, D], scale fp32 [B, 1, T, 1], zero fp32 [B, 1, T, 1])."""
    x = x.float()
    low = x.amin(dim=(1, 3), keepdim=True)  # over every head's dims of one position
    high = x.amax(dim=(1, 3), keepdim=True)
    # A constant position (high == low) would divide by zero: any positive scale reproduces it exactly.
    scale = ((high - low) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    zero = -low / scale
    q = (x / scale + zero).round_().clamp_(0, QMAX).to(torch.uint8)
    return q, scale, zero


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (scale * (q.float() - zero)).to(dtype)


class Int8KVLayer(CacheLayerMixin):
    """One layer of the int8 cache. update() stores the new positions quantized and returns the whole layer
    dequantized to the activations' dtype (the new positions too, as the original: attention always reads what
    the cache holds). `keys` / `values` stay None: nothing here is a plain float tensor to patch in place."""

    is_sliding = False
    is_croppable = True
    NAMES = ("key_q", "key_scale", "key_zero", "value_q", "value_scale", "value_zero")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dtype = None
        for name in self.NAMES:
            setattr(self, name, None)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = (*quantize_per_token(key_states), *quantize_per_token(value_states))
        if self.key_q is None:
            self.set_row_tensors(new)
        else:
            joined = zip(self.row_tensors(), new, strict=True)
            self.set_row_tensors([torch.cat([old, part], dim=2) for old, part in joined])
        keys = dequantize_per_token(self.key_q, self.key_scale, self.key_zero, key_states.dtype)
        values = dequantize_per_token(self.value_q, self.value_scale, self.value_zero, value_states.dtype)
        return keys, values

    # ---- what the engine and Cache's batch operations move around: all [batch, ..., seq, ...] ----

    def row_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.NAMES]

    def set_row_tensors(self, tensors) -> None:
        for name, tensor in zip(self.NAMES, tensors, strict=True):
            setattr(self, name, tensor)

    def _map(self, fn) -> None:
        if self.key_q is not None:
            self.set_row_tensors([fn(t) for t in self.row_tensors()])

    def get_seq_length(self) -> int:
        return 0 if self.key_q is None else self.key_q.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.row_tensors() if t is not None)

    def reset(self) -> None:
        self.set_row_tensors([None] * len(self.NAMES))
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop() takes a negative number of tokens to remove from the end.")
        if tokens_to_remove:
            self._map(lambda t: t[:, :, :tokens_to_remove])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.key_q is not None and self.key_q.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class Int8KVCache(Cache):
    """A transformers Cache of Int8KVLayer, one per attention layer, created as the model first writes to it."""

    def __init__(self, config=None, **kwargs):
        super().__init__(layer_class_to_replicate=Int8KVLayer)

    def nbytes(self) -> int:
        """Bytes the cache holds (quantized data + scales + zero points)."""
        return sum(layer.nbytes() for layer in self.layers)


def make_cache(config) -> Cache:
    """The cache a QWen model uses by default: Int8KVCache when config.use_cache_quantization, else DynamicCache."""
    if getattr(config, "use_cache_quantization", False):
        return Int8KVCache(config)
    return DynamicCache(config=config)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a DynamicCache or an Int8KVCache (what the cache itself stores, not the activations)."""
    if isinstance(cache, Int8KVCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def cache_kind(config) -> str:
    """How the KV cache is stored, in words (for the one-line summary scripts print)."""
    return "int8 (per-token scale/zero)" if getattr(config, "use_cache_quantization", False) else "full precision"


__all__ = ["Int8KVCache", "Int8KVLayer", "cache_kind", "cache_nbytes", "make_cache", "quantize_per_token"]
