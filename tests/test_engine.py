"""The batched engine gives each request what it would get alone, and serves them together without blocking."""

import asyncio
import importlib.util
import os
import threading
import time

import pytest
import torch
from conftest import build_engine_model as _build
from conftest import generate_logprobs, generate_tokens

import qwen.slot_cache
from qwen.engine import (
    Engine,
    FinishEvent,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    TokenEvent,
)

# prompts of different lengths, each with its own budget, so rows join and leave the batch at different steps
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(100, 112)), [7], [42, 43, 44]]
BUDGETS = [12, 9, 6, 10, 8]
HAS_QWEN_MODEL = importlib.util.find_spec("qwen.modeling_qwen") is not None


@pytest.fixture(scope="module")
def model():
    return _build("llama")


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


def run_staggered(engine, prompts, params, collect=True):
    """Submit requests at different steps of a hand-stepped engine; return their results (or handles)."""
    handles = [engine.submit(prompts[0], params[0])]
    for _ in range(2):
        engine.step()
    handles.append(engine.submit(prompts[1], params[1]))
    engine.step()
    handles += [
        engine.submit(p, q) for p, q in zip(prompts[2:], params[2:], strict=True)
    ]  # one batched prefill
    peak = 0
    while engine.num_running or engine.num_waiting:
        engine.step()
        peak = max(peak, engine.num_running)
        slots = [s.slot for s in engine._rows]  # each running request keeps its own slot of the cache
        assert len(set(slots)) == len(slots) and all(engine._slots[i] is s for i, s in zip(slots, engine._rows, strict=True))
    return ([h.result() for h in handles] if collect else handles), peak


@pytest.mark.parametrize(
    "name",
    [
        "llama",
        "qwen2",
        pytest.param(
            "qwen", marks=pytest.mark.skipif(not HAS_QWEN_MODEL, reason="qwen/modeling_qwen.py missing")
        ),
    ],
)
def test_staggered_batch_matches_generate_alone(name):
    model = _build(name)
    expected = [generate_tokens(model, p, n) for p, n in zip(PROMPTS, BUDGETS, strict=True)]
    params = [greedy(n, logprobs=True) for n in BUDGETS]
    engine = Engine(model, max_batch_size=4)
    handles, peak = run_staggered(engine, PROMPTS, params, collect=False)
    assert peak == 4  # rows really shared the batch
    events = [list(h) for h in handles]
    assert [[e.token_id for e in ev[:-1]] for ev in events] == expected
    # log-probabilities too (more sensitive than greedy ids to a wrong position, NTK alpha or logN scale)
    for ev, prompt, n in zip(events, PROMPTS, BUDGETS, strict=True):
        assert [e.logprob for e in ev[:-1]] == pytest.approx(generate_logprobs(model, prompt, n), abs=1e-4)
    results = [([e.token_id for e in ev[:-1]], ev[-1]) for ev in events]
    assert [(f.reason, f.prompt_tokens, f.completion_tokens) for _, f in results] == [
        ("length", len(p), n) for p, n in zip(PROMPTS, BUDGETS, strict=True)
    ]


def test_seeded_sampling_ignores_batch_company(model):
    params = SamplingParams(
        max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, presence_penalty=0.5,
        frequency_penalty=0.3, seed=1234,
    )  # fmt: skip
    alone = Engine(model)
    handle = alone.submit(PROMPTS[1], params)
    while alone.num_running or alone.num_waiting:
        alone.step()
    tokens_alone, _ = handle.result()

    company = [SamplingParams(max_new_tokens=n, temperature=1.0) for n in BUDGETS]
    company[1] = params  # joins a running batch at the second step
    results, _ = run_staggered(Engine(model, max_batch_size=4), PROMPTS, company)
    assert results[1][0] == tokens_alone

    other_seed = Engine(model)
    handle = other_seed.submit(PROMPTS[1], SamplingParams(**{**params.__dict__, "seed": 4321}))
    while other_seed.num_running or other_seed.num_waiting:
        other_seed.step()
    assert handle.result()[0] != tokens_alone  # the seed is really used


def test_cancel_frees_the_slot(model):
    with Engine(model, max_batch_size=1, max_queue=1) as engine:
        first = engine.submit(PROMPTS[0], greedy(100_000))
        events = iter(first)
        assert isinstance(next(events), TokenEvent)
        with pytest.raises(QueueFullError):
            engine.submit(PROMPTS[1], greedy(3))
        first.cancel()
        final = [e for e in events if isinstance(e, FinishEvent)][0]
        assert final.reason == "cancelled"
        assert engine.num_running == 0
        tokens, finish = engine.submit(PROMPTS[1], greedy(3)).result()
        assert (tokens, finish.reason) == (generate_tokens(model, PROMPTS[1], 3), "length")


