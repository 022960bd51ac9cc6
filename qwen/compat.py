"""The transformers API differences inside the range requirements.txt allows, in one place.

transformers 5.24 renamed every model's cache argument and output field from `past_key_values` to `cache`
(create_causal_mask, forward, prepare_inputs_for_generation, ModelOutput). Older releases in our range still
use the old name, and generate() passes whichever name its release knows. Everything else in `qwen/` reads
CACHE_ARG / `cache_kwargs()` from here and never spells the name itself.
"""

import functools
import inspect

from transformers.masking_utils import create_causal_mask

# The name this transformers uses for the KV cache, as an argument and as an output field.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
LEGACY_CACHE_ARG = "past_key_values"
# transformers drops the old name in this release (the deprecation notice in 5.24's own models).
LEGACY_CACHE_REMOVED_IN = "5.40.0"


def cache_kwargs(cache) -> dict:
    """{"cache": cache} or {"past_key_values": cache}: how to hand a cache to this transformers' functions."""
    return {CACHE_ARG: cache}


def output_cache(outputs):
    """The cache a model output carries, read under this transformers' field name (no deprecation warning)."""
    return getattr(outputs, CACHE_ARG, None)


def accepts_legacy_cache_name(forward):
    """Decorate a forward(..., cache=...) so callers may still say past_key_values=.

    On a transformers that already uses `cache`, the old name goes through transformers' own deprecation helper
    (a FutureWarning for the caller that used it, as its Llama does). On an older one, generate() itself passes
    past_key_values every step, so the name is taken silently: nothing of ours warns a user.
    """
    if CACHE_ARG == "cache":
        from transformers.utils.deprecation import deprecate_kwarg

        return deprecate_kwarg(LEGACY_CACHE_ARG, LEGACY_CACHE_REMOVED_IN, new_name="cache")(forward)

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if LEGACY_CACHE_ARG in kwargs:
            if "cache" in kwargs:
                raise ValueError("Pass the KV cache once: `cache` or `past_key_values`, not both.")
            kwargs["cache"] = kwargs.pop(LEGACY_CACHE_ARG)
        return forward(*args, **kwargs)

    return wrapper


__all__ = ["CACHE_ARG", "accepts_legacy_cache_name", "cache_kwargs", "output_cache"]
