"""The int8 KV cache (use_cache_quantization): the original's per-token scheme, its size, and that generate(),
chat(), the engine and dynamic NTK recompute work with it."""

import torch
from conftest import left_padded_batch, tiny_model
from transformers import DynamicCache

from qwen.compat import cache_kwargs, output_cache
from qwen.engine import Engine, SamplingParams
from qwen.kv_cache import Int8KVCache, Int8KVLayer, cache_nbytes, quantize_per_token
from qwen.slot_cache import Int8Store


def original_scheme(x: torch.Tensor):
    """The 2023 quantize_cache_v on [B, H, T, D]: per position, min/max over all heads' dims, 255 steps."""
    batch, heads, length, dim = x.shape
    per_position = x.transpose(1, 2).reshape(batch, length, heads * dim)  # the original's [b, s, head*dim]
    low, high = per_position.min(-1).values, per_position.max(-1).values
    scale = (high - low) / 255
    zero = 0 - low / scale
    return scale.view(batch, 1, length, 1), zero.view(batch, 1, length, 1)


def test_per_token_scale_and_zero_are_the_originals_and_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 50, 16) * torch.linspace(0.1, 5, 50)[:, None]  # positions of very different ranges
    q, scale, zero = quantize_per_token(x)
    expected_scale, expected_zero = original_scheme(x)
    torch.testing.assert_close(scale, expected_scale)
    torch.testing.assert_close(zero, expected_zero)
    assert q.dtype == torch.uint8 and q.shape == x.shape and scale.shape == (2, 1, 50, 1)
    error = scale * (q.float() - zero) - x
    assert (error.abs() <= scale / 2 + 1e-6).all()  # round to nearest: at most half a step
    assert error.mean().abs() < 0.05 * scale.mean()  # no truncation bias (the original's .to(uint8) had one)


def test_a_constant_position_survives():
    x = torch.full((1, 2, 3, 4), 0.5)
    q, scale, zero = quantize_per_token(x)
    torch.testing.assert_close(scale * (q.float() - zero), x)


def test_int8_cache_holds_a_quarter_of_fp32_and_half_of_bf16():
    model = tiny_model(hidden_size=128, kv_channels=32, use_cache_quantization=True)  # 128 dims per position
    ids, mask = left_padded_batch([30, 30])
    with torch.no_grad():
        int8 = output_cache(model(ids, attention_mask=mask, use_cache=True))
        assert isinstance(int8, Int8KVCache) and all(isinstance(layer, Int8KVLayer) for layer in int8.layers)
        fp32 = output_cache(model(ids, attention_mask=mask, use_cache=True, **cache_kwargs(DynamicCache())))
        bf16 = output_cache(model.bfloat16()(ids, attention_mask=mask, use_cache=True, **cache_kwargs(DynamicCache())))
    assert int8.get_seq_length() == fp32.get_seq_length() == bf16.get_seq_length() == 30
    # per position and layer: 128 uint8 + fp32 scale and zero, against 128 x 4 or 128 x 2 bytes, keys and values
    assert cache_nbytes(int8) / cache_nbytes(fp32) <= 0.30
    assert cache_nbytes(int8) / cache_nbytes(bf16) <= 0.55


def test_generate_with_the_int8_cache_equals_without_on_the_demo_model(demo_checkpoint):
    """64 greedy tokens with and without the int8 cache (measured equal on the demo model: the quantization error
    moves logits by ~1e-2, far below the gaps between the demo model's greedy choices on this prompt)."""
    from qwen.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(demo_checkpoint), dtype="fp32", cpu_only=True)
    ids = torch.tensor([tokenizer.encode("The history of the Roman Empire begins with")])
    greedy = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, repetition_penalty=1.0)
    cache = Int8KVCache()
    with torch.no_grad():
        plain = model.generate(ids, **greedy)
        quantized = model.generate(ids, **greedy, **cache_kwargs(cache))
    assert cache.get_seq_length() == ids.shape[1] + 63 and cache.layers[0].key_q.dtype == torch.uint8
    assert quantized.tolist() == plain.tolist()


def test_config_flag_alone_selects_the_int8_cache_in_generate_and_chat(demo_tokenizer):
    model = tiny_model(use_cache_quantization=True, vocab_size=len(demo_tokenizer))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        assert isinstance(output_cache(out), Int8KVCache)
        model.generation_config.chat_format = "chatml"
        response, history = model.chat(demo_tokenizer, "Hello", history=None, max_new_tokens=3, do_sample=False)
    assert history == [("Hello", response)]


def test_engine_batches_rows_of_the_int8_cache():
    model = tiny_model(use_cache_quantization=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18], [3, 4, 5]]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    engine = Engine(model, max_batch_size=4)
    handles = [engine.submit(prompts[0], params), engine.submit(prompts[1], params)]
    engine.step()
    engine.step()
    handles += [engine.submit(prompts[2], params), engine.submit(prompts[3], params)]  # merged into the batch
    while any(not h.finished for h in handles):
        engine.step()
        assert isinstance(engine._cache.store, Int8Store)  # the engine's slot cache keeps uint8 rows
        assert all(layer.tensors[0].dtype == torch.uint8 for layer in engine._cache.layers if layer.tensors)
    for prompt, handle in zip(prompts, handles, strict=True):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert handle.result()[0] == alone[0, len(prompt):].tolist()


def test_dynamic_ntk_recomputes_the_int8_cache_across_boundaries():
    """generate() rebuilds the cache when the NTK alpha changes; afterwards layer 0's cached keys are the keys of
    the final alpha (they depend on token, position and alpha only), within half a quantization step."""
    model = tiny_model(seq_length=16, use_cache_quantization=True)  # alpha 3 from 17 tokens, 7 from 33
    ids = torch.tensor([[7, 3, 9, 11, 2, 5, 8, 1, 4, 6]])
    cache = Int8KVCache()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
        length = cache.get_seq_length()
        fresh = DynamicCache()
        model(out[:, :length], use_cache=True, **cache_kwargs(fresh))
    assert length == out.shape[1] - 1 > 32
    layer = cache.layers[0]
    keys = layer.key_scale * (layer.key_q.float() - layer.key_zero)
    assert ((keys - fresh.layers[0].keys).abs() <= layer.key_scale / 2 + 1e-5).all()
