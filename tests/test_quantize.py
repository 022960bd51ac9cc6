"""GPTQ Int4 / Int8 with the real GPT-QModel on tiny checkpoints: run_gptq.py writes the hub's layout, the packed
tensors mean what the loaded model computes (checked against a plain dequantizer written here), every loading
path takes the output, and LoRA trains on top of Int4 (Q-LoRA) and merges into the full-precision model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test needs a real GPT-QModel quantization (minutes on 2 cores)
pytest.importorskip("gptqmodel", reason="needs requirements-gptq.txt")
pytest.importorskip("optimum", reason="needs requirements-gptq.txt")

from qwen.checkpoints import make_tiny_checkpoint  # noqa: E402
from qwen.errors import CheckpointError  # noqa: E402
from qwen.loading import load_model_and_tokenizer  # noqa: E402

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# GPT-QModel torch.compiles its CPU kernel's dequantization at first use: tens of seconds on 2 cores for tiny
# models. The tests run it eagerly (same arithmetic); TORCHDYNAMO_DISABLE does that in subprocesses too.
NO_COMPILE = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
# The smallest shape GPTQ's group size 128 fits: every quantized Linear has 128 or 256 input columns.
TINY = {"layers": 2, "hidden": 128, "heads": 4, "intermediate": 512}
QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
TEXT = "Bridges span rivers and mountains rise above valleys; people built stone arches for centuries."


@pytest.fixture(scope="module", autouse=True)
def eager_kernels():
    import torch._dynamo

    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = before


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "Qwen-tiny-Chat", **TINY)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.json"
    samples = [
        {"id": f"s{i}", "conversations": [
            {"from": "user", "value": f"Question {i}: tell me about bridges, rivers and mountains."},
            {"from": "assistant", "value": f"Answer {i}. {TEXT}"},
        ]}
        for i in range(8)
    ]
    path.write_text(json.dumps(samples), encoding="utf-8")
    return path


def run_gptq(tiny, calibration_file, out, bits):
    """The real script in a subprocess, as a person runs it."""
    result = subprocess.run(
        [sys.executable, str(REPO / "run_gptq.py"), "--model_name_or_path", str(tiny), "--data_path",
         str(calibration_file), "--out_path", out.name, "--bits", str(bits), "--max_len", "64"],
        cwd=out.parent, capture_output=True, text=True, timeout=600, env=NO_COMPILE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(out.parent) == [out.name]  # nothing else left in the working directory (GPT-QModel's logs)
    # not a terminal: a few lines, not GPT-QModel's progress bars redrawn hundreds of times
    assert len((result.stdout + result.stderr).splitlines()) <= 10, result.stdout[-2000:] + result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def int4(tiny, calibration_file, tmp_path_factory):
    return run_gptq(tiny, calibration_file, tmp_path_factory.mktemp("int4") / "Qwen-tiny-Chat-Int4", 4)


@pytest.fixture(scope="module")
def int8(tiny, calibration_file, tmp_path_factory):
    from transformers import AutoTokenizer

    from qwen.quantize import quantize
    from qwen.sft import calibration_samples

    samples = calibration_samples(AutoTokenizer.from_pretrained(tiny), calibration_file, max_len=64)
    return quantize(tiny, tmp_path_factory.mktemp("int8") / "Qwen-tiny-Chat-Int8", samples, bits=8)


@pytest.fixture(scope="module", params=[4, 8], ids=["Int4", "Int8"])
def quantized(request, int4, int8):
    return request.param, {4: int4, 8: int8}[request.param]


def test_output_is_the_hubs_gptq_layout(quantized):
    bits, path = quantized
    config = json.loads((path / "config.json").read_text())
    expected = {"quant_method": "gptq", "bits": bits, "group_size": 128, "desc_act": False, "sym": True}
    assert expected.items() <= config["quantization_config"].items()
    assert expected.items() <= json.loads((path / "quantize_config.json").read_text()).items()
    assert config["model_type"] == "qwen" and "auto_map" in config
    for name in ("generation_config.json", "tokenizer_config.json", "qwen.tiktoken"):
        assert (path / name).is_file(), name
    tensors = load_file(path / "model.safetensors")
    per_word = 32 // bits
    for layer in range(TINY["layers"]):
        for module in QUANTIZED:
            prefix = f"transformer.h.{layer}.{module}"
            qweight, qzeros, scales = (tensors[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales"))
            columns_in, columns_out = qweight.shape[0] * per_word, qweight.shape[1]
            assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
            assert qzeros.shape == (columns_in // 128, columns_out // per_word)
            assert scales.shape == (columns_in // 128, columns_out)
            assert tensors[f"{prefix}.g_idx"].tolist() == [i // 128 for i in range(columns_in)]
            assert f"{prefix}.weight" not in tensors
        assert f"transformer.h.{layer}.attn.c_attn.bias" in tensors  # the bias is kept


# ---- an independent reading of the auto-gptq v1 format ----


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> the `32 // bits` values each holds (lowest bits first), laid out along `dim`."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    words = packed.long() if dim == 0 else packed.long().T
    values = torch.zeros(words.shape[0] * per_word, words.shape[1], dtype=torch.long)
    for word in range(words.shape[0]):
        for k in range(per_word):
            values[word * per_word + k] = (words[word] >> (bits * k)) & mask
    return values if dim == 0 else values.T


def dequantize(qweight, qzeros, scales, g_idx, bits) -> torch.Tensor:
    """weight [out, in] = scale * (q - zero), one scale/zero per (group of input columns, output column)."""
    q = unpack(qweight, bits, dim=0)  # [in, out]
    zeros = unpack(qzeros, bits, dim=1) + 1  # [groups, out]; v1 stores each zero point minus one
    weight = torch.zeros(q.shape[1], q.shape[0])
    for column in range(q.shape[0]):
        group = int(g_idx[column])
        weight[:, column] = scales[group].float() * (q[column] - zeros[group]).float()
    return weight


def reference_model(path, bits):
    from qwen.configuration_qwen import QWenConfig
    from qwen.modeling_qwen import QWenLMHeadModel

    config = QWenConfig.from_pretrained(path)
    del config.quantization_config
    tensors = load_file(path / "model.safetensors")
    state = {}
    for name, tensor in tensors.items():
        if name.endswith(".qweight"):
            prefix = name.removesuffix(".qweight")
            parts = [tensors[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx")]
            state[f"{prefix}.weight"] = dequantize(*parts, bits)
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            state[name] = tensor.float()
    model = QWenLMHeadModel(config).float().eval()
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def test_loaded_model_computes_what_the_packed_tensors_say(quantized, capfd):
    bits, path = quantized
    model, tokenizer = load_model_and_tokenizer(str(path), dtype="fp32", cpu_only=True)
    assert f"GPTQ Int{bits} (group size 128, kernel " in capfd.readouterr().err  # the one-line summary
    ids = torch.tensor([tokenizer.encode(TEXT)])
    expected = reference_model(path, bits)(ids).logits
    got = model(ids).logits
    assert (got - expected).abs().max().item() <= 1e-3


@torch.no_grad()
def test_the_auto_classes_load_the_scripts_exact_kernel(quantized, recwarn):
    """README "Quantization": AutoModelForCausalLM.from_pretrained(dir) with no kernel named, and the model class
    itself, load what the scripts load on the CPU (TorchLinear, fp32 activations, run eagerly) and compute what the
    packed tensors say. GPT-QModel's own CPU choice (backend "auto": TorchAtenLinear for Int4, activations rounded
    to bf16) misses the same bound, so the bound tells the kernels apart."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    from qwen.modeling_qwen import QWenLMHeadModel
    from qwen.quantize import kernel_name

    bits, path = quantized
    ids = torch.tensor([AutoTokenizer.from_pretrained(path).encode(TEXT)])
    expected = reference_model(path, bits)(ids).logits
    for model in (AutoModelForCausalLM.from_pretrained(path), QWenLMHeadModel.from_pretrained(path)):
        assert (kernel_name(model), model.dtype) == ("TorchLinear", torch.float32)
        assert not [m for m in model.modules() if "dequantize_weight" in vars(m)]  # eager, as the scripts
        assert (model(ids).logits - expected).abs().max().item() <= 1e-3
    assert not [w for w in recwarn if "quantization_config" in str(w.message)]  # no word of an argument not passed
    if bits == 4:
        own = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQConfig(bits=4, backend="auto"))
        assert kernel_name(own) == "TorchAtenLinear"
        assert (own(ids).logits.float() - expected).abs().max().item() > 1e-3


