"""Our C++ kernels for the CPU decode step (`qwen/cpu_kernels.cpp`), built once per machine against this torch into
~/.cache/qwen/kernels, and the torch ops they serve:

- `qwen::blocked_linear`: y = x W^T + b over a weight in the blocked layout (qwen.packed_linear);
- `qwen::decode_attention`: attention of one query per row over the keys and values of a cache, split over the keys
  (`cpu_decode_attention` below is its face in transformers' attention interface).

Both are fp32, for x86 CPUs with AVX-512, or AVX2 with FMA, and need a C++ compiler with OpenMP; where they cannot
be built, layers take oneDNN's layout and attention runs in torch (said once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

KERNEL_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
TILE = 32  # weight rows per tile of the blocked layout: cpu_kernels.cpp's TILE (checked when it loads)
KERNEL_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-std=c++20", "-shared", "-fPIC")

log = logging.getLogger(__name__)


class KernelBuildError(RuntimeError):
    """The kernels could not be built or loaded here (the message says why)."""


def _cpu_flags() -> bytes:
    """What -march=native depends on, for the build's cache key (a shared home may serve several CPUs)."""
    try:
        with open("/proc/cpuinfo", "rb") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        import platform

        return platform.processor().encode()


def _kernel_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(base) / "qwen" / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:  # a read-only home (a container): the build is per process then
        return Path(tempfile.mkdtemp(prefix="qwen-kernels-"))


def _torch_flags() -> list[str]:
    """What building against this torch takes: its headers, its C++ ABI, its libraries."""
    root = Path(torch.__file__).parent
    return [f"-I{root / 'include'}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}", "-ltorch_cpu", "-lc10"]


def load_cpu_kernels(compiler: str | None = None) -> ctypes.CDLL:
    """The kernels' library (its C function `blocked_linear`, and `qwen_kernels_register` to serve the ops), built
    with `compiler` (default: $CXX, else c++) unless a build for this source, torch, compiler and CPU is cached;
    raises KernelBuildError."""
    compiler = compiler or os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler '{compiler}' (set CXX)")
    source = KERNEL_SOURCE.read_bytes()
    flags = [*KERNEL_FLAGS, *_torch_flags()]
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), torch.__version__.encode(), *map(str.encode, flags),
                                      _cpu_flags()]))
    library = _kernel_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not library.exists():
        partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")  # renamed when whole: builds may race
        try:
            done = subprocess.run([compiler, str(KERNEL_SOURCE), *flags, "-o", str(partial)],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            partial.unlink(missing_ok=True)
            raise KernelBuildError(f"{compiler} failed: {exc}") from None
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
            said = next((line for line in lines if "error" in line), lines[-1])  # the first error, not its notes
            raise KernelBuildError(f"{compiler} failed: {said.strip()}")
        os.replace(partial, library)
    try:
        kernel = ctypes.CDLL(str(library))
        tile = kernel.blocked_linear_tile()
    except (OSError, AttributeError) as exc:
        raise KernelBuildError(f"{library} does not load: {exc}") from None
    if tile != TILE:
        raise KernelBuildError(f"{library} has tiles of {tile} rows, not {TILE}")
    kernel.blocked_linear.restype = None
    kernel.blocked_linear.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p]
    return kernel


@functools.cache
def cpu_kernels() -> ctypes.CDLL | None:
    """The library serving our ops in this process (built on first use), or None where it cannot be built: said
    once, and layers take oneDNN's layout, attention torch's."""
    try:
        kernels = load_cpu_kernels()
    except KernelBuildError as exc:
        log.warning("the CPU kernels are not available (%s); linear layers are packed for oneDNN instead, and "
                    "decode steps attend with sdpa", exc)
        return None
    kernels.qwen_kernels_register()
    return kernels


torch.library.define("qwen::blocked_linear", "(Tensor x, Tensor weight, Tensor? bias, int out_features) -> Tensor")


@torch.library.register_fake("qwen::blocked_linear")
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


torch.library.define("qwen::decode_attention", "(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor")


@torch.library.register_fake("qwen::decode_attention")
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float):
    return query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])


DECODE_ATTENTION = "qwen_cpu_decode"  # its name in transformers' attention interface


def _takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether qwen::decode_attention computes this attention (else sdpa does): every shape, dtype and stride its
    checks accept (cpu_kernels.cpp), and no gradient asked for (the op has no backward)."""
    n, heads, length, dim = query.shape
    return (length == 1 and n > 0 and query.device.type == "cpu" and key.shape == value.shape
            and query.dtype == key.dtype == value.dtype == torch.float32 and key.shape[0] == n
            and key.shape[-1] == dim and dim % 16 == 0 and dim <= 256 and key.shape[1] > 0 and heads % key.shape[1] == 0
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and (mask is None or (mask.ndim == 4 and mask.shape[0] in (1, n) and mask.shape[1] == mask.shape[2] == 1
                                  and mask.shape[3] >= key.shape[2] and mask.dtype in (torch.float32, torch.bool)))
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)))  # fmt: skip


def cpu_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface under DECODE_ATTENTION: one query a row in fp32 on the CPU (a decode step)
    -> qwen::decode_attention; anything else (a prefill, another dtype or device) -> sdpa. Registered only where
    the kernels loaded (use_cpu_decode_attention), and traced by the compiled decode step: nothing here loads."""
    extra = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux"))  # terms sdpa takes
    if dropout or extra or not _takes(query, key, value, attention_mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    mask = attention_mask
    if mask is not None:
        mask = mask[..., : key.shape[2]]
        if mask.dtype == torch.bool:  # sdpa's masks say where to attend
            mask = torch.zeros_like(mask, dtype=query.dtype).masked_fill_(~mask, torch.finfo(query.dtype).min)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return torch.ops.qwen.decode_attention(query, key, value, mask, scale), None  # [n, 1, heads, D]


def use_cpu_decode_attention(model) -> bool:
    """Let `model` (on the CPU, fp32, attention by sdpa) decode with qwen::decode_attention: its attention
    implementation becomes DECODE_ATTENTION (sdpa for everything else). Whether it did."""
    parameter = next(model.parameters(), None)
    if (getattr(model.config, "_attn_implementation", None) != "sdpa" or parameter is None
            or parameter.device.type != "cpu" or parameter.dtype != torch.float32 or cpu_kernels() is None):
        return False
    AttentionInterface.register(DECODE_ATTENTION, cpu_decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(DECODE_ATTENTION)
    return True


__all__ = ["DECODE_ATTENTION", "TILE", "KernelBuildError", "cpu_decode_attention", "cpu_kernels", "load_cpu_kernels",
           "use_cpu_decode_attention"]
