"""Sampling options: one bounds table that the API, the CLI and the web page all enforce, and the batched sampler."""

import math
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from pydantic import ValidationError
from transformers import GenerationConfig

from qwen import protocol as api
from qwen.chat_backend import ChatBackend
from qwen.cli import CONF_OPTIONS, UsageError, apply_conf
from qwen.sampling import BOUNDS, SamplerState, SamplingParams, sample
from qwen.webui import WebChat

PAGE_SETTINGS = {"temperature": 0.7, "top_p": 0.8, "max_new_tokens": 16}  # what the Settings panel sends
API_NAMES = {"max_new_tokens": "max_tokens"}  # the schema's name when it differs (OpenAI's)


def probes(name):
    """Values at and just beyond each end of BOUNDS[name] (ints for integer options)."""
    bound = BOUNDS[name]
    integer = isinstance(SamplingParams.__dataclass_fields__[name].default, int) or name == "seed"
    step = 1 if integer else 0.01
    values = [bound.low + (step if bound.low_open else 0), bound.low - step]
    if bound.low_open:
        values.append(bound.low)
    if bound.high != math.inf:
        values += [bound.high, bound.high + step]
    return [int(v) if integer else v for v in values]


def rejected_by_api(name, value) -> bool:
    field = API_NAMES.get(name, name)
    try:
        api.ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value,
             **({"logprobs": True} if name == "top_logprobs" else {})})  # fmt: skip
    except ValidationError:
        return True
    return False


def rejected_by_cli(name, value) -> bool:
    try:
        apply_conf(GenerationConfig(), {name: value})
    except UsageError:
        return True
    return False


def rejected_by_page(chat, name, value) -> bool:
    try:
        chat.sampling_params(**{**PAGE_SETTINGS, name: value})
    except gr.Error:
        return True
    return False


@pytest.fixture(scope="module")
def page(demo_tokenizer):
    model = SimpleNamespace(generation_config=GenerationConfig())
    return WebChat(ChatBackend(model, demo_tokenizer, engine=None))


@pytest.mark.parametrize("name", list(BOUNDS))
def test_cli_page_and_api_reject_the_same_values(name, page):
    surfaces = 0
    for value in probes(name):
        wanted = value not in BOUNDS[name]
        with pytest.raises(ValueError) if wanted else _nothing():
            SamplingParams(**{name: value})
        if API_NAMES.get(name, name) in api.ChatCompletionRequest.model_fields:
            assert rejected_by_api(name, value) == wanted, (name, value)
            surfaces += 1
        if name in CONF_OPTIONS:
            assert rejected_by_cli(name, value) == wanted, (name, value)
            surfaces += 1
        if name in PAGE_SETTINGS:
            assert rejected_by_page(page, name, value) == wanted, (name, value)
    assert surfaces, f"{name} is bounded but no surface accepts it"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_bounds_table_is_what_users_read():
    assert BOUNDS["temperature"].describe() == "in [0, 2] (0 means greedy)"
    assert BOUNDS["top_p"].describe() == "in (0, 1]"
    assert BOUNDS["max_new_tokens"].describe() == "at least 1"
    with pytest.raises(UsageError, match=r"temperature: 2\.5 \(must be in \[0, 2\]"):
        apply_conf(GenerationConfig(), {"temperature": 2.5})


def state(seed):
    return SamplerState(torch.Generator().manual_seed(seed))


def test_sampled_tokens_follow_the_distribution_top_k_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    counts = {}
    for name, params in {"plain": SamplingParams(), "top_k": SamplingParams(top_k=2),
                         "top_p": SamplingParams(top_p=0.6)}.items():  # fmt: skip
        tokens = sample(logits, [params] * 4000, [state(i) for i in range(4000)])
        counts[name] = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(counts["plain"], probs, atol=0.03)
    assert torch.allclose(counts["top_k"], torch.tensor([0.625, 0.375, 0, 0]), atol=0.03)  # renormalized top 2
    assert torch.allclose(counts["top_p"], torch.tensor([0.625, 0.375, 0, 0]), atol=0.03)  # 0.5 < 0.6 ≤ 0.8


def test_each_row_samples_with_its_own_parameters_and_generator():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.5, seed=7)
    together = sample(logits, [greedy, hot, hot], [state(1), state(7), state(7)])
    alone = sample(logits[1:2], [hot], [state(7)])
    assert together[0] == logits[0].argmax() and together[1] == alone[0] == together[2]
    assert isinstance(together, torch.Tensor)  # the caller reads the batch back once


def test_penalties_change_only_the_rows_that_ask_for_them():
    logits = torch.tensor([[2.0, 1.9, 0.0], [2.0, 1.9, 0.0]])
    penalized = SamplingParams(temperature=0, repetition_penalty=1.5)
    seen = state(0)
    seen.prompt = [0]
    seen.observe(penalized, 3, "cpu")
    tokens = sample(logits, [penalized, SamplingParams(temperature=0)], [seen, state(0)])
    assert tokens.tolist() == [1, 0]  # 2.0 / 1.5 < 1.9


def test_the_request_reaches_sampling_params_through_to_sampling_params():
    request = api.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "ignore_eos": True})
    checkpoint = GenerationConfig(do_sample=True, top_p=0.8, temperature=0.9)
    params = request.to_sampling_params(checkpoint, max_new_tokens=5, stop_token_ids=[7])
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.5, 0.8, 5)  # request, checkpoint, given
    assert params.ignore_eos and params.stop_token_ids == (7,)
    assert not api.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]).to_sampling_params(
        checkpoint, max_new_tokens=5).ignore_eos  # fmt: skip
