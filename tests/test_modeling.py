"""QWen architecture: config keys, checkpoint names, parity with transformers' Qwen2/Llama, cache, long context."""

import json
import math

import pytest
import torch
from conftest import TINY_VOCAB, left_padded_batch, tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM

from qwen.compat import cache_kwargs, output_cache
from qwen.compiled_decode import decode_logits
from qwen.configuration_qwen import QWenConfig
from qwen.modeling_qwen import QWenLMHeadModel, dynamic_ntk_alpha, logn_query_scale, native_cuda_dtype
from qwen.slot_cache import SlotCache
from qwen.weights import llama_to_qwen, qwen_to_qwen2


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def qwen2_twin(model: QWenLMHeadModel) -> Qwen2ForCausalLM:
    qwen2_config, state_dict = qwen_to_qwen2(model.config, model.state_dict())
    twin = Qwen2ForCausalLM(qwen2_config).eval()
    missing, unexpected = twin.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return twin


# ---------------------------------------------------------------------------------------------------------------
# Config and checkpoint layout


def test_legacy_config_keys_map_to_final_names_and_unknown_keys_are_kept():
    legacy = dict(
        n_embd=64, n_head=4, n_layer=2, n_positions=6144, ffn_hidden_size=192, padded_vocab_size=160,
        vocab_size=151, embd_pdrop=0.1, attn_pdrop=0.2, seq_length=2048, kv_channels=16,
        layer_norm_epsilon=1e-5, rotary_emb_base=10000, bias_dropout_fusion=True, onnx_safe=None,
    )  # fmt: skip
    config = QWenConfig(**legacy)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 4, 2)
    assert (config.max_position_embeddings, config.intermediate_size) == (6144, 192)
    assert config.vocab_size == 160  # the embedding was sized from padded_vocab_size
    assert (config.emb_dropout_prob, config.attn_dropout_prob) == (0.1, 0.2)
    assert config.bias_dropout_fusion is True and config.onnx_safe is None
    assert config.n_embd == 64  # old names still read


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(use_flash_attn="auto", auto_map={"AutoConfig": "configuration_qwen.QWenConfig"})
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen" and saved["seq_length"] == 64 and "auto_map" in saved
    assert QWenConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_missing_seq_length_is_a_clear_error():
    with pytest.raises(ValueError, match="seq_length"):
        QWenLMHeadModel(tiny_config(seq_length=None))


def test_parameter_names_match_the_hub_checkpoints():
    names = set(tiny_model().state_dict())
    per_layer = ["ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "ln_2.weight",
                 "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight"]  # fmt: skip
    expected = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    expected |= {f"transformer.h.{i}.{name}" for i in range(2) for name in per_layer}
    assert names == expected  # rotary inv_freq is not persistent, c_attn has the only bias


def test_mlp_is_c_proj_of_w1_times_silu_w2():
    mlp = tiny_model().transformer.h[0].mlp
    x = torch.randn(3, 64)
    expected = mlp.c_proj(mlp.w1(x) * torch.nn.functional.silu(mlp.w2(x)))
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.w1.out_features == 192 // 2


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers' own implementations (below seq_length, where NTK and logN do not act)


def test_parity_with_qwen2_one_sequence():
    model = tiny_model()
    twin = qwen2_twin(model)
    ids = torch.randint(0, TINY_VOCAB, (1, 40))
    with torch.no_grad():
        assert (model(ids).logits - twin(ids).logits).abs().max() <= 1e-4


def test_parity_with_qwen2_left_padded_batch():
    model = tiny_model()
    twin = qwen2_twin(model)
    ids, mask = left_padded_batch([30, 17, 5])
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits  # positions derived from the mask
        theirs = twin(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


def test_parity_with_qwen2_incremental_decoding():
    model = tiny_model()
    twin = qwen2_twin(model)
    ids = torch.randint(0, TINY_VOCAB, (2, 24))
    with torch.no_grad():
        ours = model(ids[:, :10], use_cache=True)
        theirs = twin(ids[:, :10], use_cache=True)
        for t in range(10, 24):
            ours = model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(output_cache(ours)))
            theirs = twin(ids[:, t : t + 1], use_cache=True, **cache_kwargs(output_cache(theirs)))
            assert (ours.logits - theirs.logits).abs().max() <= 1e-4
        full = model(ids).logits[:, -1]
    assert (ours.logits[:, -1] - full).abs().max() <= 1e-4


