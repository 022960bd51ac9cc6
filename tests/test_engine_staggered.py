"""Eight requests joining, leaving and being cancelled at different steps, with prompts fed in chunks, each get
exactly what they get when run alone: greedy ids and log-probabilities. Also with the decode step compiled
(qwen.compiled_decode), against the eager engine run alone."""

import time

import pytest
import torch
from conftest import build_engine_model as _build
from conftest import generate_tokens

from qwen.engine import Engine, FinishEvent, SamplingParams, TokenEvent
from qwen.packed_linear import pack_linear_weights

# (step it is submitted at, prompt, max_new_tokens); the tiny QWen's seq_length is 8, so prompts above 8 tokens
# start under dynamic NTK, and rows growing past 8 or 16 tokens cross an NTK boundary in the batch
REQUESTS = [
    (0, list(range(20, 27)), 12),  # 7 tokens: two chunks of 4 + 3, then crosses 8 and 16 while decoding
    (0, [3, 4], 9),
    (1, list(range(100, 112)), 6),  # 12 tokens: above seq_length, prefilled whole (a chunk would change alpha)
    (2, [7], 10),
    (2, [42, 43, 44, 45, 46], 8),
    (4, list(range(60, 70)), 5),
    (5, [9, 8, 7, 6], 11),
    (7, list(range(200, 206)), 7),
]
CANCEL = {3: 6, 5: 5}  # request index -> step at which it is cancelled (one decoding, one just admitted)
CHUNK = 4  # prompt tokens per step, all prefilling rows together


def params(n):
    return SamplingParams(max_new_tokens=n, temperature=0, logprobs=True)


def alone(model, prompt, n):
    engine = Engine(model, max_batch_size=1)
    handle = engine.submit(prompt, params(n))
    while engine.num_running or engine.num_waiting:
        engine.step()
    return [e for e in handle if isinstance(e, TokenEvent)]


def compiled_engine(model, **options) -> Engine:
    """An engine whose decode step is compiled (its background compile waited for)."""
    engine = Engine(model, compile_decode=True, **options)
    deadline = time.monotonic() + 600
    while engine.decode_step == "compiling" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.decode_step == "compiled"
    return engine


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen", "llama", "qwen-packed", "qwen-compiled", "llama-compiled"])
def test_staggered_joins_and_cancels_match_each_request_alone(name):
    arch, _, variant = name.partition("-")
    model = _build(arch)
    if variant:  # what the scripts serve on the CPU: packed weights (and the servers compile the decode step)
        assert pack_linear_weights(model) > 0
    if variant == "compiled":
        engine = compiled_engine(model, max_batch_size=6, prefill_chunk=CHUNK)
    else:
        engine = Engine(model, max_batch_size=6, prefill_chunk=CHUNK)
    handles, events, step, chunked = {}, {i: [] for i in range(len(REQUESTS))}, 0, set()
    while step < 8 or engine.num_running or engine.num_waiting:
        for i, (at, prompt, n) in enumerate(REQUESTS):
            if at == step:
                handles[i] = engine.submit(prompt, params(n))
        for i, at in CANCEL.items():
            if at == step:
                handles[i].cancel()
        engine.step()
        chunked |= {id(s.handle) for s in engine._rows if 0 < s.cached < len(s.prompt)}
        for i, handle in handles.items():
            events[i] += list(handle._events)
            handle._events.clear()
        step += 1
    assert id(handles[0]) in chunked
    assert (engine.compiled_steps > 0) == (variant == "compiled")
    # under dynamic NTK a prompt whose first chunk would have another alpha is prefilled whole
    assert (id(handles[2]) in chunked) == (not name.startswith("qwen"))
    for i, (_, prompt, n) in enumerate(REQUESTS):
        expected = alone(model, prompt, n)
        tokens = [e for e in events[i] if isinstance(e, TokenEvent)]
        final = events[i][-1]
        assert isinstance(final, FinishEvent)
        if i in CANCEL:
            assert final.reason == "cancelled" and len(tokens) < n
            expected = expected[: len(tokens)]
        else:
            assert (final.reason, final.completion_tokens) == ("length", n)
        assert [e.token_id for e in tokens] == [e.token_id for e in expected], f"request {i}"
        assert [e.logprob for e in tokens] == pytest.approx([e.logprob for e in expected], abs=1e-4)


