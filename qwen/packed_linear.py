"""Linear layers whose weights are reordered once, at load time, into a layout for decoding on the CPU.

Decoding multiplies a few rows (1 to 16 tokens per step) by every weight matrix, so a step is bound by reading the
weights once; torch's CPU matmul on the plain [out, in] layout runs those small products far below what the memory
allows. Two layouts, chosen per layer:

- **blocked** (fp32, on x86 CPUs with AVX-512 or AVX2 and a C++ compiler with OpenMP): our kernel and torch op
  `qwen::blocked_linear` (`qwen/cpu_kernels.cpp`, built once per machine: qwen.cpu_kernels). The rows of W in
  tiles of 32, each tile stored k-major; a tile's 32 outputs for 8 input rows stay in registers while its weights
  stream by once (bench/linear_bench.py compares it with oneDNN's).
- **onednn** (bf16, or where the kernel cannot be built: no compiler, or a CPU without AVX-512 or AVX2 with FMA,
  where it was not measured faster): oneDNN's blocked layout, the one torch.compile's
  freezing pass gives CPU linear layers (the `mkldnn::_reorder_linear_weight` / `mkldnn::_linear_pointwise` ops).

Either way a row's result does not depend on the other rows of the batch.

Only for inference: a packed layer has no gradient and no state_dict entry for its weight. The scripts pack
after loading (`--weight-layout`, qwen.scripts); GPU models, quantized layers and training are left alone.

Under torch.compile (the engine's compiled decode step) inductor keeps each product as one opaque call while it
fuses everything around it: `qwen::blocked_linear` is a C++ op, called from the compiled graph with no Python in
between (~1 ms a step on the demo model, against a Python op); a oneDNN layer calls the Python op
`qwen::onednn_linear`, which takes a handle to the layer's weight (an int, as vLLM's oneDNN op takes its weight
handle), since fake tensors cannot trace an mkldnn tensor.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from .cpu_kernels import TILE, KernelBuildError, cpu_kernels

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)

# handle -> (packed weight, bias) of every live oneDNN PackedLinear, for its op (an entry goes with its layer)
_ONEDNN: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
_handles = itertools.count()


def to_blocked(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / TILE), K, TILE]: the rows in tiles of TILE, each tile k-major, zeros past N."""
    rows, columns = weight.shape
    tiles = -(-rows // TILE)
    if tiles * TILE != rows:
        weight = torch.cat([weight, weight.new_zeros(tiles * TILE - rows, columns)])
    return weight.view(tiles, TILE, columns).transpose(1, 2).contiguous()


def _onednn_product(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("qwen::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """x [..., in] @ W^T + b -> [..., out] with the oneDNN-packed weight registered under `handle`."""
    return _onednn_product(*_ONEDNN[handle], x)


@onednn_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in a packed layout (`layout`: "blocked" or "onednn"; an opaque tensor, not a
    parameter)."""

    def __init__(self, linear: nn.Linear, layout: str | None = None):
        """`layout`: "blocked", "onednn", or None: blocked for fp32 where the kernel builds, else onednn."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        if layout is None:
            layout = "blocked" if weight.dtype == torch.float32 and cpu_kernels() is not None else "onednn"
        if layout == "blocked" and cpu_kernels() is None:
            raise KernelBuildError("the blocked layout's kernel could not be built here (the warning above says why)")
        self.layout = layout
        if self.layout == "blocked":
            self.packed_weight = to_blocked(weight)
            torch._dynamo.mark_static(self.packed_weight)  # its sizes are constants, not symbols, in a dynamic graph
        else:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.handle = None
        if self.layout == "onednn":
            self.handle = next(_handles)
            _ONEDNN[self.handle] = (self.packed_weight, self.bias)
            weakref.finalize(self, _ONEDNN.pop, self.handle, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "blocked":
            return torch.ops.qwen.blocked_linear.default(x, self.packed_weight, self.bias, self.out_features)
        if torch.compiler.is_compiling():  # the Python op costs ~20 us more in eager: only where it is traced
            return onednn_linear(x, self.handle, self.out_features)
        return _onednn_product(self.packed_weight, self.bias, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.layout}")


def why_not_packable(model: nn.Module) -> str | None:
    """None when pack_linear_weights() applies to `model`, else why not (one phrase)."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu":
        return f"the model is on {parameter.device.type}"
    if parameter.dtype not in PACKABLE_DTYPES:
        return f"its weights are {str(parameter.dtype).removeprefix('torch.')}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if parameter.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bf16 support in oneDNN"
    return None


@torch.no_grad()
def pack_linear_weights(model: nn.Module) -> int:
    """Replace every plain nn.Linear of a CPU model with a PackedLinear (in place); returns how many.

    Subclasses of nn.Linear (quantized or adapter layers) are kept as they are. The plain weights are dropped,
    so the model holds one copy of each matrix, in the packed layout (a weight tied to the input embedding
    stays, as the embedding)."""
    if why_not_packable(model) is not None:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced


__all__ = ["PackedLinear", "pack_linear_weights", "to_blocked", "why_not_packable"]