def test_parity_with_qwen2_greedy_generation():
    model = tiny_model()
    twin = qwen2_twin(model)
    ids, mask = left_padded_batch([12, 7])
    kwargs = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    ours = model.generate(ids, **kwargs)
    theirs = twin.generate(ids, **kwargs)
    assert ours.shape == (2, 12 + 32)
    assert torch.equal(ours, theirs)


def test_llama_to_qwen_matches_llama_with_gqa_and_tied_embeddings():
    torch.manual_seed(0)
    llama_config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )  # fmt: skip
    llama = LlamaForCausalLM(llama_config).eval()
    config, state_dict = llama_to_qwen(llama_config, llama.state_dict())
    assert (config.kv_channels, config.intermediate_size, config.rotary_emb_base) == (16, 192, 5000.0)
    assert config.seq_length == 128 and not config.use_dynamic_ntk and not config.use_logn_attn
    assert config.tie_word_embeddings and "lm_head.weight" not in state_dict
    model = QWenLMHeadModel(config).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) == {"lm_head.weight"}
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.count_nonzero(state_dict["transformer.h.0.attn.c_attn.bias"]) == 0
    ids = torch.randint(0, TINY_VOCAB, (2, 30))
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max() <= 1e-4


def test_batched_greedy_generation_equals_one_by_one():
    model = tiny_model()
    ids, mask = left_padded_batch([20, 9, 14])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    for row in range(3):
        alone = ids[row : row + 1, mask[row].bool()]
        single = model.generate(
            alone, attention_mask=torch.ones_like(alone), max_new_tokens=16, do_sample=False, pad_token_id=0
        )
        assert torch.equal(single[0, -16:], batched[row, -16:])


def test_chunked_prefill_on_top_of_a_cache_is_causal():
    model = tiny_model()
    ids = torch.randint(0, TINY_VOCAB, (1, 30))
    with torch.no_grad():
        first = model(ids[:, :12], use_cache=True)
        second = model(ids[:, 12:], use_cache=True, **cache_kwargs(output_cache(first)))
        full = model(ids).logits
    assert (second.logits - full[:, 12:]).abs().max() <= 1e-4


def test_explicit_position_ids_are_honoured():
    model = tiny_model()
    ids = torch.randint(0, TINY_VOCAB, (1, 10))
    gapped = torch.cat([torch.arange(5), torch.arange(9, 14)])[None]
    with torch.no_grad():
        default = model(ids).logits
        same = model(ids, position_ids=torch.arange(10)[None]).logits
        shifted = model(ids, position_ids=torch.arange(5, 15)[None]).logits  # RoPE is relative: same logits
        with_gap = model(ids, position_ids=gapped).logits
    torch.testing.assert_close(same, default)
    torch.testing.assert_close(shifted, default, rtol=0, atol=1e-4)
    assert (with_gap[:, 5:] - default[:, 5:]).abs().max() > 1e-3  # RoPE saw the given positions


# ---------------------------------------------------------------------------------------------------------------
# Long context: dynamic NTK and logN


def test_dynamic_ntk_alpha_at_and_around_boundaries():
    seq_length = 2048
    expected = {1: 1, 1024: 1, 2047: 1, 2048: 1, 2049: 3, 4096: 3, 4097: 7, 8192: 7, 8193: 15, 16385: 31}
    for key_length, alpha in expected.items():
        formula = max(2 ** math.ceil(math.log(key_length / seq_length, 2) + 1) - 1, 1)  # the original
        assert dynamic_ntk_alpha(key_length, seq_length) == alpha == formula


def test_logn_scale_at_and_around_boundaries():
    seq_length = 16
    positions = torch.tensor([0, 14, 15, 16, 31, 255])  # query p scaled by log(p + 1) / log(seq_length), >= 1
    scale = logn_query_scale(positions, seq_length)
    expected = [1.0, 1.0, 1.0, math.log(17, 16), math.log(32, 16), 2.0]
    torch.testing.assert_close(scale, torch.tensor(expected, dtype=torch.float64))


def test_ntk_base_follows_the_original_formula():
    model = tiny_model(rotary_pct=0.5)  # rotary over 8 of 16 head dims
    rotary = model.transformer.rotary_emb
    assert rotary.dim == 8
    base = 10000 * 3 ** (8 / 6)
    expected = 1.0 / (base ** (torch.arange(0, 8, 2).float() / 8))
    torch.testing.assert_close(rotary.compute_inv_freq(3), expected)


