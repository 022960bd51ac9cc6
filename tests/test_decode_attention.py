"""qwen::decode_attention (qwen/cpu_kernels.cpp): one query a row against a cache's keys and values, split over the
keys and merged; the same attention as softmax(q K^T * scale + mask) V, wherever the cache keeps its tensors."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import build_engine_model, generate_logprobs, generate_tokens, tiny_model

from qwen import cpu_kernels
from qwen.cpu_kernels import DECODE_ATTENTION, cpu_decode_attention, use_cpu_decode_attention
from qwen.cpu_kernels import cpu_kernels as loaded_kernels
from qwen.engine import Engine, SamplingParams, TokenEvent

MIN = torch.finfo(torch.float32).min


def reference(query, key, value, mask, scale):
    """softmax(q K^T * scale + mask) V in float64, grouped queries sharing their kv head -> [n, 1, heads, D]."""
    group = query.shape[1] // key.shape[1]
    key, value = (x.double().repeat_interleave(group, dim=1) for x in (key, value))
    scores = query.double() @ key.transpose(2, 3) * scale
    if mask is not None:
        scores = scores + mask.double()
    return (scores.softmax(-1) @ value).transpose(1, 2)


def cache_views(n, kv_heads, width, dim, capacity):
    """Keys and values as the engine's cache gives them: the first `width` columns of bigger storage."""
    storage = [torch.randn(n + 1, kv_heads, capacity, dim) for _ in range(2)]
    return [x[:n, :, :width] for x in storage]