def test_a_request_being_prefilled_counts_as_running(model):
    engine = Engine(model)  # not started: step() runs the iterations here
    seen = []
    prefill = engine._prefill

    def watching_prefill(seqs, *args):
        seen.append((engine.num_running, engine.num_waiting))
        prefill(seqs, *args)

    engine._prefill = watching_prefill
    handle = engine.submit(PROMPTS[0], greedy(5))
    assert (engine.num_running, engine.num_waiting) == (0, 1)
    engine.step()
    assert seen == [(1, 0)] and engine.num_running == 1
    handle.cancel()
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (0, 0)


def test_leaving_an_iteration_cancels(model):
    with Engine(model) as engine:
        handle = engine.submit(PROMPTS[0], greedy(100_000))
        for _ in handle:
            break
        assert handle.cancelled
        tokens, _ = engine.submit(PROMPTS[1], greedy(2)).result()  # the engine goes on serving
        assert tokens == generate_tokens(model, PROMPTS[1], 2)


def test_queue_limit_counts_waiting_and_running(model):
    engine = Engine(model, max_batch_size=2, max_queue=3)
    handles = [engine.submit(p, greedy(5)) for p in PROMPTS[:3]]
    with pytest.raises(QueueFullError, match="retry later"):
        engine.submit(PROMPTS[3], greedy(5))
    handles[2].cancel()  # still waiting: leaves the queue at once
    assert handles[2].result() == ([], FinishEvent("cancelled", len(PROMPTS[2]), 0))
    engine.submit(PROMPTS[3], greedy(5))


def test_logprobs_are_log_softmax_of_a_plain_forward(model):
    engine = Engine(model)
    handle = engine.submit(PROMPTS[0], greedy(6, logprobs=True, top_logprobs=3))
    engine.submit(PROMPTS[2], greedy(6))  # padded neighbour
    while engine.num_running or engine.num_waiting:
        engine.step()
    events = [e for e in handle if isinstance(e, TokenEvent)]
    ids = PROMPTS[0] + [e.token_id for e in events]
    with torch.inference_mode():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)[len(PROMPTS[0]) - 1 : -1]
    for event, row in zip(events, logprobs, strict=True):
        assert event.logprob == pytest.approx(float(row[event.token_id]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in event.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in event.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_stop_token_ends_with_stop(model):
    expected = generate_tokens(model, PROMPTS[3], 10)
    stop = expected[4]
    cut = expected.index(stop)
    engine = Engine(model)
    handle = engine.submit(PROMPTS[3], greedy(10, stop_token_ids=[stop]))
    while engine.num_running or engine.num_waiting:
        engine.step()
    tokens, finish = handle.result()
    assert tokens == expected[:cut]  # the stop token itself is not emitted
    assert (finish.reason, finish.completion_tokens) == ("stop", cut + 1)


def test_ignore_eos_generates_past_the_stop_tokens_to_max_new_tokens(model):
    expected = generate_tokens(model, PROMPTS[3], 10)
    engine = Engine(model)
    handle = engine.submit(PROMPTS[3], greedy(10, stop_token_ids=[expected[4]], ignore_eos=True))
    while engine.num_running or engine.num_waiting:
        engine.step()
    tokens, finish = handle.result()
    assert tokens == expected  # the stop token is emitted like any other
    assert (finish.reason, finish.completion_tokens) == ("length", 10)


def test_context_limit(model):
    engine = Engine(model, max_context=10)
    with pytest.raises(PromptTooLongError, match="context window is 10"):
        engine.submit(list(range(10)), greedy(1))
    handle = engine.submit(list(range(8)), greedy(5))  # clamped to the 2 tokens that fit
    while engine.num_running or engine.num_waiting:
        engine.step()
    tokens, finish = handle.result()
    assert (len(tokens), finish.reason) == (2, "length")


def test_bad_requests_are_named(model):
    with pytest.raises(ValueError, match=r"temperature must be in \[0, 2\] \(0 means greedy\)"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    engine = Engine(model)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.submit([], greedy(1))
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 256\)"):
        engine.submit([1, 256], greedy(1))
    assert engine.num_waiting == 0


def test_a_failing_step_fails_its_requests_not_the_engine(model):
    calls = []

    def flaky(**inputs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return model(**inputs)

    with Engine(model) as engine:
        engine.model = flaky
        tokens, finish = engine.submit(PROMPTS[0], greedy(3)).result()
        assert (tokens, finish.reason) == ([], "error")
        assert "simulated out of memory" in finish.error
        tokens, finish = engine.submit(PROMPTS[1], greedy(3)).result()
        assert (tokens, finish.reason) == (generate_tokens(model, PROMPTS[1], 3), "length")


def test_shutdown_ends_open_requests(model):
    engine = Engine(model).start()
    handle = engine.submit(PROMPTS[0], greedy(100_000))
    next(iter(handle))
    engine.shutdown()
    assert [e for e in handle if isinstance(e, FinishEvent)][0].reason == "cancelled"


def test_async_streams_leave_the_event_loop_free(model):
    budgets = (80, 60)
    expected = [generate_tokens(model, p, n) for p, n in zip(PROMPTS, budgets, strict=False)]

    async def main(engine):
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        async def consume(prompt, n):
            tokens = []
            async for event in engine.submit(prompt, greedy(n)):
                if isinstance(event, TokenEvent):
                    tokens.append(event.token_id)
            return tokens

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = ticks
        streams = await asyncio.gather(*(consume(p, n) for p, n in zip(PROMPTS, budgets, strict=False)))
        during = ticks - start
        done.set()
        await ticking
        return streams, during

    with Engine(model) as engine:
        streams, ticks_during_generation = asyncio.run(main(engine))
    assert streams == expected
    assert ticks_during_generation > 10  # the ticker kept running while tokens were being generated


def test_async_streams_are_woken_once_per_step_not_once_per_token(model):
    """Each thread-safe call wakes the server's thread, which then takes a core from the step's next parallel region:
    the engine wakes an event loop once per forward for all its streams (8 streams: +8% tokens/s, bench/README.md)."""
    budgets = (12, 9, 6, 10)
    expected = [generate_tokens(model, p, n) for p, n in zip(PROMPTS, budgets, strict=False)]
    wakeups, forwards = [], []

    async def main(engine):
        loop = asyncio.get_running_loop()
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            wakeups.append(threading.current_thread().name)
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted

        async def consume(prompt, n):
            return [e.token_id async for e in engine.submit(prompt, greedy(n)) if isinstance(e, TokenEvent)]

        return await asyncio.gather(*(consume(p, n) for p, n in zip(PROMPTS, budgets, strict=False)))

    engine = Engine(model)
    emit_tokens = engine._emit_tokens
    engine._emit_tokens = lambda seqs, logits: (forwards.append(len(seqs)), emit_tokens(seqs, logits))
    with engine:
        streams = asyncio.run(main(engine))
    assert streams == expected
    events = sum(budgets) + len(budgets)  # every token and every finish
    assert set(wakeups) == {"qwen-engine"} and len(wakeups) == len(forwards) < events


def test_an_idle_engine_keeps_its_cache_for_a_while_then_gives_the_memory_back(model, monkeypatch):
    """A burst after a short pause reuses the KV cache (no new allocation); a long pause frees it, and the C heap's
    free pages go back to the OS (malloc_trim: the freed cache leaves fragments the process would keep)."""
    trims = []
    monkeypatch.setattr(qwen.slot_cache, "trim_heap", lambda: trims.append(engine._cache.nbytes()))
    with Engine(model, idle_release_s=1.0, max_batch_size=1) as engine:  # one slot: the second request takes it
        engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4, temperature=0)).result()
        storage = [t.data_ptr() for layer in engine._cache.layers for t in layer.tensors]
        assert engine._cache.nbytes() > 0  # finished, and still held
        engine.submit([8, 9], SamplingParams(max_new_tokens=4, temperature=0)).result()
        assert [t.data_ptr() for layer in engine._cache.layers for t in layer.tensors] == storage  # reused
        deadline = time.monotonic() + 30
        while engine._cache.nbytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine._cache.nbytes() == 0 and trims == [0]  # trimmed once, after the release
        tokens, final = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4, temperature=0)).result()
        assert final.reason == "length" and tokens == generate_tokens(model, [5, 6, 7], 4)