def _last_logits_with_and_without_cache(model, ids, mask, prefill):
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits[:, -1]
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        for t in range(prefill, ids.shape[1]):
            out = model(
                ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True, **cache_kwargs(output_cache(out))
            )
    return out.logits[:, -1], full


def test_long_input_same_last_logits_with_and_without_cache():
    model = tiny_model(seq_length=16)  # NTK alpha 3 and logN for 17..32 tokens
    ids, mask = left_padded_batch([30, 28])  # 20 and 18 tokens at prefill: all within alpha 3
    cached, full = _last_logits_with_and_without_cache(model, ids, mask, prefill=20)
    assert (cached - full).abs().max() <= 1e-4
    with torch.no_grad():  # and the long-context path really acted
        model.config.use_dynamic_ntk = model.config.use_logn_attn = False
        plain = model(ids, attention_mask=mask).logits[:, -1]
    assert (plain - full).abs().max() > 1e-3


def test_ntk_alpha_is_recomputed_when_generation_crosses_a_boundary(monkeypatch):
    # One layer: cached keys depend on the tokens only, so re-rotating them to the new alpha makes decoding
    # across the boundaries (16 -> 32 -> 64 tokens) exact; keeping the prefill's alpha (the original) is not.
    model = tiny_model(num_hidden_layers=1, seq_length=16)
    ids, mask = left_padded_batch([40, 33])
    cached, full = _last_logits_with_and_without_cache(model, ids, mask, prefill=10)
    assert (cached - full).abs().max() <= 1e-4
    monkeypatch.setattr(type(model.transformer), "_rerotate_cache", lambda *args: None)
    frozen, _ = _last_logits_with_and_without_cache(model, ids, mask, prefill=10)
    assert (frozen - full).abs().max() > 1e-3


def test_generation_across_ntk_boundaries_equals_generation_without_cache(monkeypatch):
    # Two layers: once the alpha changes, deeper layers' cached keys and values are stale too, so generate()
    # recomputes the cache from the ids at each boundary (16 -> 32 -> 64 tokens) and equals a cache-less run.
    model = tiny_model(num_hidden_layers=2, seq_length=16)
    ids, mask = left_padded_batch([12, 7])
    greedy = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, **greedy)
        full = model.generate(ids, attention_mask=mask, use_cache=False, **greedy)
    assert cached.sequences.tolist() == full.sequences.tolist()
    assert max((a - b).abs().max().item() for a, b in zip(cached.scores, full.scores, strict=True)) <= 1e-4
    # re-rotating cached keys alone (the fallback for hand-written loops) is not enough past one layer
    monkeypatch.setattr(type(model), "needs_cache_recompute", lambda *args: False)
    with torch.no_grad():
        patched = model.generate(ids, attention_mask=mask, **greedy)
    assert max((a - b).abs().max().item() for a, b in zip(patched.scores, full.scores, strict=True)) > 1e-3


def test_ntk_alpha_is_per_sample_in_a_batch():
    model = tiny_model(seq_length=16)
    ids, mask = left_padded_batch([40, 12])  # alpha 7 for the first row, 1 for the second
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits[:, -1]
        for row in range(2):
            alone = model(ids[row : row + 1, mask[row].bool()]).logits[:, -1]
            assert (alone - batched[row]).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Attention backends, training, save / load


def test_eager_and_sdpa_agree_and_eager_returns_attentions():
    model = tiny_model()
    ids, mask = left_padded_batch([20, 13])
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask, output_attentions=True)
    real = mask.bool()
    assert (sdpa[real] - eager.logits[real]).abs().max() <= 1e-4
    assert len(eager.attentions) == 2
    weights = eager.attentions[0]
    assert weights.shape == (2, 4, 20, 20)
    torch.testing.assert_close(weights[1, :, 7:].sum(-1), torch.ones(4, 13))
    assert torch.all(weights[0].triu(1) == 0) and torch.all(weights[1, :, 7:, 7:].triu(1) == 0)  # causal
    assert torch.all(weights[1, :, 7:, :7] == 0)  # padding never attended


