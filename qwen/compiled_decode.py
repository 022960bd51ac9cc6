"""The engine's decode step compiled with inductor (CPU, packed weights): two graphs for every batch size and length.

A decode step of a small model is not only matrix math: per layer it runs an RMSNorm, the rotary embedding, the
cache write, attention and the residual adds as a dozen small ops, each a Python call and a pass over memory. On the
demo model that is ~14 of the step's ~45 ms (the packed linears are the other ~31; see bench/README.md). Compiled,
inductor fuses those ops into a few C++ loops and calls the packed linears as opaque ops (`qwen::blocked_linear`,
a C++ op, or `qwen::onednn_linear`): the step takes ~36 ms, what vLLM's compiled CPU runner takes for the same
model.

The compiled function is the model's own forward (`model(...)`, every architecture the engine serves), over a
cache that only writes each row's new token at its column of the engine's slot storage and reads the first
`width` columns back: the engine's SlotCache minus its planning, which stays on the host. Sizes are symbolic, so
one graph serves every batch size >= 2, every width and every storage capacity; batch size 1 gets a second graph
(torch specializes sizes of 1). Both are compiled before first use by `warm_up`, on a thread of their own, while
the engine serves with the eager step; a step the graphs do not cover (a guard fails: e.g. QWen's long-context
scaling past seq_length changes the math) is the engine's eager step.

Compiling the demo model's step takes 35-40 s on 2 cores (inductor's disk cache saves the C++ build on later starts,
not the tracing).
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from transformers.cache_utils import Cache

from .compat import cache_kwargs
from .packed_linear import PackedLinear
from .slot_cache import PlainStore, SlotCache, write_tokens

log = logging.getLogger("qwen.engine")  # the engine's few lines (qwen.scripts shows them)


# What each compiled step checks, cut to what can change while serving (~0.9 ms a step less at 1 row on the demo
# model: outside the products 2.5 -> 1.6 ms, bench/README.md).
STEP_OPTIONS = {
    # No guards on the model's modules (~5,000: hooks, attributes, parameters): a served model never changes.
    # Guards on the step's inputs, sizes and global state stay: they pick the batch-1 or batch >= 2 graph and send
    # a step they do not cover (e.g. past QWen's seq_length) to the eager step.
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    # No re-checks of the graph's own tensors' sizes, strides and alignment between its kernels (~490 a step)
    "size_asserts": False,
    "alignment_asserts": False,
    "scalar_asserts": False,
}


class ColumnWriteCache(Cache):
    """A decode step's cache, built inside the compiled graph: layer i's keys/values are `keys[i]`/`values[i]`
    [n, heads, capacity, head_dim] (n consecutive slots of the engine's); each row's one new token is written at
    its column (columns [n, 1]) and attention reads the first `width` columns."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], columns: torch.Tensor, width: int):
        super().__init__(layers=[])
        self.keys, self.values, self.columns, self.width = keys, values, columns, width

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        rows = torch.arange(key_states.shape[0], device=key_states.device)[:, None]  # [n, 1]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        write_tokens(keys, key_states, rows, self.columns)
        write_tokens(values, value_states, rows, self.columns)
        return keys[:, :, : self.width], values[:, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width - 1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.width, 0


def decode_logits(model, input_ids, position_ids, attention_mask, columns, keys, values) -> torch.Tensor:
    """One decode forward: input_ids/position_ids/columns [n, 1], attention_mask [n, 1, 1, width] -> logits [n, V]."""
    cache = ColumnWriteCache(keys, values, columns, attention_mask.shape[-1])
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **cache_kwargs(cache))
    return out.logits[:, -1]


def why_not_compilable(model, store) -> str | None:
    """None when the engine can compile `model`'s decode step, else why not (one phrase)."""
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        return "its linear weights are not packed (--weight-layout plain)"
    if any(hasattr(m, "qweight") for m in model.modules()):  # GPTQ layers (their lm_head alone is packed)
        return "its GPTQ layers run their own kernels"
    if not isinstance(store, PlainStore):
        return "the int8 KV cache is not supported"
    return None


class CompiledDecode:
    """The compiled decode step of one engine's model: `state` is "compiling", "compiled" or "failed"."""

    def __init__(self, model):
        self.model = model
        self.state = "compiling"
        self.compile_s: float | None = None
        self._fn = torch.compile(decode_logits, dynamic=True, options=STEP_OPTIONS)

    def warm_up(self, threads: int | None = None) -> threading.Thread:
        """Compile both graphs (batch 1 and batch >= 2) on a background thread, on a private 2-slot cache."""
        thread = threading.Thread(target=self._compile, args=(threads,), name="qwen-compile", daemon=True)
        thread.start()
        return thread

    def _compile(self, threads: int | None) -> None:
        start = time.perf_counter()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                cache = SlotCache(2)
                device = next(self.model.parameters()).device
                dtype = next(self.model.parameters()).dtype
                prompt = [[0, 1, 2, 3], [4, 5, 6, 7]]  # 4 tokens per row, so the width (5) differs from n (1, 2)
                plan = cache.plan([0, 1], [[0, 1, 2, 3]] * 2, device)
                self.model(input_ids=torch.tensor(prompt, device=device), position_ids=plan.columns.clone(),
                           attention_mask=cache.attention_mask(plan, [[0, 1, 2, 3]] * 2, dtype, device),
                           use_cache=True, **cache_kwargs(cache))
                for n in (2, 1):
                    plan = cache.plan(list(range(n)), [[4]] * n, device)
                    mask = cache.attention_mask(plan, [[4]] * n, dtype, device)
                    # positions apart from columns, as the engine passes them: dynamo guards on aliasing
                    self._fn(self.model, torch.zeros(n, 1, dtype=torch.long, device=device), plan.columns.clone(),
                             mask, plan.columns, *cache.storage_of(plan))
        except Exception as exc:  # the eager step serves on; say why once
            log.warning("the decode step could not be compiled (%s: %s); decoding eagerly", type(exc).__name__, exc)
            self.state = "failed"
            return
        self.compile_s = time.perf_counter() - start
        log.info("decode step compiled in %.0f s", self.compile_s)
        self.state = "compiled"

    def __call__(self, input_ids, position_ids, attention_mask, columns, keys, values) -> torch.Tensor | None:
        """The step's logits [n, V], or None where the compiled graphs do not cover it: the caller runs the step
        eagerly. It never compiles here: that would stall every request for a minute. (A guard fails before the
        graph runs, so nothing was written.)"""
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):  # a guard miss raises instead
                return self._fn(self.model, input_ids, position_ids, attention_mask, columns, keys, values)
        except torch._dynamo.exc.RecompileError:
            return None


__all__ = ["ColumnWriteCache", "CompiledDecode", "decode_logits", "why_not_compilable"]