def test_a_long_prompt_does_not_stall_running_requests():
    model = _build("llama")
    engine = Engine(model, max_batch_size=2, prefill_chunk=4)
    running = engine.submit([5, 6, 7], params(30))
    engine.step()
    engine.step()
    long = engine.submit(list(range(1, 41)), params(2))  # 40 tokens: ten steps of 4
    got = len([e for e in running._events if isinstance(e, TokenEvent)])
    for _ in range(5):
        engine.step()
    assert len([e for e in running._events if isinstance(e, TokenEvent)]) == got + 5  # one token every step
    assert not long._events  # still being prefilled
    while engine.num_running:
        engine.step()
    with torch.inference_mode():
        first = int(model(torch.tensor([list(range(1, 41))])).logits[0, -1].argmax())
    assert [e.token_id for e in long if isinstance(e, TokenEvent)][0] == first


@pytest.mark.parametrize("variant", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_one_request_in_a_high_slot_decodes_one_row(variant, monkeypatch):
    """A request alone in slot 3 (the three before it finished) costs a one-row step, not four rows, in the eager
    and the compiled step, and gets the answer it gets alone."""
    model = _build("llama")
    pack_linear_weights(model)
    options = dict(max_batch_size=4, prefix_cache=False)
    engine = compiled_engine(model, **options) if variant == "compiled" else Engine(model, **options)
    widths, forward = [], engine._forward
    monkeypatch.setattr(engine, "_forward", lambda rows, *a, **k: widths.append(len(rows)) or forward(rows, *a, **k))
    prompt = [9, 8, 7, 6, 5]
    handles = [engine.submit([i + 1, i + 2], params(1)) for i in range(3)] + [engine.submit(prompt, params(8))]
    compiled_before = engine.compiled_steps
    while engine.num_running or engine.num_waiting:
        engine.step()
    assert engine._slots == [None] * 4 and handles[3].result()[0] == generate_tokens(model, prompt, 8)
    assert widths == [4] + [1] * 7  # one prefill of the four, then seven one-row decode steps
    assert engine.compiled_steps - compiled_before == (7 if variant == "compiled" else 0)


def test_int8_cache_rows_match_each_request_alone():
    pytest.importorskip("qwen.kv_cache")  # the int8 scheme (use_cache_quantization) lives there
    torch.manual_seed(0)
    model = _build("qwen")
    model.config.use_cache_quantization = True
    engine = Engine(model, max_batch_size=4, prefill_chunk=CHUNK)
    handles = [engine.submit(prompt, params(n)) for _, prompt, n in REQUESTS[:4]]
    while engine.num_running or engine.num_waiting:
        engine.step()
        stored = engine._cache.layers[0].tensors if engine._cache.layers else None
        assert stored is None or stored[0].dtype == torch.uint8
    for handle, (_, prompt, n) in zip(handles, REQUESTS, strict=False):
        tokens = [e for e in handle if isinstance(e, TokenEvent)]
        expected = alone(model, prompt, n)
        assert [e.token_id for e in tokens] == [e.token_id for e in expected]
        assert [e.logprob for e in tokens] == pytest.approx([e.logprob for e in expected], abs=1e-4)


def test_slot_cache_grows_each_dimension_only_as_needed():
    from qwen.slot_cache import SlotCache

    cache = SlotCache(max_slots=8)
    cache.plan([0], [[0, 1, 2]], "cpu")
    assert cache.capacity == (1, 256)
    cache.plan(list(range(8)), [[5]] * 8, "cpu")  # more rows: the columns stay
    assert cache.capacity == (8, 256)
    cache.plan([3], [[300]], "cpu")  # a longer row: the rows stay
    assert cache.capacity == (8, 512)
    with pytest.raises(ValueError, match="distinct slots"):
        cache.plan([8], [[0]], "cpu")
