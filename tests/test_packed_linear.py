"""Linear weights packed for oneDNN (qwen.packed_linear): the same model, the same answers, only faster."""

import argparse

import pytest
import torch
from torch import nn

from qwen.checkpoints import make_tiny_checkpoint
from qwen.loading import load_model_and_tokenizer
from qwen.packed_linear import PackedLinear, pack_linear_weights, why_not_packable
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


def test_rows_do_not_depend_on_the_rest_of_the_batch():
    """What the engine's batching relies on: a row's output is the same alone and among 8."""
    torch.manual_seed(0)
    layer = PackedLinear(nn.Linear(64, 300))
    x = torch.randn(8, 1, 64)
    with torch.inference_mode():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(8)])
    assert torch.equal(together, alone)


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