def test_a_kernel_the_caller_or_config_names_is_kept():
    from transformers import GPTQConfig

    from qwen.quantize import default_kernel_kwargs

    config = {"quantization_config": {"quant_method": "gptq", "bits": 4}}
    assert default_kernel_kwargs(config, False, {})["quantization_config"].backend == "gptq_torch"
    assert default_kernel_kwargs(config, True, {}) == {}  # a GPU: GPT-QModel's fastest kernel for the card
    assert default_kernel_kwargs(config, False, {"quantization_config": GPTQConfig(bits=4, backend="auto")}) == {}
    named = {"quantization_config": {**config["quantization_config"], "backend": "gptq_torch_aten"}}
    assert default_kernel_kwargs(named, False, {}) == {}
    assert default_kernel_kwargs({}, False, {}) == {}


def test_loading_undoes_the_per_linear_compile_of_the_dequantization(int4):
    """GPT-QModel torch.compiles each TorchLinear's dequantization; it recompiles per Linear, so we run it eagerly."""
    model, _ = load_model_and_tokenizer(str(int4), dtype="fp32", cpu_only=True)
    linears = [m for m in model.modules() if type(m).__name__ == "TorchLinear"]
    assert len(linears) == 2 * len(QUANTIZED)
    assert not [m for m in linears if "dequantize_weight" in vars(m)]  # no compiled wrapper left on any


