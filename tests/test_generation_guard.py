"""The guard against dependency drift: generation with the KV cache equals generation without one.

transformers 5.24 renamed the cache argument, and a model that missed the rename decoded every token after the
first without its context, silently. Whatever transformers is installed, greedy `generate()` / `chat()` /
`chat_stream()` (cache on, no logits processor forcing anything) must equal a plain loop of full forward passes
with no cache at all, token for token, on a tiny QWen checkpoint and on the real demo model. Each test also runs
the same comparison with the cache deliberately dropped and checks it DOES differ, so the guard has teeth.
"""

import pytest
import torch

from qwen.checkpoints import make_tiny_checkpoint
from qwen.compat import CACHE_ARG
from qwen.loading import load_model_and_tokenizer
from qwen_generation_utils import decode_tokens, get_stop_words_ids, make_context

NEW_TOKENS = 24


def greedy_without_cache(model, prompt: list[int], n: int, stop_ids: set[int] = frozenset()) -> list[int]:
    """n greedy tokens by full forward passes over the whole sequence each step (no cache anywhere)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1]
            ids.append(int(logits.argmax()))
            if ids[-1] in stop_ids:
                break
    return ids[len(prompt) :]


def greedy_generate(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.0,
            eos_token_id=None, pad_token_id=0, stop_words_ids=[],
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


class CacheDropped:
    """Makes `model` forget its cache between steps, the way the 5.24 rename broke it (negative control)."""

    def __init__(self, model):
        self.model, self.original = model, model.prepare_inputs_for_generation

    def __enter__(self):
        def forgetful(*args, **kwargs):
            inputs = self.original(*args, **kwargs)
            inputs.pop(CACHE_ARG, None)
            return inputs

        self.model.prepare_inputs_for_generation = forgetful

    def __exit__(self, *exc):
        del self.model.prepare_inputs_for_generation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), layers=2, hidden=64, heads=4, seed=3)
    return load_model_and_tokenizer(str(path), cpu_only=True)


@pytest.fixture(scope="module")
def demo(demo_checkpoint):
    return load_model_and_tokenizer(str(demo_checkpoint), cpu_only=True)


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_greedy_generate_with_cache_equals_forward_loop_without_cache(which, request):
    model, tokenizer = request.getfixturevalue(which)
    _, prompt = make_context(tokenizer, "Tell me about the sea and the mountains.", system="You are helpful.")
    expected = greedy_without_cache(model, prompt, NEW_TOKENS)
    assert greedy_generate(model, prompt, NEW_TOKENS) == expected
    with CacheDropped(model):
        assert greedy_generate(model, prompt, NEW_TOKENS) != expected  # the guard sees a dropped cache


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_chat_and_chat_stream_equal_forward_loop_without_cache(which, request):
    model, tokenizer = request.getfixturevalue(which)
    model.generation_config.do_sample = False
    model.generation_config.repetition_penalty = 1.0
    history = [("What is the capital of France?", "The capital of France is Paris.")]
    query = "And of Germany?"
    raw_text, prompt = make_context(tokenizer, query, history=history, system="You are a helpful assistant.")
    stop_ids = {ids[0] for ids in get_stop_words_ids("chatml", tokenizer)}
    tokens = greedy_without_cache(model, prompt, NEW_TOKENS, stop_ids)
    tokens = [t for t in tokens if t not in stop_ids]
    expected = decode_tokens(
        prompt + tokens, tokenizer, raw_text_len=len(raw_text), context_length=len(prompt), chat_format="chatml",
        verbose=False, errors="replace",
    )  # fmt: skip
    assert expected  # the model says something

    kwargs = dict(history=history, system="You are a helpful assistant.", max_new_tokens=NEW_TOKENS)
    response, _ = model.chat(tokenizer, query, **kwargs)
    assert response == expected
    *_, streamed = model.chat_stream(tokenizer, query, **kwargs)
    assert streamed == expected
    with CacheDropped(model):
        assert model.chat(tokenizer, query, **kwargs)[0] != expected


def test_demo_model_answers_paris_then_berlin(demo):
    """The README's first conversation, with the demo model's own greedy settings."""
    model, tokenizer = demo
    answer, history = model.chat(tokenizer, "What is the capital of France?", history=[])
    assert "Paris" in answer
    answer, _ = model.chat(tokenizer, "And of Germany?", history=history)
    assert "Berlin" in answer


def test_generation_emits_no_deprecation_notice(tiny):
    """Nothing of ours uses a name transformers deprecates: no FutureWarning, no deprecation log line."""
    import logging
    import warnings

    model, tokenizer = tiny
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.chat(tokenizer, "Hi", history=[], max_new_tokens=4)
            list(model.chat_stream(tokenizer, "Hi", history=[], max_new_tokens=4))
            _, prompt = make_context(tokenizer, "Hi")
            greedy_generate(model, prompt, 4)
    finally:
        hf_logger.removeHandler(handler)
    notices = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    notices += [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not notices
