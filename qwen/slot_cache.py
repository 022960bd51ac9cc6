"""The serving KV cache: one preallocated row ("slot") per request, written in place.

The engine gives each running request a slot. Every forward writes only the new tokens' keys and values into
their own columns of their own slot (`index_put_`), and attention reads views of the slots. Nothing is
concatenated per token, and nothing moves when a request joins or leaves: a new request takes a free slot, a
finished one leaves its slot to be overwritten. The storage grows (doubling) in slots and in columns as the
batch and the longest row need, and is dropped when the engine goes idle.

    cache = SlotCache(max_slots=8)
    cache.plan(rows, columns)      # before each forward: which slots take part, where each new token goes
    model(..., cache=cache, attention_mask=cache.attention_mask(...), position_ids=...)

Layout of one forward over `rows` (n slots) with T new tokens each: columns [n, T] says where each new token is
written; the keys attended to are the first `width` columns of those slots (a view when rows is a range of
slots, a gather otherwise). Columns a row has not written hold zeros or stale finite values and are masked.

How a layer's tensors are stored is a `KVStore`: PlainStore keeps keys and values as they are; a quantized store
(the int8 cache of `use_cache_quantization`) keeps uint8 data plus per-token scale / zero tensors. The cache only
needs every stored tensor to have the slot in dim 0 and the token in dim 2; it writes, grows and views them
without knowing what they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PlainStore:
    """Keys and values kept as computed: tensors [slots, heads, columns, head_dim] in the activations' dtype."""

    def allocate(self, key: torch.Tensor, value: torch.Tensor, slots: int, columns: int) -> list[torch.Tensor]:
        """Zeroed storage for `slots` x `columns` tokens shaped like key/value [n, heads, T, head_dim]."""
        return [x.new_zeros(slots, x.shape[1], columns, x.shape[3]) for x in (key, value)]

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> list[torch.Tensor]:
        """New tokens [n, heads, T, head_dim] -> what is written, one tensor per stored tensor, token in dim 2."""
        return [key, value]

    def decode(self, stored: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the stored tensors [n, ., width, .] -> (keys, values) [n, heads, width, head_dim] for attention."""
        return stored[0], stored[1]


class Int8Store:
    """The int8 KV cache (`use_cache_quantization`): per layer, for keys and for values, uint8 data [slots, heads,
    columns, head_dim] plus per-token fp32 scale and zero [slots, 1, columns, 1] (qwen.kv_cache's scheme; its
    quantize/dequantize are the one implementation). Attention reads the planned rows dequantized."""

    def allocate(self, key: torch.Tensor, value: torch.Tensor, slots: int, columns: int) -> list[torch.Tensor]:
        stored = []
        for x in (key, value):
            data = torch.zeros(slots, x.shape[1], columns, x.shape[3], dtype=torch.uint8, device=x.device)
            scale_or_zero = torch.zeros(slots, 1, columns, 1, dtype=torch.float32, device=x.device)
            stored += [data, scale_or_zero, scale_or_zero.clone()]  # zeros dequantize to zeros: finite
        return stored

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> list[torch.Tensor]:
        from .kv_cache import quantize_per_token

        return [*quantize_per_token(key), *quantize_per_token(value)]

    def decode(self, stored: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        from .kv_cache import dequantize_per_token

        return dequantize_per_token(*stored[:3], dtype), dequantize_per_token(*stored[3:], dtype)


def store_for(config) -> PlainStore | Int8Store:
    """How a model's cache is stored: int8 when its config says use_cache_quantization, else as computed."""
    return Int8Store() if getattr(config, "use_cache_quantization", False) else PlainStore()


def write_tokens(stored: torch.Tensor, new: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> None:
    """stored[rows[i], :, columns[i, j]] = new[i, :, j]: new tokens [n, ., T, .] into their slots' columns."""
    # advanced indices on dims 0 and 2 put those dims first: the target is [n, T, heads, dim]
    stored[rows, :, columns] = new.transpose(1, 2)


class SlotLayer(CacheLayerMixin):
    """One attention layer's slots. `update` writes the new tokens where the cache's plan says and returns the
    keys/values of the planned rows, `width` columns wide."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: SlotCache):
        super().__init__()
        self.cache = cache
        self.tensors: list[torch.Tensor] | None = None
        self.keys = self.values = None  # nothing here is a plain [batch, heads, seq, dim] tensor to patch

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def holds(self, slots: int, columns: int) -> bool:
        """Whether the storage has at least `slots` x `columns`."""
        return self.tensors is not None and self.tensors[0].shape[0] >= slots and self.tensors[0].shape[2] >= columns

    def _fit(self, key: torch.Tensor, value: torch.Tensor, slots: int, columns: int) -> None:
        """Grow the storage (copying what is there) to at least `slots` x `columns`."""
        if self.holds(slots, columns):
            return
        new = self.cache.store.allocate(key, value, slots, columns)
        if self.tensors is not None:
            for old, grown in zip(self.tensors, new, strict=True):
                grown[: old.shape[0], :, : old.shape[2]] = old
        self.tensors = new

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.cache.current_plan()
        self._fit(key_states, value_states, *self.cache.capacity)
        for source, target, width in plan.copies:  # a running row's prefix into a new row, before anything is written
            for stored in self.tensors:
                stored[target, :, :width] = stored[source, :, :width]
        rows, columns = plan.row_index, plan.columns  # [n, 1], [n, T]
        for stored, new in zip(self.tensors, self.cache.store.encode(key_states, value_states), strict=True):
            write_tokens(stored, new, rows, columns)
        if plan.row_slice is not None:
            views = [t[plan.row_slice, :, : plan.width] for t in self.tensors]
        else:
            views = [t[plan.row_index[:, 0], :, : plan.width] for t in self.tensors]
        return self.cache.store.decode(views, key_states.dtype)

    def get_seq_length(self) -> int:
        plan = self.cache.plan_or_none
        return 0 if plan is None else plan.past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        plan = self.cache.plan_or_none
        return (query_length, 0) if plan is None else (plan.width, 0)

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return 0 if self.tensors is None else sum(t.numel() * t.element_size() for t in self.tensors)


SPARE = -1  # a column that keeps nothing: the storage's last one, never inside a forward's width (see plan)


class _Plan:
    """Where one forward writes and what it reads: computed once on the host from Python ints (no device sync).
    A row whose columns are all SPARE is a placeholder (a free slot inside the batch's range): its writes land in
    the spare column, and it sees nothing."""

    def __init__(self, rows: list[int], columns: list[list[int]], device, copies=()):
        self.rows = rows
        self.copies = list(copies)  # (from slot, to slot, columns) copied before the forward writes
        self.n, self.tokens = len(rows), len(columns[0])
        first, last = rows[0], rows[-1]
        self.row_slice = slice(first, last + 1) if rows == list(range(first, last + 1)) else None
        self.row_index = torch.tensor(rows, device=device)[:, None]
        self.columns = torch.tensor(columns, device=device)
        self.width = max(max(c) for c in columns) + 1  # SPARE (-1) never counts
        self.past = self.width - self.tokens


def trim_heap() -> None:
    """Hands the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing). After the idle
    release, the demo model's server went 1,318 → 1,012 MB RSS with it (the freed cache leaves fragments)."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


class SlotCache(Cache):
    """A transformers Cache of SlotLayer, one per attention layer (created as the model first writes to it)."""

    GROWTH_COLUMNS = 256  # columns are allocated in multiples of this

    def __init__(self, max_slots: int, store=None, max_columns: int | None = None):
        super().__init__(layers=[])
        self.max_slots, self.max_columns = max_slots, max_columns
        self.store = store or PlainStore()
        self.capacity = (0, 0)  # (slots, columns) every layer holds after its next write
        self.plan_or_none: _Plan | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(SlotLayer(self))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.plan_or_none is None else self.plan_or_none.past

    def plan(self, rows: list[int], columns: list[list[int]], device, copies=()) -> _Plan:
        """Set up the next forward: slot rows[i]'s j-th new token is written to column columns[i][j]; each layer
        first copies the first `n` columns of slot `a` into slot `b` for each (a, b, n) of `copies`."""
        if not rows or len(set(rows)) != len(rows) or max(rows) >= self.max_slots or min(rows) < 0:
            raise ValueError(f"rows must be distinct slots in [0, {self.max_slots}), got {rows}")
        plan = _Plan(rows, columns, device, copies)
        slots, width = self.capacity
        highest = max(rows + [target for _, target, _ in plan.copies])
        if highest >= slots:  # each dimension doubles only when it is too small
            slots = min(self.max_slots, max(2 * slots, highest + 1))
        if plan.width + 1 > width:  # + the spare column, always past the width
            width = -(-max(2 * width, plan.width + 1) // self.GROWTH_COLUMNS) * self.GROWTH_COLUMNS
            if self.max_columns is not None:
                width = max(min(width, self.max_columns + 1), plan.width + 1)
        self.capacity = (slots, width)
        self.plan_or_none = plan
        return plan

    def current_plan(self) -> _Plan:
        if self.plan_or_none is None:
            raise RuntimeError("SlotCache.plan() must be called before each forward")
        return self.plan_or_none

    def storage_of(self, plan: _Plan) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Per layer, the keys and values of the plan's slots at full capacity (views), for a forward over
        consecutive rows that writes its tokens itself (the compiled decode step); None if the storage must grow
        first, if the rows are not consecutive or if it is not stored plain."""
        slots, columns = self.capacity
        if not self.layers or plan.row_slice is None or not isinstance(self.store, PlainStore):
            return None
        if plan.copies:  # the layers' update makes them
            return None
        if not all(layer.holds(slots, columns) for layer in self.layers):
            return None
        rows = plan.row_slice
        return [layer.tensors[0][rows] for layer in self.layers], [layer.tensors[1][rows] for layer in self.layers]

    def attention_mask(self, plan: _Plan, visible_to: list[list[int]], dtype: torch.dtype, device) -> torch.Tensor:
        """Additive mask [n, 1, T, width]: query j of row i sees columns 0 .. visible_to[i][j] (inclusive)."""
        last = torch.tensor(visible_to, device=device)[:, None, :, None]
        columns = torch.arange(plan.width, device=device)
        blocked = columns > last
        return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill_(blocked, torch.finfo(dtype).min)

    def release(self) -> None:
        """Drop the storage (the engine is idle); the next forward allocates afresh."""
        self.layers = []
        self.capacity = (0, 0)
        self.plan_or_none = None
        trim_heap()

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


__all__ = ["SPARE", "Int8Store", "PlainStore", "SlotCache", "SlotLayer", "store_for", "write_tokens"]
