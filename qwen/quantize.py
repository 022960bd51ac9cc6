"""GPTQ Int4 / Int8 for Qwen through GPT-QModel: quantize a checkpoint, the checkpoint layout it writes, and what
loading one needs.

The hub's Qwen-*-Int4 / -Int8 checkpoints are auto-gptq v1 checkpoints: config.json carries
`quantization_config` {quant_method: gptq, bits 4|8, group_size 128, desc_act false, sym true}, a
quantize_config.json repeats it, and every quantized Linear is stored as int32-packed `qweight` [in*bits/32, out],
int32-packed `qzeros` [groups, out*bits/32] (each zero point stored minus one), fp16 `scales` [groups, out] and
`g_idx` [in]; biases stay as they are. transformers loads that format through its GPTQ integration (optimum +
GPT-QModel: a CUDA kernel on a GPU, GPT-QModel's torch kernel on the CPU). `quantize()` writes exactly that
layout, plus the hub's config / generation config / tokenizer files, so its output loads like a download.

Nothing here imports gptqmodel at module import: it is an optional extra (requirements-gptq.txt).
"""

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import CheckpointError, UsageError

GPTQ_BITS = (4, 8)
GPTQ_GROUP_SIZE = 128
# The calibration the original run_gptq.py used (auto-gptq BaseQuantizeConfig): kept for the same results.
GPTQ_DAMP_PERCENT = 0.01
CPU_BACKEND = "gptq_torch"  # GPT-QModel's BACKEND.GPTQ_TORCH: TorchLinear
TRAINABLE_BACKEND = "auto_trainable"  # GPT-QModel's best kernel that supports backward (Q-LoRA on a GPU)
INSTALL_HINT = "pip install -r requirements-gptq.txt (GPT-QModel and optimum)"
# Files of a checkpoint that are not weights and that a quantized copy keeps as they are.
HUB_SIDE_FILES = ("generation_config.json", "tokenizer_config.json", "qwen.tiktoken")


def gptq_config(bits: int, group_size: int = GPTQ_GROUP_SIZE) -> dict:
    """`quantization_config` as the hub's Qwen-*-Int4/Int8 config.json has it (also quantize_config.json)."""
    return {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": GPTQ_DAMP_PERCENT,
        "desc_act": False,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",  # auto-gptq v1 packing (zero points stored minus one); GPT-QModel reads it
    }


def gptq_quantization(config: dict) -> dict | None:
    """config.json's quantization_config when it is GPTQ, else None."""
    quantization = config.get("quantization_config") or {}
    return quantization if quantization.get("quant_method") == "gptq" else None


def missing_gptq_packages() -> list[str]:
    """The pip packages loading or writing a GPTQ checkpoint needs that are not installed."""
    return [name for name, module in (("gptqmodel", "gptqmodel"), ("optimum", "optimum")) if
            importlib.util.find_spec(module) is None]


def check_gptq_checkpoint(path: Path, config: dict) -> None:
    """CheckpointError when a GPTQ checkpoint cannot load here: bits we do not know, or the extra not installed."""
    quantization = gptq_quantization(config)
    if quantization is None:
        return
    bits = quantization.get("bits")
    if bits not in GPTQ_BITS:
        raise CheckpointError(
            f"{path} is a GPTQ checkpoint with bits={bits!r}; Qwen's GPTQ checkpoints are Int4 or Int8 (bits 4 or 8)."
        )
    if missing := missing_gptq_packages():
        raise CheckpointError(
            f"{path} is a GPTQ Int{bits} checkpoint; loading it needs {' and '.join(missing)}: {INSTALL_HINT}."
        )


