"""Robustness of the serving stack: one bad request fails alone, shutdown never races the engine thread."""

import threading

import openai
import pytest
from conftest import ScriptedLM, ServerThread, build_engine_model

from qwen import engine as engine_module
from qwen.engine import Engine, FinishEvent, SamplingParams, TokenEvent
from qwen.serving import create_app
from qwen.tokenization_qwen import QWenTokenizer


def overflowing(max_new_tokens: int) -> SamplingParams:
    """Divides every positive logit of a token already seen by ~1e-45: it overflows to inf, and softmax gives NaN
    (set past the bounds check, which refuses it: what a bug further down would produce)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)
    params.repetition_penalty = 1e-45
    return params


@pytest.fixture(scope="module")
def model():
    return build_engine_model("llama")


def test_a_sampling_failure_fails_only_its_own_request(model):
    engine = Engine(model, max_batch_size=4)
    good = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4, temperature=0))
    bad = engine.submit(list(range(64)), overflowing(4))
    for _ in range(6):
        engine.step()
    tokens, finish = good.result()
    assert finish.reason == "length" and len(tokens) == 4
    bad_finish = bad.result()[1]
    assert bad_finish.reason == "error" and "nan" in bad_finish.error
    assert engine.num_running == 0 and engine._active == 0


def test_shutdown_during_a_long_step_leaves_the_batch_to_the_engine_thread(model):
    """shutdown(timeout) returning while a step still runs: no event after a request's FinishEvent."""
    entered, release = threading.Event(), threading.Event()
    forward = model.forward

    def slow_forward(*args, **kwargs):
        entered.set()
        release.wait(10)  # the step outlasts shutdown's timeout
        return forward(*args, **kwargs)

    engine = Engine(model, max_batch_size=1)
    engine.model = _Callable(slow_forward)  # the engine calls self.model(...)
    running = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=50, temperature=0))
    engine.start()
    waiting = engine.submit([8, 9], SamplingParams(max_new_tokens=50, temperature=0))
    assert entered.wait(10)
    engine.shutdown(timeout=0.01)
    assert list(waiting) == [FinishEvent("cancelled", 2, 0)]
    release.set()
    engine._thread.join(10)
    events = list(running._events)  # not iterated: a request that never finishes would block the test
    assert [type(e) for e in events] == [TokenEvent] * (len(events) - 1) + [FinishEvent]
    assert events[-1].reason == "cancelled" and engine._active == 0


class _Callable:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


# ------------------------------------------------------------------------------ through the HTTP API


@pytest.fixture(scope="module")
def tokenizer():
    return QWenTokenizer()


def test_api_a_request_whose_generation_fails_does_not_break_its_neighbour(tokenizer, monkeypatch):
    """A device failure (simulated: there is no GPU here) in one request's sampling: that request gets a 500
    that does not show the internal error, the stream beside it goes on to its end."""
    sample = engine_module.sample

    def failing_sample(logits, params, states):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("CUDA error: device-side assert triggered at /secret/path/kernel.cu")
        return sample(logits, params, states)

    monkeypatch.setattr(engine_module, "sample", failing_sample)
    model = ScriptedLM(tokenizer, delay=0.01)
    with ServerThread(create_app(model, tokenizer, model_names=["s"], max_context=1024)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model="s", messages=[{"role": "user", "content": "Count forever."}], stream=True, max_tokens=40
        )
        chunks = iter(stream)
        text = next(c for c in chunks if c.choices and c.choices[0].delta.content).choices[0].delta.content
        with pytest.raises(openai.InternalServerError, match="failed while generating") as failure:
            client.chat.completions.create(model="s", messages=[{"role": "user", "content": "Count."}], seed=666)
        assert "secret" not in failure.value.response.text and "CUDA" not in failure.value.response.text
        finish = None
        for chunk in chunks:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert finish == "length" and text.startswith("one, two, three")


def test_api_seed_out_of_range_is_a_clear_400(tokenizer):
    with ServerThread(create_app(ScriptedLM(tokenizer), tokenizer, model_names=["s"])) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="seed: Input should be less than or equal to"):
            client.chat.completions.create(model="s", messages=[{"role": "user", "content": "Hi"}], seed=2**64)


def test_api_request_during_shutdown_is_a_clear_503(tokenizer):
    app = create_app(ScriptedLM(tokenizer), tokenizer, model_names=["s"])
    with ServerThread(app) as server:
        app.state.server.engine.shutdown()  # what the lifespan does when the server stops
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="shutting down") as failure:
            client.chat.completions.create(model="s", messages=[{"role": "user", "content": "Hi"}])
        assert failure.value.status_code == 503
