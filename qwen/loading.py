"""One place that turns a script's `-c/--checkpoint-path` into a ready (model, tokenizer).

A checkpoint is a local directory, a hub id (Hugging Face, with ModelScope as a fallback when `modelscope`
is installed) or nothing, which means the offline demo model (`qwen.demo`). Everything a person can get
wrong raises `CheckpointError` with one message saying what is wrong and what to do; scripts print it and
exit non-zero.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import torch

from qwen_generation_utils import suppress_undecodable

from .errors import CheckpointError
from .quantize import (
    check_gptq_checkpoint,
    describe_model,
    gptq_load_kwargs,
    gptq_quantization,
    kernel_choice_quietly,
    model_gptq,
    run_kernels_eagerly,
)

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}  # fmt: skip
# Weight files transformers reads, in the order it prefers them.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# "org/name" as the hubs spell repository ids; anything else that is not a directory is a wrong path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def download_hint(repo_id: str = "Qwen/Qwen-7B-Chat") -> str:
    local = repo_id.rsplit("/", 1)[-1]
    return (
        f"Download it first with `hf download {repo_id} --local-dir {local}` (huggingface_hub) or "
        f"`modelscope download --model {repo_id} --local_dir {local}`, then pass `-c {local}`."
    )


def checkpoint_name(checkpoint: str) -> str:
    """'Qwen-7B-Chat' for the hub id 'Qwen/Qwen-7B-Chat' or the directory '/models/Qwen-7B-Chat/'."""
    return checkpoint.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def resolve_checkpoint(checkpoint: str, revision: str | None = None) -> Path:
    """A local checkpoint directory for `checkpoint`: the path itself, or a hub snapshot downloaded/cached."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{checkpoint} is a file; pass the checkpoint directory (the one with config.json)."
        )
    if not HUB_ID.fullmatch(str(checkpoint)):
        raise CheckpointError(
            f"No such checkpoint directory: {checkpoint}. Pass a directory holding config.json and the "
            "weights, or a hub id such as Qwen/Qwen-7B-Chat."
        )
    return _download(str(checkpoint), revision)


