"""Linear layers whose weights are reordered once into oneDNN's blocked layout, for inference on the CPU.

Decoding multiplies a few rows (1 to 16 tokens per step) by every weight matrix. On the plain [out, in] layout
torch's CPU matmul runs those small products far below what the memory allows; oneDNN's blocked layout, prepared
once at load time, makes them 1.6x (1 row) to 2.6x (8 rows) faster on the demo model's shapes and also speeds up
prefill (`python -m bench.decode_bench` compares the two on whole models). This is the layout torch.compile's
"freezing" gives CPU linear layers (the `mkldnn::_reorder_linear_weight` / `mkldnn::_linear_pointwise` ops),
here without compiling anything. Each row's result does not depend on the other rows of the batch.

Only for inference: a packed layer has no gradient and no state_dict entry for its weight. The scripts pack
after loading (`--weight-layout`, qwen.scripts); GPU models, quantized layers and training are left alone.

Under torch.compile (the engine's compiled decode step) a packed layer calls the custom op `qwen::packed_linear`,
which inductor keeps as one opaque call while it fuses everything around it: the packed weight is an mkldnn
tensor that fake tensors cannot trace, so the op takes a handle to it (an int, as vLLM's oneDNN op takes its
weight handle) instead of the tensor.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)

# handle -> packed weight of every live PackedLinear, for the custom op (an entry goes with its layer)
_PACKED_WEIGHTS: dict[int, torch.Tensor] = {}
_handles = itertools.count()


@torch.library.custom_op("qwen::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """x [..., in] @ W^T -> [..., out] with the packed weight registered under `handle`."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED_WEIGHTS[handle], None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's layout (an opaque mkldnn tensor, not a parameter)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.handle = next(_handles)
        _PACKED_WEIGHTS[self.handle] = self.packed_weight
        weakref.finalize(self, _PACKED_WEIGHTS.pop, self.handle, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the op call costs ~20 us more in eager: only where it is traced
            y = packed_linear(x, self.handle, self.out_features)
            return y if self.bias is None else y + self.bias
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


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


__all__ = ["PackedLinear", "pack_linear_weights", "why_not_packable"]