def gptq_load_kwargs(config: dict, device: str, trainable: bool = False) -> dict:
    """from_pretrained keyword arguments for a GPTQ checkpoint (config.json as a dict), {} for any other.

    On the CPU: GPT-QModel's torch kernel, which computes in the activations' dtype (fp32 on the CPU is exact; its
    int4 ATen kernel would round activations to bf16) and trains (Q-LoRA). On a GPU: GPT-QModel's fastest kernel
    for the card (Marlin, ExLlama v2, ...), or with trainable=True (Q-LoRA) the fastest one with a backward pass.
    """
    quantization = gptq_quantization(config)
    if quantization is None or (device != "cpu" and not trainable):
        return {}
    from transformers import GPTQConfig

    backend = CPU_BACKEND if device == "cpu" else TRAINABLE_BACKEND
    return {"quantization_config": GPTQConfig(bits=quantization["bits"], backend=backend)}


def default_kernel_kwargs(config: dict, on_gpu: bool, chosen: dict) -> dict:
    """What QWenPreTrainedModel.from_pretrained (the Auto classes' path) adds for a GPTQ checkpoint: the kernel
    the scripts load (gptq_load_kwargs), unless the caller's `chosen` keyword arguments or config.json name one."""
    quantization = gptq_quantization(config)
    if quantization is None or chosen.get("quantization_config") is not None or quantization.get("backend"):
        return {}
    return gptq_load_kwargs(config, "cuda" if on_gpu else "cpu")


@contextlib.contextmanager
def kernel_choice_quietly(ours: bool):
    """transformers warns when a from_pretrained quantization_config meets config.json's; when it is ours (`ours`:
    default_kernel_kwargs / gptq_load_kwargs chose it) it only names the kernel, a loading attribute that takes
    precedence as transformers documents, and the warning would blame the caller for an argument never passed."""
    import warnings

    if not ours:  # warnings' filters stay as they are (catch_warnings would reset them on the way out)
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You passed `quantization_config`", UserWarning)
        yield


def model_gptq(model) -> dict | None:
    """A loaded model's GPTQ quantization_config as a dict, or None when its weights are not GPTQ."""
    return gptq_quantization(_as_dict(model.config))


def _as_dict(config) -> dict:
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return {"quantization_config": quantization}


def run_kernels_eagerly(model) -> None:
    """Undo GPT-QModel's torch.compile of TorchLinear.dequantize_weight on every quantized Linear of `model`.

    The compiled function is shared by all Linears and guards on each one's buffer shapes and on its zero-point
    cache key (the qzeros tensor's id), so every Linear recompiles (seconds each) until torch._dynamo's
    recompile_limit (8); dynamo then prints a warning in the middle of the first answer and runs the remaining
    Linears eagerly anyway. Eager for all of them: the same arithmetic, no compile time, no warning.
    """
    for module in model.modules():
        if type(module).__module__.startswith("gptqmodel.") and "dequantize_weight" in vars(module):
            del module.dequantize_weight  # the instance's compiled wrapper; the class's method remains


def quiet_gptqmodel() -> None:
    """Keep GPT-QModel's start-up chatter out of a person's terminal; call before anything imports gptqmodel.

    Its import prints a banner, "Python GIL is enabled" and "Auto setting CUDA_DEVICE_ORDER" through LogBar's
    shared logger (named "logbar", set to INFO when created): create that logger now, at WARNING, and set the two
    environment variables it would announce (CUDA_DEVICE_ORDER=PCI_BUS_ID is GPT-QModel's own choice).
    """
    if importlib.util.find_spec("logbar") is None:
        return
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    import logging

    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # its import prints a blank line
        from logbar import LogBar

        LogBar.shared().setLevel(logging.WARNING)


def kernel_name(model) -> str | None:
    """The GPT-QModel kernel class behind a GPTQ model's quantized Linears (e.g. TorchAtenLinear, MarlinLinear)."""
    for module in model.modules():
        if type(module).__module__.startswith("gptqmodel.") and hasattr(module, "qweight"):
            return type(module).__name__
    return None


