"""Linear layers whose weights are reordered once into oneDNN's blocked layout, for inference on the CPU.

Decoding multiplies a few rows (1 to 16 tokens per step) by every weight matrix. On the plain [out, in] layout
torch's CPU matmul runs those small products far below what the memory allows; oneDNN's blocked layout, prepared
once at load time, makes them 1.6x (1 row) to 2.6x (8 rows) faster on the demo model's shapes and also speeds up
prefill (`python -m bench.decode_bench` compares the two on whole models). This is the layout torch.compile's
"freezing" gives CPU linear layers (the `mkldnn::_reorder_linear_weight` / `mkldnn::_linear_pointwise` ops),
here without compiling anything. Each row's result does not depend on the other rows of the batch.

Only for inference: a packed layer has no gradient and no state_dict entry for its weight. The scripts pack
after loading (`--weight-layout`, qwen.scripts); GPU models, quantized layers and training are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's layout (an opaque mkldnn tensor, not a parameter)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
