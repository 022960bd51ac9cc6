"""qwen.loading: every on-disk format gives the same model, and every user mistake one clear message."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from qwen.checkpoints import make_tiny_checkpoint
from qwen.loading import (
    CheckpointError,
    check_checkpoint,
    load_model_and_tokenizer,
    resolve_checkpoint,
    resolve_device,
    resolve_dtype,
)

TINY = {"hidden": 32, "heads": 4, "layers": 2, "intermediate": 64, "seed": 7}
FORMATS = ("safetensors", "single", "bin")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fmt: make_tiny_checkpoint(root / fmt, **TINY, format=fmt) for fmt in FORMATS}


@pytest.fixture
def broken(checkpoints, tmp_path) -> Path:
    """A writable copy of the sharded checkpoint, for tests that damage it."""
    return Path(shutil.copytree(checkpoints["safetensors"], tmp_path / "copy"))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


# ----------------------------------------------------------------------------------------------------
# Formats


def test_every_format_gives_identical_logits(checkpoints):
    logits = {}
    for fmt, path in checkpoints.items():
        model, tokenizer = load_model_and_tokenizer(str(path), cpu_only=True)
        assert type(model).__name__ == "QWenLMHeadModel" and not model.training
        ids = torch.tensor([tokenizer.encode("Hello, Qwen! 你好")])
        with torch.no_grad():
            logits[fmt] = model(ids).logits
    assert logits["safetensors"].shape[-1] == 151936
    assert logits["safetensors"].abs().max() > 0
    for fmt in FORMATS[1:]:
        torch.testing.assert_close(logits[fmt], logits["safetensors"], rtol=0, atol=0)


def test_legacy_keys_are_read_as_the_final_ones(checkpoints):
    model, _ = load_model_and_tokenizer(str(checkpoints["bin"]), cpu_only=True)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size) == (
        32,
        2,
        64,
    )
    assert model.config.vocab_size == 151936


def test_auto_classes_load_the_hub_layout_without_remote_code(checkpoints):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen  # noqa: F401  the registration under test

    path = checkpoints["safetensors"]
    assert "auto_map" in json.loads((path / "config.json").read_text())  # what would call for remote code
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__module__ == "qwen.modeling_qwen"
    assert type(tokenizer).__module__ == "qwen.tokenization_qwen"


def test_generation_config_is_read_with_its_qwen_keys(checkpoints, tmp_path):
    model, _ = load_model_and_tokenizer(str(checkpoints["single"]), cpu_only=True)
    config = model.generation_config
    assert config.chat_format == "chatml"
    assert config.max_window_size == 6144
    assert config.stop_words_ids == [[151643]]
    assert (config.eos_token_id, config.pad_token_id, config.top_p) == (151643, 151643, 0.8)

    base = make_tiny_checkpoint(tmp_path / "base", **TINY, chat=False, format="single")
    model, _ = load_model_and_tokenizer(str(base), cpu_only=True)
    assert model.generation_config.chat_format == "raw"


def test_cpu_only_gives_fp32_on_cpu_and_dtype_can_be_chosen(checkpoints):
    model, _ = load_model_and_tokenizer(str(checkpoints["single"]), cpu_only=True)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    model, _ = load_model_and_tokenizer(str(checkpoints["single"]), cpu_only=True, dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"


def test_the_loader_and_from_pretrained_share_one_automatic_precision(tmp_path):
    """config.json's bf16 flag decides the automatic dtype for the scripts' loader as for from_pretrained; a GPTQ
    checkpoint on the CPU stays fp32 (its kernel's exact dtype); two flags at once are a clear error."""
    from transformers import AutoModelForCausalLM

    flagged = make_tiny_checkpoint(tmp_path / "bf16", **TINY)
    config = json.loads((flagged / "config.json").read_text())
    (flagged / "config.json").write_text(json.dumps({**config, "bf16": True, "fp16": False, "fp32": False}))
    loaded, _ = load_model_and_tokenizer(str(flagged), cpu_only=True)
    assert loaded.dtype == AutoModelForCausalLM.from_pretrained(flagged).dtype == torch.bfloat16
    gptq = {**config, "fp16": True, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    assert resolve_dtype("auto", "cpu", gptq) == torch.float32
    with pytest.raises(CheckpointError, match="more than one of bf16/fp16/fp32"):
        resolve_dtype(None, "cpu", {**config, "bf16": True, "fp16": True})


def test_device_and_dtype_choices():
    assert resolve_device("cuda:0", cpu_only=True) == "cpu"
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp16", "cpu") == torch.float16
    assert resolve_dtype("BF16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float64, "cpu") == torch.float64
    with pytest.raises(CheckpointError, match="Unknown dtype 'int3'; use one of auto, bf16, fp16, fp32"):
        resolve_dtype("int3", "cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None, cpu_only=False) == "cpu"
        assert resolve_device("auto", cpu_only=False) == "cpu"
        with pytest.raises(CheckpointError, match="CUDA is not available; run with --cpu-only"):
            resolve_device("cuda", cpu_only=False)


# ----------------------------------------------------------------------------------------------------
# Errors: each says what is wrong and what to do


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="No such checkpoint directory: .*nowhere.*Pass a directory"):
        load_model_and_tokenizer(str(tmp_path / "nowhere"), cpu_only=True)


def test_a_file_instead_of_a_directory(checkpoints):
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint directory"):
        resolve_checkpoint(str(checkpoints["single"] / "config.json"))


def test_directory_without_config(tmp_path):
    with pytest.raises(
        CheckpointError, match="is not a model checkpoint: it has no config.json.*hf download"
    ):
        load_model_and_tokenizer(str(tmp_path), cpu_only=True)


def test_config_that_is_not_json(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        check_checkpoint(broken)


def test_unknown_model_type(broken):
    _edit_config(broken, model_type="not-a-model")
    with pytest.raises(CheckpointError, match="model_type 'not-a-model', which neither this repository nor"):
        load_model_and_tokenizer(str(broken), cpu_only=True)


def test_other_known_model_type_loads_with_a_note(broken, capsys):
    _edit_config(broken, model_type="llama")
    assert check_checkpoint(broken)["model_type"] == "llama"
    assert "is a 'llama' model, not Qwen (v1)" in capsys.readouterr().err


def test_gptq_checkpoint_without_the_gptq_extra(broken, monkeypatch):
    from qwen import quantize

    monkeypatch.setattr(quantize, "missing_gptq_packages", lambda: ["gptqmodel", "optimum"])  # as without the extra
    _edit_config(broken, quantization_config={"bits": 4, "group_size": 128, "quant_method": "gptq"})
    with pytest.raises(
        CheckpointError,
        match=r"is a GPTQ Int4 checkpoint; loading it needs gptqmodel and optimum: pip install -r "
        r"requirements-gptq.txt",
    ):
        load_model_and_tokenizer(str(broken), cpu_only=True)


def test_missing_weights(broken):
    for shard in broken.glob("model*.safetensors*"):
        shard.unlink()
    with pytest.raises(CheckpointError, match="has no model weights .*the download is incomplete"):
        load_model_and_tokenizer(str(broken), cpu_only=True)


def test_missing_shard(broken):
    next(broken.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(
        CheckpointError, match=r"lacks 1 weight shard\(s\) listed in model.safetensors.index.json"
    ):
        load_model_and_tokenizer(str(broken), cpu_only=True)


def test_truncated_weights(checkpoints, tmp_path):
    copy = Path(shutil.copytree(checkpoints["single"], tmp_path / "copy"))
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="Could not load the checkpoint in"):
        load_model_and_tokenizer(str(copy), cpu_only=True)


def test_hub_id_while_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr("qwen.loading._modelscope_download", lambda: None)
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint("Qwen/Qwen-7B-Chat")
    message = str(caught.value)
    assert "Qwen/Qwen-7B-Chat is not in the local hub cache and hub access is switched off" in message
    assert "`hf download Qwen/Qwen-7B-Chat --local-dir Qwen-7B-Chat`" in message
    assert "`modelscope download --model Qwen/Qwen-7B-Chat" in message


def test_hub_id_not_found(monkeypatch):
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client since 1.0
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(repo_id, **kwargs):
        response = httpx2.Response(
            404, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        )
        raise RepositoryNotFoundError(f"{repo_id} not found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(
        CheckpointError,
        match="Qwen/Qwen-8B-Chatt was not found on the Hugging Face hub .*hf download Qwen/Qwen-8B-Chatt",
    ):
        resolve_checkpoint("Qwen/Qwen-8B-Chatt")


def test_modelscope_is_the_fallback_hub(monkeypatch, tmp_path, checkpoints):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    asked = []

    def modelscope_download(repo_id, revision=None):
        asked.append((repo_id, revision))
        return str(checkpoints["single"])

    monkeypatch.setattr("qwen.loading._modelscope_download", lambda: modelscope_download)
    assert resolve_checkpoint("qwen/Qwen-7B-Chat", revision="v1.1.4") == checkpoints["single"]
    assert asked == [("qwen/Qwen-7B-Chat", "v1.1.4")]

    def modelscope_fails(repo_id, revision=None):
        raise ConnectionError("modelscope.cn unreachable")

    monkeypatch.setattr("qwen.loading._modelscope_download", lambda: modelscope_fails)
    with pytest.raises(
        CheckpointError, match="ModelScope failed too .*ConnectionError: modelscope.cn unreachable"
    ):
        resolve_checkpoint("qwen/Qwen-7B-Chat")


def test_no_checkpoint_and_no_demo():
    with pytest.raises(CheckpointError, match="No checkpoint given: pass -c Qwen/Qwen-7B-Chat"):
        load_model_and_tokenizer(None, demo_if_none=False)


@pytest.mark.slow
def test_chat_refuses_a_qwen2_export_at_load_with_one_line(checkpoints, tmp_path):
    """cli_demo.py chats through QWen's chat_stream: a to-qwen2 export (for vLLM) is refused before loading."""
    import subprocess
    import sys

    from conftest import REPO

    from qwen.convert import main as convert

    export = tmp_path / "tiny-qwen2"
    assert convert(["to-qwen2", str(checkpoints["safetensors"]), str(export)]) == 0
    with pytest.raises(CheckpointError, match=r"'qwen2' model \(a `python -m qwen.convert to-qwen2` export"):
        load_model_and_tokenizer(str(export), cpu_only=True, qwen_only=True)
    done = subprocess.run([sys.executable, "cli_demo.py", "-c", str(export)], cwd=REPO, input="Hello\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"Error: {export} holds a 'qwen2' model (a `python -m qwen.convert to-qwen2` export, for vLLM / SGLang), "
        "not Qwen (v1); this script chats through Qwen (v1)'s own code: pass the Qwen (v1) checkpoint itself (for "
        "an export, the directory it was exported from)."
    ]