def test_the_engine_thread_runs_with_its_own_thread_count(model):
    """--threads goes to the engine thread; the loading thread keeps one, so the process has one OpenMP team."""
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    try:
        with Engine(model, threads=1) as engine:
            engine.submit([5, 6, 7], SamplingParams(max_new_tokens=2, temperature=0)).result()
    finally:
        hook.remove()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == max(1, min(2, os.cpu_count() or 1))  # this thread's setting is untouched


@pytest.mark.skipif(not HAS_QWEN_MODEL, reason="needs qwen.modeling_qwen")
def test_a_qwen_decode_step_reads_nothing_back_from_the_device(monkeypatch):
    """On a GPU every value read on the host (int(t), t.item(), t.tolist()) waits for the device: a decode step
    within seq_length needs none (positions are bounded by the cache's length, known on the host)."""
    from qwen.configuration_qwen import QWenConfig
    from qwen.modeling_qwen import QWenLMHeadModel

    torch.manual_seed(0)
    config = QWenConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                        intermediate_size=256, seq_length=2048)
    model = QWenLMHeadModel(config).eval()
    engine = Engine(model, max_batch_size=2)
    engine.submit([5, 6, 7], greedy(4))
    engine.submit([8, 9], greedy(4))
    engine.step()  # admit and prefill; the next steps only decode
    reads = []
    forward = model.forward

    def watched(*args, **kwargs):
        for name in ("__int__", "item", "tolist", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
        try:
            return forward(*args, **kwargs)
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(model, "forward", watched)
    engine.step()
    assert engine.num_running == 2 and reads == []
