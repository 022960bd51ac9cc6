"""Greedy generation for many prompts at once through the batching engine (qwen/engine.py).

All prompts are submitted to one Engine; it keeps up to `batch_size` of them decoding together and admits the
next as soon as one finishes. A prompt ends at a stop token, at `max_new_tokens`, or as soon as its text
satisfies `should_stop` (e.g. "\\n\\n" after a GSM8K answer, a top-level statement after a HumanEval body): the
request is cancelled so its row is freed for the next prompt. Text comes from chat_api's TextStream (the one
detokenizer), without its stop strings: a benchmark's stop is a test of the whole text (HumanEval's is no string),
and its record keeps the text through the token that met it (the plugin's "gen" ends in "Observation:").

Decoding follows the original scripts: the checkpoint's generation_config with each script's overrides on top
(`overrides`), always greedy (do_sample=False): e.g. a -Chat checkpoint's repetition_penalty 1.1 stays on unless
the script set it to 1.0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

from ..chat_api import TextStream
from ..chat_backend import chat_engine
from ..engine import PromptTooLongError, SamplingParams, TokenEvent

PROMPT_TOO_LONG = "[prompt too long]"


def decoding_params(model, overrides: Mapping | None, **fields) -> SamplingParams:
    """Greedy sampling parameters: `fields`, then the script's `overrides`, then the checkpoint's generation_config."""
    requested = {**(overrides or {}), **fields, "temperature": 0.0}
    return SamplingParams.resolve(requested, getattr(model, "generation_config", None))


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    should_stop: Callable[[str], bool] | None = None,
    batch_size: int = 8,
    max_context: int | None = None,
    on_done: Callable[[], None] | None = None,
    overrides: Mapping | None = None,
) -> list[str]:
    """The greedy continuation text of each prompt (special tokens skipped), in the order of `prompts`."""
    params = decoding_params(model, overrides, max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_token_ids))
    engine = chat_engine(model, tokenizer, max_batch_size=batch_size, max_queue=max(batch_size, len(prompts)),
                         max_context=max_context)

    async def one(prompt: Sequence[int]) -> str:
        try:
            handle = engine.submit(list(prompt), params)
        except PromptTooLongError:
            if on_done is not None:
                on_done()
            return PROMPT_TOO_LONG
        stream = TextStream(tokenizer)
        text = ""
        async for event in handle:
            if isinstance(event, TokenEvent):
                text += stream.push(event.token_id)
                if should_stop is not None and should_stop(text):
                    handle.cancel()
                    break
        else:
            text += stream.finish()
        if on_done is not None:
            on_done()
        return text

    # longest first: the engine admits in submission order, so a batch holds similar lengths (little padding)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))

    async def run_all() -> list[str]:
        return await asyncio.gather(*(one(prompts[i]) for i in order))

    with engine:
        texts = asyncio.run(run_all())
    result = [""] * len(prompts)
    for i, text in zip(order, texts, strict=True):
        result[i] = text
    return result


__all__ = ["PROMPT_TOO_LONG", "decoding_params", "generate_texts"]