def test_a_compiled_one_token_step_on_the_cpu_attends_with_two_matmuls_not_sdpa():
    """The engine's compiled decode step (one query per row) runs the matmul attention, which inductor fuses: SDPA's
    flash kernel is built for many query rows and made the demo model's step ~10% slower at 8 rows. A prompt (T > 1)
    still runs SDPA, and both give the eager logits."""
    model = tiny_model().eval()
    graphs = []

    def capture(gm, example_inputs):  # a torch.compile backend that keeps the traced graph and runs it as traced
        graphs.append(gm)
        return gm.forward

    ids = torch.randint(0, TINY_VOCAB, (2, 9))
    cache = SlotCache(2)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
        prompt = torch.compile(model, backend=capture, fullgraph=True)(ids).logits[:, -1]
        plan = cache.plan([0, 1], [list(range(8))] * 2, "cpu")  # the first 8 tokens into the engine's cache
        model(ids[:, :8], position_ids=plan.columns.clone(), use_cache=True, **cache_kwargs(cache),
              attention_mask=cache.attention_mask(plan, [list(range(8))] * 2, torch.float32, "cpu"))
        plan = cache.plan([0, 1], [[8]] * 2, "cpu")
        step = torch.compile(decode_logits, backend=capture, fullgraph=True)(
            model, ids[:, 8:], plan.columns.clone(), cache.attention_mask(plan, [[8]] * 2, torch.float32, "cpu"),
            plan.columns, *cache.storage_of(plan))
    torch._dynamo.reset()
    torch.testing.assert_close(prompt, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step, expected, atol=1e-4, rtol=1e-4)
    runs_sdpa = [any("scaled_dot_product_attention" in str(n.target) for n in g.graph.nodes) for g in graphs]
    assert runs_sdpa == [True, False]


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, TINY_VOCAB, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()  # formerly gradient_checkpointing_enable
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_training_loss_runs_the_output_layer_only_at_supervised_positions():
    ids = torch.randint(0, TINY_VOCAB, (2, 16))
    labels = ids.masked_fill(torch.arange(16) < 9, -100)  # prompts: the first 9 tokens of each row
    labels[1, 12:] = -100  # right padding
    results = []
    for skip in (False, True):
        model = tiny_model().train()
        rows = []
        model.lm_head.register_forward_hook(lambda module, args, out, rows=rows: rows.append(args[0].shape[:-1].numel()))
        out = model(ids, labels=labels, skip_logits=skip, num_items_in_batch=torch.tensor(10))
        out.loss.backward()
        results.append((out.loss.detach(), model.transformer.h[0].mlp.w1.weight.grad.clone(), rows, out.logits))
    (full_loss, full_grad, full_rows, full_logits), (loss, grad, rows, logits) = results
    assert full_rows == [32] and full_logits.shape == (2, 16, TINY_VOCAB)
    assert rows == [7 + 3] and logits is None  # the labels 9..15 of row 0 and 9..11 of row 1, one step earlier
    torch.testing.assert_close(loss, full_loss)
    torch.testing.assert_close(grad, full_grad)
    assert model(ids, labels=labels).logits.shape == (2, 16, TINY_VOCAB)  # by default, as transformers' models


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded, info = QWenLMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, TINY_VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_precision_follows_config_flags_and_dtype_argument(tmp_path):
    model = tiny_model(bf16=True)
    model.save_pretrained(tmp_path)
    assert QWenLMHeadModel.from_pretrained(tmp_path).dtype == torch.bfloat16  # the config flag
    assert QWenLMHeadModel.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(bf16=False, dtype=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    auto = QWenLMHeadModel.from_pretrained(tmp_path, device_map="auto")
    assert auto.dtype == (native_cuda_dtype() if torch.cuda.is_available() else torch.float32)


def test_hub_shaped_checkpoints_load_through_the_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM

    import qwen  # noqa: F401  (registers model_type "qwen")

    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # An Aug-2023 config.json: legacy key names, remote-code auto_map, keys the model does not use.
    for legacy, final in {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
                          "ffn_hidden_size": "intermediate_size", "padded_vocab_size": "vocab_size"}.items():  # fmt: skip
        config[legacy] = config.pop(final)
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    config.update(bias_dropout_fusion=True, params_dtype="torch.bfloat16", dtype=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto", output_loading_info=True)
    assert isinstance(loaded, QWenLMHeadModel)
    # no precision flag: the GPU's native half precision, fp32 on CPU
    assert loaded.dtype == (native_cuda_dtype() if torch.cuda.is_available() else torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, TINY_VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids.to(loaded.device)).logits.cpu())
