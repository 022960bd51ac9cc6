"""Packed linear weights (qwen.packed_linear: our blocked kernel for fp32, oneDNN's layout otherwise): the same
model, the same answers, only faster."""

import argparse
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from qwen import cpu_kernels
from qwen.checkpoints import make_tiny_checkpoint
from qwen.cpu_kernels import TILE, KernelBuildError, load_cpu_kernels
from qwen.loading import load_model_and_tokenizer
from qwen.packed_linear import PackedLinear, pack_linear_weights, to_blocked, why_not_packable
from qwen.scripts import add_checkpoint_args, load_checkpoint


def linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear], [m for m in model.modules() if isinstance(m, PackedLinear)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("packed") / "tiny")


def test_a_packed_qwen_computes_what_the_plain_one_does(tiny):
    plain, _ = load_model_and_tokenizer(str(tiny), cpu_only=True)
    packed, _ = load_model_and_tokenizer(str(tiny), cpu_only=True)
    before = len(linears(packed)[0])
    assert pack_linear_weights(packed) == before > 0
    assert linears(packed) == ([], linears(packed)[1]) and len(linears(packed)[1]) == before
    assert {layer.layout for layer in linears(packed)[1]} == {"blocked"}  # fp32 on a machine with a C compiler
    # the plain weights are gone: one copy of each matrix is kept, in the packed layout
    assert sum(p.numel() for p in packed.parameters()) < sum(p.numel() for p in plain.parameters())
    ids = torch.randint(0, 1000, (3, 11))
    with torch.inference_mode():
        expected, got = plain(ids).logits, packed(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_the_demo_model_answers_the_same_when_packed(demo_checkpoint):
    from qwen_generation_utils import make_context

    plain, tokenizer = load_model_and_tokenizer(str(demo_checkpoint))
    packed, _ = load_model_and_tokenizer(str(demo_checkpoint))
    pack_linear_weights(packed)
    _, ids = make_context(tokenizer, "What is the capital of France?", system="You are a helpful assistant.")
    inputs = torch.tensor([ids])
    outputs = [m.generate(inputs, max_new_tokens=24, do_sample=False)[0, len(ids):].tolist() for m in (plain, packed)]
    assert outputs[0] == outputs[1]
    assert "Paris" in tokenizer.decode(outputs[1])


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 17, 48, 53])
@pytest.mark.parametrize("out_features, in_features, bias",
                         [(300, 64, True), (TILE, 33, False), (5, 1, True), (TILE + 20, 7, True)])
def test_the_blocked_kernel_computes_the_product(rows, out_features, in_features, bias):
    """Every row count the kernel's row passes split differently (8 at a time with AVX-512, 2 with AVX2; from 48
    rows, AVX2, 6 at a time over half tiles), a last tile of weight rows that is partly padding (one of whose halves
    is all padding, or partly), an odd and a length-1 inner dimension, with and without bias."""
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = PackedLinear(linear)
    assert layer.layout == "blocked"
    x = torch.randn(rows, 2, in_features).transpose(0, 1)  # [2, rows, in], not contiguous
    with torch.inference_mode():
        expected, got = linear(x), layer(x)
    assert got.shape == (2, rows, out_features)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