@pytest.mark.slow
def test_gptq_chat_shows_no_library_output(int4):
    """A chat on an Int4 checkpoint with torch.compile on (as a person runs it): the transcript and the Loaded line,
    no GPT-QModel banner or notes, no torch._dynamo recompile warning (10 Linears > its limit of 8)."""
    result = subprocess.run(
        [sys.executable, "cli_demo.py", "-c", str(int4), "--max-new-tokens", "4", "--temperature", "0"],
        cwd=REPO, input="Hello\nHi again\n", capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Qwen> ") == 2
    noise = ("GPT-QModel", "GIL", "CUDA_DEVICE_ORDER", "dynamo", "recompile", "INFO", "WARN")
    assert not [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in noise)]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_stays_close_to_the_original(bits, tiny, int4, int8):
    """A sanity bound, not a quality claim (random weights): Int8 tracks the fp model much closer than Int4."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)(ids).logits
        quant = AutoModelForCausalLM.from_pretrained({4: int4, 8: int8}[bits], dtype=torch.float32)(ids).logits
    error = (quant - full).abs().mean() / full.abs().mean()
    assert error < {4: 0.5, 8: 0.05}[bits]


def test_engine_batches_a_gptq_model(int4):
    from qwen.engine import Engine, SamplingParams

    model, tokenizer = load_model_and_tokenizer(str(int4), dtype="fp32", cpu_only=True)
    prompts = [tokenizer.encode("Hello there"), tokenizer.encode("Bridges span rivers and")]
    params = SamplingParams(temperature=0, max_new_tokens=6)
    with Engine(model) as engine:
        handles = [engine.submit(p, params) for p in prompts]
        results = [h.result()[0] for h in handles]
    for prompt, tokens in zip(prompts, results, strict=True):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, repetition_penalty=1.0)
        expected = alone[0, len(prompt):].tolist()
        assert tokens[: len(expected)] == expected


def test_cli_demo_runs_an_int8_checkpoint_with_the_int8_kv_cache(int8):
    result = subprocess.run(
        [sys.executable, "cli_demo.py", "-c", str(int8), "--max-new-tokens", "4", "--temperature", "0",
         "--use-cache-quantization"],
        cwd=REPO, input="Hello\n", capture_output=True, text=True, timeout=300, env=NO_COMPILE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = [line for line in result.stderr.splitlines() if line.startswith("Loaded ")]
    assert loaded == ["Loaded Qwen-tiny-Chat-Int8: GPTQ Int8 (group size 128, kernel TorchLinear), activations "
                      "float32 on cpu, KV cache int8 (per-token scale/zero)."]
    assert "Qwen> " in result.stdout


@pytest.mark.parametrize("script", ["openai_api.py", "web_demo.py"])
def test_servers_serve_an_int4_checkpoint(script, int4):
    """The API server answers a chat and the web page comes up on a GPTQ Int4 checkpoint given with -c."""
    import socket
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, script, "-c", str(int4), "--server-port", str(port)], cwd=REPO,
                              env=NO_COMPILE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None and time.time() < deadline, "the server did not come up"
            try:
                if httpx.get(url + ("/health" if script == "openai_api.py" else "/"), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        if script == "openai_api.py":
            reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "model": "Qwen-tiny-Chat-Int4", "max_tokens": 3, "temperature": 0,
                "messages": [{"role": "user", "content": "Hello"}]})  # fmt: skip
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1, reply.text
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    assert "Loaded Qwen-tiny-Chat-Int4: GPTQ Int4 (group size 128, kernel TorchLinear)" in stderr


def test_gptq_checkpoints_that_cannot_load_say_why(int4, tmp_path, monkeypatch):
    import shutil

    from qwen import quantize

    odd = tmp_path / "Int3"
    shutil.copytree(int4, odd)
    config = json.loads((odd / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="bits=3"):
        load_model_and_tokenizer(str(odd))
    monkeypatch.setattr(quantize, "missing_gptq_packages", lambda: ["gptqmodel"])
    with pytest.raises(CheckpointError, match="needs gptqmodel: pip install -r requirements-gptq.txt"):
        load_model_and_tokenizer(str(int4))


def test_run_gptq_refuses_a_used_output_directory(tiny, calibration_file, int4, capsys):
    sys.path.insert(0, str(REPO))
    import run_gptq

    before = sorted(p.name for p in int4.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        run_gptq.main(["--model_name_or_path", str(tiny), "--data_path", str(calibration_file),
                       "--out_path", str(int4)])
    assert exit_info.value.code == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in int4.iterdir()) == before


def test_qlora_trains_on_int4_and_merges_into_the_full_precision_model(tiny, int4, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(str(int4), dtype="fp32", cpu_only=True)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "w1", "w2"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    assert type(model.base_model.model.transformer.h[0].attn.c_attn).__name__ == "GPTQLoraLinear"
    ids = torch.tensor([tokenizer.encode(TEXT)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    model.save_pretrained(tmp_path / "adapter")

    # The adapter trained on Int4 goes onto the matching full-precision checkpoint, and merges into it.
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        unmerged = adapted(ids).logits
        merged_model = adapted.merge_and_unload()
        merged = merged_model(ids).logits
    assert (unmerged - before).abs().max() > 1e-2  # the adapter changes the model
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert not any("lora" in name for name, _ in merged_model.named_parameters())


def test_finetune_q_lora_on_an_int4_checkpoint_then_merge_into_the_full_model(tiny, int4, calibration_file, tmp_path):
    """finetune.py --q_lora on a GPTQ Int4 checkpoint trains LoRA on the GPTQ layers (not bitsandbytes), and
    merge-lora --base writes the adapter into the matching full-precision checkpoint."""
    from transformers import HfArgumentParser

    from qwen.convert import main as convert_main
    from qwen.sft import ARGUMENT_CLASSES, load_for_training, modernize_argv
    from qwen.sft import train as run

    argv = ["--model_name_or_path", str(int4), "--data_path", str(calibration_file), "--output_dir",
            str(tmp_path / "adapter"), "--use_lora", "True", "--q_lora", "True", "--lora_r", "8",
            "--learning_rate", "2e-2", "--max_steps", "6", "--per_device_train_batch_size", "8", "--report_to", "none",
            "--logging_steps", "1", "--save_strategy", "no", "--model_max_length", "64"]  # fmt: skip
    model_args, _, training_args, lora_args = HfArgumentParser(ARGUMENT_CLASSES).parse_args_into_dataclasses(
        modernize_argv(argv)
    )
    model, _ = load_for_training(model_args, training_args, lora_args)
    assert type(model.base_model.model.transformer.h[0].attn.c_attn).__name__ == "GPTQLoraLinear"
    del model
    run(*HfArgumentParser(ARGUMENT_CLASSES).parse_args_into_dataclasses(modernize_argv(argv)))
    state = json.loads((tmp_path / "adapter" / "trainer_state.json").read_text(encoding="utf-8"))
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[-1] < losses[0], losses

    assert convert_main(["merge-lora", str(tmp_path / "adapter"), str(tmp_path / "refused")]) == 2  # Int4 base
    assert convert_main(["merge-lora", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--base", str(tiny)]) == 0
    merged, tokenizer = load_model_and_tokenizer(str(tmp_path / "merged"), cpu_only=True)
    original, _ = load_model_and_tokenizer(str(tiny), cpu_only=True)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert (merged(ids).logits - original(ids).logits).abs().max() > 1e-3  # the adapter is in the weights
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())

def test_run_gptq_defaults_to_the_demo_model(demo_checkpoint, int4, calibration_file, capsys):
    """Without --model_name_or_path, as every other script: the offline demo model (here up to the output check)."""
    sys.path.insert(0, str(REPO))
    import run_gptq

    with pytest.raises(SystemExit) as exit_info:
        run_gptq.main(["--data_path", str(calibration_file), "--out_path", str(int4)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Running the offline demo model" in err and f"Quantizing {demo_checkpoint} to GPTQ Int4" in err
    assert "exists and is not empty" in err