def describe_model(model, name: str) -> str:
    """One line: what was loaded (weights' format, bits and kernel, activations' dtype and device, KV cache)."""
    from .kv_cache import cache_kind

    quantization = model_gptq(model)
    dtype = str(model.dtype).removeprefix("torch.")
    if quantization is not None:
        weights = (f"GPTQ Int{quantization['bits']} (group size {quantization.get('group_size')}, "
                   f"kernel {kernel_name(model)}), activations {dtype}")
    else:
        weights = f"{dtype} weights"
    return f"Loaded {name}: {weights} on {model.device}, KV cache {cache_kind(model.config)}."


# ---------------------------------------------------------------------------------------------------------------
# Quantizing (run_gptq.py)


def quantize(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: list[dict],
    *,
    bits: int = 4,
    group_size: int = GPTQ_GROUP_SIZE,
    batch_size: int = 1,
) -> Path:
    """GPTQ-quantize the checkpoint in `model_path` with GPT-QModel and write a checkpoint that loads as it is."""
    if bits not in GPTQ_BITS:
        raise UsageError(f"--bits {bits}: Qwen's GPTQ checkpoints are 4 or 8 bits; use --bits 4 or --bits 8.")
    if group_size != -1 and group_size <= 0:
        raise UsageError(f"--group-size {group_size}: use a positive group size (128 as the hub) or -1 (one group).")
    if not calibration:
        raise UsageError("no calibration samples: --data_path must hold at least one conversation.")
    if missing := missing_gptq_packages():
        raise UsageError(f"run_gptq.py needs {' and '.join(missing)}: {INSTALL_HINT}.")
    source = Path(model_path).resolve()
    out = Path(out_path).resolve()
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out_path {out} exists and is not empty: pick a new directory (nothing is overwritten).")

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 4)))
    from gptqmodel import GPTQModel, QuantizeConfig

    import qwen  # noqa: F401  registers model_type "qwen" so GPT-QModel builds our QWenLMHeadModel

    quantize_config = QuantizeConfig(
        bits=bits, group_size=group_size, desc_act=False, sym=True, damp_percent=GPTQ_DAMP_PERCENT,
    )
    # GPT-QModel redraws its progress bars on stdout many times a second: on a terminal that is progress, in a
    # log file thousands of lines, so away from a terminal it stays quiet (out/quant_log.csv has the losses).
    with contextlib.ExitStack() as stack:
        if not sys.stdout.isatty():
            print("GPT-QModel's progress bars show on a terminal only; quantizing ...", file=sys.stderr, flush=True)
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        # GPT-QModel writes a ./logs directory wherever it runs: keep it out of the user's working directory.
        stack.enter_context(contextlib.chdir(stack.enter_context(tempfile.TemporaryDirectory())))
        model = GPTQModel.load(str(source), quantize_config)
        model.quantize(calibration, batch_size=batch_size)  # GPT-QModel shows a progress bar per layer
        model.save(str(out))
    write_hub_layout(source, out, bits, group_size)
    return out


def write_hub_layout(source: Path, out: Path, bits: int, group_size: int) -> None:
    """Make GPT-QModel's output directory look like the hub's Int4/Int8 download: the source's config.json with
    the GPTQ quantization_config added, quantize_config.json, and the source's generation/tokenizer files."""
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = gptq_config(bits, group_size)
    _write_json(out / "config.json", config)
    _write_json(out / "quantize_config.json", gptq_config(bits, group_size))
    for name in HUB_SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    for extra in ("special_tokens_map.json", "chat_template.jinja"):  # tokenizer.save_pretrained() leftovers
        (out / extra).unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = [
    "GPTQ_BITS",
    "GPTQ_GROUP_SIZE",
    "check_gptq_checkpoint",
    "default_kernel_kwargs",
    "describe_model",
    "gptq_config",
    "gptq_load_kwargs",
    "gptq_quantization",
    "kernel_choice_quietly",
    "kernel_name",
    "model_gptq",
    "quantize",
    "quiet_gptqmodel",
    "run_kernels_eagerly",
]