@pytest.mark.parametrize("n, heads, kv_heads, dim, width", [
    (1, 9, 9, 64, 1),  # one key
    (1, 9, 9, 64, 5),
    (1, 9, 9, 64, 100),  # two chunks of 64 and 36 (18 items for 2 threads)
    (3, 4, 4, 128, 600),  # chunks of 64, the last one short
    (1, 2, 2, 32, 3000),  # chunks of 512, the most a chunk holds
    (2, 8, 2, 16, 70),  # grouped queries: 4 heads a kv head
])
def test_it_computes_attention(n, heads, kv_heads, dim, width):
    assert loaded_kernels() is not None
    torch.manual_seed(0)
    key, value = cache_views(n, kv_heads, width, dim, capacity=width + 37)
    query = torch.randn(n, 1, 3, heads, dim).transpose(1, 3)[:, :, 0]  # strided, as sliced from a fused qkv
    mask = torch.zeros(n, 1, 1, width)
    mask[0, ..., width // 2 + 1 :] = MIN  # the first row sees half of the columns
    scale = dim**-0.5
    for m in (mask, None, mask[:1]):  # per row, none, one for all rows
        got = torch.ops.qwen.decode_attention(query, key, value, m, scale)
        assert got.shape == (n, 1, heads, dim) and got.is_contiguous()
        torch.testing.assert_close(got.double(), reference(query, key, value, m, scale), rtol=1e-5, atol=1e-5)


def test_keys_the_mask_blocks_are_not_read():
    """Blocked keys may hold anything (a slot's stale columns): NaN there changes nothing, so they were not read.
    A row that sees nothing (a free slot inside the batch's range) gets zeros."""
    torch.manual_seed(0)
    key, value = cache_views(3, 3, 700, 64, capacity=768)
    query = torch.randn(3, 3, 1, 64)
    mask = torch.zeros(3, 1, 1, 700)
    mask[0, ..., 150:] = MIN  # row 0 sees columns 0-149
    mask[1] = MIN  # row 1 sees nothing
    mask[2, ..., 300:310] = float("-inf")  # row 2 has a hole
    expected = reference(query, key, value, mask, 0.125)
    for x in (key, value):
        x[0, :, 150:] = float("nan")
        x[1] = float("nan")
        x[2, :, 300:310] = float("nan")
    got = torch.ops.qwen.decode_attention(query, key, value, mask, 0.125)
    torch.testing.assert_close(got[[0, 2]].double(), expected[[0, 2]], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_it_refuses_what_it_cannot_compute():
    key, value = cache_views(1, 2, 10, 64, capacity=16)
    with pytest.raises(RuntimeError, match="needs fp32 q"):
        torch.ops.qwen.decode_attention(torch.randn(1, 2, 2, 64), key, value, None, 0.125)  # two queries a row
    with pytest.raises(RuntimeError, match="needs fp32 q"):
        torch.ops.qwen.decode_attention(torch.randn(1, 3, 1, 64), key, value, None, 0.125)  # 3 heads on 2 kv heads
    with pytest.raises(RuntimeError, match="the mask must be an additive fp32"):
        torch.ops.qwen.decode_attention(torch.randn(1, 2, 1, 64), key, value, torch.zeros(1, 1, 1, 9), 0.125)
    empty = torch.ops.qwen.decode_attention(torch.randn(0, 2, 1, 64), key[:0], value[:0], None, 0.125)
    assert empty.shape == (0, 1, 2, 64)  # an empty batch: an empty answer (it divided by zero: SIGFPE)


def test_the_interface_sends_the_rest_to_sdpa():
    """Many queries a row (a prefill), bool masks, other dtypes: what sdpa computes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attention(torch.nn.Module):
        is_causal = True

    module = Attention()
    torch.manual_seed(0)
    key, value = torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    sees = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    sees[1, ..., 6:] = False
    query = torch.randn(2, 4, 1, 16)
    got, _ = cpu_decode_attention(module, query, key, value, sees, scaling=0.25)  # a bool mask: converted
    expected, _ = sdpa_attention_forward(module, query, key, value, sees, scaling=0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    prefill = torch.randn(2, 4, 5, 16)
    got, _ = cpu_decode_attention(module, prefill, key, value, None, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, prefill, key, value, None, scaling=0.25)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # what the op does not compute goes to sdpa whole (bit-equal), not to an error or a wrong answer
    wide_values = torch.randn(2, 4, 12, 32)  # values of another head size than the keys (DeepSeek-V3's 192 / 128)
    bias = torch.randn(2, 4, 1, 12)  # an additive term sdpa_attention_forward adds (position_bias)
    asks_grad = query.clone().requires_grad_()  # the op has no backward
    for q, v, kwargs in ((query, wide_values, {}), (query, value, {"position_bias": bias}), (asks_grad, value, {})):
        got, _ = cpu_decode_attention(module, q, key, v, None, scaling=0.25, **kwargs)
        expected, _ = sdpa_attention_forward(module, q, key, v, None, scaling=0.25, **kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got.sum().backward()
    assert asks_grad.grad is not None and asks_grad.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["qwen", "llama"])  # QWen's own attention, and transformers' Llama (grouped queries)
def test_the_engine_decodes_with_it_and_answers_as_without_it(arch):
    plain = build_engine_model(arch)
    model = build_engine_model(arch)  # the same weights (seeded)
    engine = Engine(model, max_batch_size=4)
    assert model.config._attn_implementation == DECODE_ATTENTION
    assert plain.config._attn_implementation == "sdpa"
    decodes, decode = [], engine._decode
    engine._decode = lambda seqs: decodes.append(len(seqs)) or decode(seqs)  # counts the decode forwards
    prompts = [[5, 6, 7], list(range(20, 31)), [9]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        handles = [engine.submit(p, SamplingParams(max_new_tokens=12, temperature=0, logprobs=True)) for p in prompts]
        while engine.num_running or engine.num_waiting:
            engine.step()
    calls = [e for e in profile.events() if e.name == "qwen::decode_attention"]
    assert len(decodes) >= 9 and len(calls) == len(decodes) * plain.config.num_hidden_layers  # every step, layer
    for handle, prompt in zip(handles, prompts, strict=True):
        tokens = [e for e in handle if isinstance(e, TokenEvent)]
        assert [e.token_id for e in tokens] == generate_tokens(plain, prompt, 12)
        assert [e.logprob for e in tokens] == pytest.approx(generate_logprobs(plain, prompt, 12), abs=1e-4)


def test_only_cpu_fp32_models_attending_with_sdpa_take_it():
    model = build_engine_model("qwen").to(torch.bfloat16)
    assert not use_cpu_decode_attention(model) and model.config._attn_implementation == "sdpa"
    model = build_engine_model("qwen")
    model.set_attn_implementation("eager")  # asked for (e.g. to output attention weights): kept
    assert not use_cpu_decode_attention(model) and model.config._attn_implementation == "eager"


def test_the_compiled_decode_step_calls_it_in_one_graph():
    """Inside the engine's compiled step the op is one call a layer of one graph: no graph break around it (loading
    the kernels inside the traced function broke the graph into pieces: 30% slower at short contexts)."""
    from torch._inductor.utils import run_and_get_code

    from qwen.compiled_decode import decode_logits
    from qwen.packed_linear import pack_linear_weights

    model = tiny_model()  # seq_length 64: no dynamic NTK at these widths (a width past it takes the eager step)
    pack_linear_weights(model)
    assert use_cpu_decode_attention(model)
    n, width, layers = 2, 9, model.config.num_hidden_layers
    keys = [torch.randn(n, 4, 16, 16) for _ in range(layers)]
    values = [torch.randn(n, 4, 16, 16) for _ in range(layers)]
    columns = torch.tensor([[8], [5]])
    mask = torch.zeros(n, 1, 1, width)
    mask[1, ..., 6:] = MIN
    ids = torch.tensor([[3], [4]])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(decode_logits, dynamic=True, fullgraph=True)  # fullgraph: a graph break raises
    with torch.inference_mode():
        expected = decode_logits(model, ids, columns, mask, columns, [k.clone() for k in keys],
                                 [v.clone() for v in values])  # fmt: skip
        got, codes = run_and_get_code(step, model, ids, columns, mask, columns, keys, values)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    code = "\n".join(codes)
    assert code.count("torch.ops.qwen.decode_attention.default(") == layers


def test_the_avx2_build_computes_attention_too(tmp_path):
    """Built for AVX2 + FMA (8 floats a vector) in a process of its own, the op computes the same attention."""
    code = (
        "import torch, qwen.cpu_kernels as ck\n"
        "ck.KERNEL_FLAGS = tuple('-march=haswell' if f.startswith('-march') else f for f in ck.KERNEL_FLAGS)\n"
        "assert ck.cpu_kernels() is not None\n"
        "torch.manual_seed(0)\n"
        "q, k, v = torch.randn(2, 6, 1, 24), torch.randn(2, 3, 300, 24), torch.randn(2, 3, 300, 24)\n"
        "m = torch.zeros(2, 1, 1, 300); m[1, ..., 100:] = torch.finfo(torch.float32).min\n"
        "kk, vv = (x.double().repeat_interleave(2, dim=1) for x in (k, v))\n"
        "ref = ((q.double() @ kk.transpose(2, 3) * 0.2 + m.double()).softmax(-1) @ vv).transpose(1, 2)\n"
        "torch.testing.assert_close(torch.ops.qwen.decode_attention(q, k, v, m, 0.2).double(), ref, rtol=1e-5, "
        "atol=1e-5)\nprint('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})  # fmt: skip
    assert done.stdout.strip() == "ok", done.stderr[-3000:]
    assert [p.name.startswith("cpu_kernels-") for p in (tmp_path / "qwen" / "kernels").iterdir()] == [True]


def test_the_kernels_library_serves_both_ops():
    kernels = torch._C._dispatch_dump("qwen::decode_attention")
    assert loaded_kernels() is not None and cpu_kernels.KERNEL_SOURCE.name in kernels.split("CPU: registered at")[1]


def test_rows_a_decode_step_does_not_feed_see_no_column():
    """A row still prefilling rides along in the decode forward with a dummy token: it sees no column, so
    attention reads nothing for it (not its whole prompt so far), and its answer is still generate()'s."""
    plain, model = build_engine_model("llama"), build_engine_model("llama")  # no NTK: long prompts are chunked
    engine = Engine(model, max_batch_size=4, prefill_chunk=4)
    masks, attention_mask = [], engine._cache.attention_mask
    engine._cache.attention_mask = lambda plan, visible, *a: masks.append(
        (plan.tokens, [s.slot for s in engine._rows if not s.decoding], attention_mask(plan, visible, *a))
    ) or masks[-1][2]
    first = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=10, temperature=0))
    engine.step()
    second = engine.submit(list(range(20, 40)), SamplingParams(max_new_tokens=3, temperature=0))
    while engine.num_running or engine.num_waiting:
        engine.step()
    riding = [(mask, prefilling) for tokens, prefilling, mask in masks if tokens == 1 and prefilling]
    assert riding  # decode steps while the second prompt was being read
    for mask, prefilling in riding:
        assert prefilling == [1] and mask.shape[0] == 2
        assert (mask[1] == MIN).all() and (mask[0] == 0).any()  # slot 1 sees nothing, slot 0 its own columns
    for handle, prompt, n in ((first, [5, 6, 7], 10), (second, list(range(20, 40)), 3)):
        assert [e.token_id for e in handle if isinstance(e, TokenEvent)] == generate_tokens(plain, prompt, n)
