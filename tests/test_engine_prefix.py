"""The engine's prefix cache: a chat that resends its history reuses the KV its slot kept, with the same logits."""

import pytest
import torch
from conftest import build_engine_model

from qwen.engine import Engine, SamplingParams, TokenEvent

HISTORY = [5, 6, 7, 8, 9, 10, 11, 12, 13]
NEXT_TURN = [40, 41, 42]
OTHER = [90, 91, 92, 93]


def traced(n):
    return SamplingParams(max_new_tokens=n, temperature=0, logprobs=True, top_logprobs=5)


def drain(engine, *handles):
    while engine.num_running or engine.num_waiting:
        engine.step()
    results = []
    for handle in handles:
        events = [e for e in handle if isinstance(e, TokenEvent)]
        results.append(([e.token_id for e in events], torch.tensor([[lp for _, lp in e.top_logprobs] for e in events])))
    return results


def two_turns(model, prefix_cache, *, company=False, prefill_chunk=None):
    """Turn 1, then turn 2 = turn 1's prompt + answer + a new message; with `company`, another request decodes
    beside turn 2 (and beside the free slot that keeps turn 1) the whole time."""
    engine = Engine(model, max_batch_size=3, prefix_cache=prefix_cache, prefill_chunk=prefill_chunk)
    (answer, first), = drain(engine, engine.submit(HISTORY, traced(6)))
    other = engine.submit(OTHER, traced(30)) if company else None
    for _ in range(4 if company else 0):  # the other row decodes while turn 1's slot is free
        engine.step()
    second = engine.submit(HISTORY + answer + NEXT_TURN, traced(8))
    results = drain(engine, second, *([other] if other else []))
    return answer, first, results, engine.reused_tokens


@pytest.mark.parametrize("arch", ["qwen", "llama"])
@pytest.mark.parametrize("company", [False, True], ids=["alone", "beside-another-request"])
def test_a_resent_history_reuses_its_slot_with_the_same_logits(arch, company):
    model = build_engine_model(arch)
    if arch == "qwen":
        model.config.seq_length = 64  # both turns under one dynamic NTK alpha (see the test below)
    answer, first, results, reused = two_turns(model, True, company=company)
    answer_0, first_0, results_0, reused_0 = two_turns(model, False, company=company)
    assert reused_0 == 0
    assert reused == len(HISTORY) + len(answer) - 1  # all that turn 1 fed: its last token was sampled, never fed
    assert answer == answer_0 and torch.allclose(first, first_0)
    for (tokens, logprobs), (tokens_0, logprobs_0) in zip(results, results_0, strict=True):
        assert tokens == tokens_0
        assert torch.allclose(logprobs, logprobs_0, atol=1e-5), (logprobs - logprobs_0).abs().max()


@pytest.mark.parametrize("arch", ["qwen", "llama"])
@pytest.mark.parametrize("chunk", [None, 4], ids=["after-its-prefill", "mid-prefill"])
def test_a_new_request_copies_the_prefix_a_running_request_computed_with_the_same_logits(arch, chunk):
    """Chats that share a system prompt arrive together: the second takes a copy of the columns the first has already
    computed (all its prompt, or the chunks fed so far) instead of computing them again."""
    model = build_engine_model(arch)
    if arch == "qwen":
        model.config.seq_length = 64  # one dynamic NTK alpha for every length here
    first_prompt, second_prompt = HISTORY + [20, 21], HISTORY + [30, 31, 32]

    def run(prefix_cache):
        engine = Engine(model, max_batch_size=3, prefix_cache=prefix_cache, prefill_chunk=chunk)
        first = engine.submit(first_prompt, traced(6))
        engine.step()  # the first request's prompt is in its slot (chunk 4: its first 4 tokens)
        second = engine.submit(second_prompt, traced(6))
        return drain(engine, first, second), engine.reused_tokens

    shared, reused = run(True)
    alone, reused_0 = run(False)
    assert reused_0 == 0 and reused == (len(HISTORY) if chunk is None else 4)
    for (tokens, logprobs), (tokens_0, logprobs_0) in zip(shared, alone, strict=True):
        assert tokens == tokens_0
        assert torch.allclose(logprobs, logprobs_0, atol=1e-5), (logprobs - logprobs_0).abs().max()


def test_a_prefix_rotated_under_another_ntk_alpha_is_computed_again():
    model = build_engine_model("qwen")  # seq_length 8: turn 1 (14 tokens) and turn 2 (18) have different alphas
    answer, first, results, reused = two_turns(model, True)
    answer_0, first_0, results_0, _ = two_turns(model, False)
    assert reused == 0
    assert answer == answer_0 and results[0][0] == results_0[0][0]
    assert torch.allclose(results[0][1], results_0[0][1], atol=1e-5)


def test_the_least_recently_freed_slot_is_overwritten_first():
    model = build_engine_model("llama")
    engine = Engine(model, max_batch_size=2)
    (a, _), = drain(engine, engine.submit(HISTORY, traced(3)))  # slot 0
    (b, _), = drain(engine, engine.submit(OTHER, traced(3)), )  # slot 1 (slot 0 keeps turn 1)
    assert engine.reused_tokens == 0
    drain(engine, engine.submit([70, 71, 72], traced(2)))  # shares nothing: takes slot 0, freed longest ago
    reused = engine.reused_tokens
    drain(engine, engine.submit(OTHER + b + [1], traced(2)))  # slot 1 still keeps OTHER + b[:-1]
    assert engine.reused_tokens - reused == len(OTHER) + len(b) - 1
    reused = engine.reused_tokens
    drain(engine, engine.submit(HISTORY + a + [1], traced(2)))  # overwritten: computed afresh
    assert engine.reused_tokens == reused


def test_an_idle_release_forgets_the_kept_prefixes():
    model = build_engine_model("llama")
    engine = Engine(model, max_batch_size=2)
    (a, _), = drain(engine, engine.submit(HISTORY, traced(3)))
    engine._release_cache()  # what the engine thread does after idle_release_s
    drain(engine, engine.submit(HISTORY + a, traced(2)))
    assert engine.reused_tokens == 0