BF16 = pytest.param(torch.bfloat16, "onednn", marks=pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 support in oneDNN"))


@pytest.mark.parametrize("dtype, layout", [(torch.float32, "blocked"), BF16])
def test_rows_do_not_depend_on_the_rest_of_the_batch(dtype, layout):
    """What the engine's batching relies on: a row's output is the same alone, among 8 and among 60 (a prompt
    chunk's pass), in both layouts."""
    torch.manual_seed(0)
    layer = PackedLinear(nn.Linear(64, 300).to(dtype))
    assert layer.layout == layout
    x = torch.randn(60, 1, 64, dtype=dtype)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(60)])
        assert torch.equal(layer(x[:8]), alone[:8])
        assert torch.equal(layer(x), alone)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_row_reads_tiles_in_groups_and_gets_the_batch_s_answer(threads):
    """One row takes its own path (each thread's tiles read 3 at a time on AVX2): every group size, a partial last
    tile and uneven thread shares give the product, bit-equal to that row's among 8 rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_features in (5, TILE, 70, 96, 300, 11 * TILE):
            torch.manual_seed(out_features)
            linear = nn.Linear(48, out_features)
            layer = PackedLinear(linear)
            x = torch.randn(8, 48)
            with torch.inference_mode():
                alone, together = layer(x[:1]), layer(x)[:1]
            torch.testing.assert_close(alone, linear(x[:1]), rtol=1e-5, atol=1e-5)
            assert torch.equal(alone, together), out_features
    finally:
        torch.set_num_threads(before)


def test_what_is_not_packed():
    class Adapter(nn.Linear):  # a subclass (quantized or adapter layer) is somebody else's kernel
        pass

    model = nn.Sequential(nn.Linear(8, 8), Adapter(8, 8))
    assert pack_linear_weights(model) == 1 and type(model[1]) is Adapter
    half = nn.Sequential(nn.Linear(8, 8)).half()
    assert why_not_packable(half) == "its weights are float16" and pack_linear_weights(half) == 0
    assert type(half[0]) is nn.Linear


@pytest.mark.parametrize("layout, packed", [([], True), (["--weight-layout", "plain"], False)])
def test_the_scripts_pack_unless_told_not_to(tiny, layout, packed):
    parser = argparse.ArgumentParser()
    add_checkpoint_args(parser)
    model, _ = load_checkpoint(parser.parse_args(["-c", str(tiny), "--cpu-only", *layout]))
    plain_left, packed_layers = linears(model)
    assert bool(packed_layers) == packed and bool(plain_left) != packed


def test_without_a_compiler_layers_take_the_onednn_layout_and_say_why_once():
    """CXX names no program: one warning, every layer packed for oneDNN, the same outputs."""
    code = (
        "import torch; from torch import nn; from qwen.packed_linear import PackedLinear\n"
        "torch.manual_seed(0); linears = [nn.Linear(16, 40) for _ in range(3)]\n"
        "layers = [PackedLinear(linear) for linear in linears]; x = torch.randn(2, 16)\n"
        "with torch.inference_mode():\n"
        "    assert all(torch.allclose(layer(x), linear(x), atol=1e-5) for layer, linear in zip(layers, linears))\n"
        "print(sorted({layer.layout for layer in layers}))\n"
        "from qwen.cpu_kernels import KernelBuildError\n"
        "try:\n    PackedLinear(linears[0], 'blocked')\nexcept KernelBuildError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CXX": "no-such-compiler"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['onednn']", "the blocked layout's kernel could not be built here (the "
                                        "warning above says why)"]
    warnings = [line for line in done.stderr.splitlines() if "CPU kernels are not available" in line]
    assert len(warnings) == 1 and "no C++ compiler 'no-such-compiler' (set CXX)" in warnings[0]


def test_a_failed_build_says_what_the_compiler_said(tmp_path, monkeypatch):
    compiler = tmp_path / "broken-c++"
    # writes half a library where it was asked to, then fails
    compiler.write_text('#!/bin/sh\neval out=\\${$#}\necho half > "$out"\n'
                        "echo 'cpu_kernels.cpp:1: error: no vectors here' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(KernelBuildError, match=r"broken-c\+\+ failed: cpu_kernels.cpp:1: error: no vectors here"):
        load_cpu_kernels(str(compiler))
    assert not list((tmp_path / "cache" / "qwen" / "kernels").iterdir())  # no partial library left for later


def test_the_build_is_kept_per_source_and_cpu(tmp_path, monkeypatch):
    """Built once into the cache, then loaded from it: the compiler is not run again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    load_cpu_kernels("c++")
    built = list((tmp_path / "cache" / "qwen" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    log = tmp_path / "calls"
    counting = tmp_path / "counting-c++"
    counting.write_text(f"#!/bin/sh\necho run >> {log}\nexec c++ \"$@\"\n")
    counting.chmod(0o755)
    load_cpu_kernels(str(counting))  # another compiler: another library
    load_cpu_kernels(str(counting))
    assert log.read_text() == "run\n" and len(list(built[0].parent.iterdir())) == 2


@pytest.mark.parametrize("march", ["haswell", "native"])  # AVX2 + FMA (2 rows a pass), and this machine's best
def test_each_instruction_set_s_build_computes_the_product(march, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "KERNEL_FLAGS", tuple(
        f"-march={march}" if flag.startswith("-march") else flag for flag in cpu_kernels.KERNEL_FLAGS))
    kernel = load_cpu_kernels("c++")
    torch.manual_seed(0)
    weight, bias = torch.randn(70, 45), torch.randn(70)
    blocked = to_blocked(weight)
    for rows in (1, 2, 3, 9, 49):
        x = torch.randn(rows, 45)
        y = torch.full((rows, 70), float("nan"))
        kernel.blocked_linear(x.data_ptr(), rows, 45, blocked.data_ptr(), bias.data_ptr(), 70, y.data_ptr())
        torch.testing.assert_close(y, x @ weight.T + bias, rtol=1e-5, atol=1e-5)


def test_a_cpu_without_avx2_gets_the_onednn_layout(tmp_path, monkeypatch):
    """Built for the x86-64 baseline (SSE only), the kernel refuses: it was measured slower than oneDNN there."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "KERNEL_FLAGS", tuple(
        "-march=x86-64" if flag.startswith("-march") else flag for flag in cpu_kernels.KERNEL_FLAGS))
    with pytest.raises(KernelBuildError, match="need AVX-512, or AVX2 with FMA"):
        load_cpu_kernels("c++")


def test_the_compiled_graph_calls_the_kernel_without_python(tmp_path):
    """qwen::blocked_linear's CPU kernel is the C++ function of cpu_kernels.cpp (not a Python function the graph
    would call back into), and inductor keeps it as one call in the graph it compiles."""
    layer = PackedLinear(nn.Linear(40, 70))
    assert layer.layout == "blocked"
    kernels = torch._C._dispatch_dump("qwen::blocked_linear")
    assert "CPU: registered at" in kernels and "cpu_kernels.cpp" in kernels.split("CPU: registered at")[1]
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(3, 40)
    with torch.inference_mode():
        got, (code,) = run_and_get_code(torch.compile(lambda x: layer(x).relu(), dynamic=True), x)
        torch.testing.assert_close(got, layer(x).relu())
    assert code.count("torch.ops.qwen.blocked_linear.default(") == 1


def test_the_op_refuses_a_weight_that_is_not_blocked_for_its_input():
    """A mismatched weight would read past its end: the op says what is wrong instead."""
    layer = PackedLinear(nn.Linear(40, 70))
    with pytest.raises(RuntimeError, match=r"not a blocked \[tiles, 41, 32\] tensor for 70 outputs"):
        torch.ops.qwen.blocked_linear(torch.randn(2, 41), layer.packed_weight, layer.bias, 70)
    with pytest.raises(RuntimeError, match="a blocked fp32 layer got BFloat16 inputs"):
        layer(torch.randn(2, 40, dtype=torch.bfloat16))