def _modelscope_download():
    """ModelScope's snapshot_download when `modelscope` is installed (the fallback hub), else None."""
    if importlib.util.find_spec("modelscope") is None:
        return None
    from modelscope import snapshot_download

    return snapshot_download


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except RepositoryNotFoundError:
        problem = (
            f"{repo_id} was not found on the Hugging Face hub (check the spelling, or log in if it is gated)"
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        why = (
            "hub access is switched off (HF_HUB_OFFLINE=1)"
            if constants.HF_HUB_OFFLINE
            else f"the hub is unreachable ({type(exc).__name__})"
        )
        problem = f"{repo_id} is not in the local hub cache and {why}"
    if (modelscope_download := _modelscope_download()) is not None:
        try:
            return Path(modelscope_download(repo_id, revision=revision))
        except Exception as exc:  # modelscope raises many kinds; any of them means "not available"
            problem += f"; ModelScope failed too ({type(exc).__name__}: {exc})"
    raise CheckpointError(f"Cannot get checkpoint {repo_id}: {problem}. {download_hint(repo_id)}")


def check_checkpoint(path: Path) -> dict:
    """config.json of a loadable checkpoint directory; CheckpointError naming what is missing otherwise."""
    from transformers import CONFIG_MAPPING

    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{path} is not a model checkpoint: it has no config.json. Pass the directory that holds "
            f"config.json and the weights (e.g. a download of Qwen/Qwen-7B-Chat). {download_hint()}"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(
            f"{config_file} is not valid JSON ({exc}); download the checkpoint again."
        ) from exc
    check_gptq_checkpoint(path, config)  # GPTQ Int4/Int8: loads through GPT-QModel when it is installed
    model_type = config.get("model_type")
    if model_type != "qwen":
        if model_type not in CONFIG_MAPPING:
            raise CheckpointError(
                f"{path} is not a Qwen checkpoint: config.json has model_type {model_type!r}, which neither "
                "this repository nor transformers knows. Pass a Qwen (v1) checkpoint such as "
                "Qwen/Qwen-7B-Chat."
            )
        print(
            f"note: {path} is a {model_type!r} model, not Qwen (v1): loading it with transformers' own "
            "classes.",
            file=sys.stderr,
        )
    weights = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise CheckpointError(
            f"{path} has no model weights (none of {', '.join(WEIGHT_FILES)}): the download is incomplete. "
            f"{download_hint()}"
        )
    if weights[0].endswith(".index.json"):
        index = json.loads((path / weights[0]).read_text(encoding="utf-8"))
        missing = sorted(
            {shard for shard in index.get("weight_map", {}).values() if not (path / shard).is_file()}
        )
        if missing:
            raise CheckpointError(
                f"{path} lacks {len(missing)} weight shard(s) listed in {weights[0]} (e.g. {missing[0]}): "
                f"the download is incomplete. {download_hint()}"
            )
    return config


def resolve_device(device: str | None, cpu_only: bool) -> str:
    """'cpu', 'cuda[:N]', 'mps' ... or 'auto' (spread over the GPUs with accelerate)."""
    if cpu_only:
        return "cpu"
    if device in (None, "auto"):
        return "auto" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(
            f"Device {device!r} was asked for but CUDA is not available; run with --cpu-only."
        )
    return str(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: str, config: dict | None = None) -> torch.dtype:
    """dtype None/"auto": the model's own automatic precision (modeling_qwen.auto_dtype: config.json's
    bf16/fp16/fp32 flag, else native bf16 / fp16 on a GPU, else fp32; fp32 for a GPTQ checkpoint on the CPU).
    `config`: config.json as a dict."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        from .configuration_qwen import PRECISION_FLAGS, QWenConfig
        from .modeling_qwen import auto_dtype

        on_gpu = device != "cpu" and torch.cuda.is_available()
        config = config or {}
        try:
            flagged = QWenConfig(**{k: config[k] for k in PRECISION_FLAGS if k in config}).precision_dtype_name()
        except ValueError as exc:
            raise CheckpointError(f"config.json: {exc}") from None
        return auto_dtype(flagged, on_gpu, gptq_quantization(config) is not None)
    if str(dtype).lower() not in DTYPES:
        raise CheckpointError(f"Unknown dtype {dtype!r}; use one of auto, bf16, fp16, fp32.")
    return DTYPES[str(dtype).lower()]


def demo_path() -> Path:
    """The offline demo model's directory (prepared once), announced in one line on stderr."""
    from .demo import DEMO_LICENSE, DEMO_NAME, demo_checkpoint

    path = demo_checkpoint()
    print(
        f"Running the offline demo model {DEMO_NAME} ({DEMO_LICENSE}; not Qwen, for trying the scripts out). "
        "Run a real Qwen checkpoint with `-c Qwen/Qwen-7B-Chat` or `-c /path/to/checkpoint`.",
        file=sys.stderr,
    )
    return path


def load_model_and_tokenizer(
    checkpoint: str | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    cpu_only: bool = False,
    revision: str | None = None,
    demo_if_none: bool = True,
    use_cache_quantization: bool | None = None,
    describe: bool = True,
    qwen_only: bool = False,
    **model_kwargs,
):
    """(model, tokenizer) for a checkpoint directory, a hub id, or (None) the offline demo model.

    The model is in eval mode, on `device` ("auto": all GPUs via accelerate, else the CPU), in `dtype`
    ("auto": resolve_dtype's, the model's own policy); from_pretrained reads generation_config.json into
    model.generation_config with Qwen's keys (chat_format, max_window_size, stop_words_ids) kept.
    `model_kwargs` go to `AutoModelForCausalLM.from_pretrained`. GPTQ Int4/Int8 checkpoints load through
    GPT-QModel (qwen.quantize); use_cache_quantization=True overrides config.json and stores the KV cache in int8.
    One line on stderr says what was loaded (describe=False: the caller says it). qwen_only=True refuses any other
    architecture (e.g. a to-qwen2 export) before loading, for callers that use QWen's own methods (chat_stream).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen  # noqa: F401  registers model_type "qwen": the hub's auto_map is never executed

    if checkpoint is None:
        if not demo_if_none:
            raise CheckpointError("No checkpoint given: pass -c Qwen/Qwen-7B-Chat or -c /path/to/checkpoint.")
        path = demo_path()
    else:
        path = resolve_checkpoint(str(checkpoint), revision)
    if (path / ADAPTER_CONFIG).is_file():
        return load_adapter_checkpoint(path, device=device, dtype=dtype, cpu_only=cpu_only, qwen_only=qwen_only,
                                       use_cache_quantization=use_cache_quantization, **model_kwargs)
    if qwen_only:
        refuse_other_architectures(path)
    config = check_checkpoint(path)
    device = resolve_device(device, cpu_only)
    torch_dtype = resolve_dtype(dtype, device, config)
    if device != "cpu":
        model_kwargs.setdefault("device_map", device)  # straight onto the GPU(s), not through the CPU
    kernel = {k: v for k, v in gptq_load_kwargs(config, device).items() if k not in model_kwargs}  # GPTQ's, here
    if use_cache_quantization is not None:
        model_kwargs["use_cache_quantization"] = use_cache_quantization  # a config.json override
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with kernel_choice_quietly(bool(kernel)):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kernel, **model_kwargs)
    except (OSError, SafetensorError) as exc:  # unreadable or truncated files
        raise CheckpointError(f"Could not load the checkpoint in {path}: {exc}. {download_hint()}") from exc
    if model_gptq(model) is not None:
        run_kernels_eagerly(model)  # no per-Linear recompiles (and dynamo's warning) during the first answer
    suppress_undecodable(model.generation_config, tokenizer, model)  # also plain generate()
    if describe:
        print(loaded_line(model, checkpoint_name(str(path))), file=sys.stderr)
    return model.eval(), tokenizer


def loaded_line(model, name: str) -> str:
    """describe_model's line, naming bitsandbytes 4-bit weights (Q-LoRA) as such rather than by their dtype."""
    line = describe_model(model, name)
    quantization = getattr(model.config, "quantization_config", None)
    if getattr(model, "is_loaded_in_4bit", False) and quantization is not None:
        kind = getattr(quantization, "bnb_4bit_quant_type", "4-bit")
        compute = str(getattr(quantization, "bnb_4bit_compute_dtype", model.dtype)).removeprefix("torch.")
        dtype = str(model.dtype).removeprefix("torch.")
        line = line.replace(f"{dtype} weights", f"{kind} 4-bit weights (bitsandbytes), compute {compute}", 1)
    return line


def refuse_other_architectures(path: Path) -> None:
    """CheckpointError (one line) when config.json names another architecture than Qwen (v1)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # check_checkpoint() names what is wrong with the file
    model_type = config.get("model_type")
    if model_type in (None, "qwen"):
        return
    export = " (a `python -m qwen.convert to-qwen2` export, for vLLM / SGLang)" if model_type == "qwen2" else ""
    raise CheckpointError(
        f"{path} holds a {model_type!r} model{export}, not Qwen (v1); this script chats through Qwen (v1)'s own "
        "code: pass the Qwen (v1) checkpoint itself (for an export, the directory it was exported from)."
    )


ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file: the directory is a LoRA adapter on a base checkpoint


def load_adapter_checkpoint(path: Path, base: str | None = None, **load_kwargs):
    """(model, tokenizer) of a LoRA adapter directory (finetune.py --use_lora output): its base checkpoint loaded
    as any other, the adapter merged in (inference runs at the base model's speed), and the tokenizer and
    generation_config saved beside the adapter."""
    if importlib.util.find_spec("peft") is None:
        raise CheckpointError(
            f"{path} is a LoRA adapter; loading it needs peft: pip install -r requirements.txt"
        )
    from peft import PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    try:
        base = base or json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / ADAPTER_CONFIG} is unreadable or names no base model ({exc}).") from exc
    model, tokenizer = load_model_and_tokenizer(base, describe=False, **load_kwargs)
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
    adapter = f"{checkpoint_name(str(path))} (LoRA adapter on {checkpoint_name(str(base))}, merged in)"
    print(loaded_line(model, adapter), file=sys.stderr)
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
        suppress_undecodable(model.generation_config, tokenizer, model)  # also plain generate()
    return model.eval(), tokenizer


__all__ = [
    "CheckpointError", "check_checkpoint", "demo_path", "load_adapter_checkpoint", "load_model_and_tokenizer", "resolve_checkpoint",
]
