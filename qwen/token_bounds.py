"""How many tokens a text needs at least, without tokenizing it.

Every token stands for at most `longest_token_bytes(tokenizer)` bytes of UTF-8 (81 for the demo model's
tokenizer, 128 or fewer for Qwen's), so a text of B bytes needs at least ceil(B / longest) tokens. Checking that
bound first refuses a text far too long for the context in microseconds, instead of after seconds of tokenizing
(a 2 MB line took 3-4 s here).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=8)
def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token of `tokenizer` stands for (special tokens included), computed once."""
    ranks = getattr(tokenizer, "mergeable_ranks", None)  # QWenTokenizer (tiktoken): bytes → rank
    if ranks:
        longest = max(map(len, ranks))
        specials = getattr(tokenizer, "special_tokens", {}) or {}
    else:
        longest = max(len(tokenizer.convert_tokens_to_string([t]).encode("utf-8", "replace"))
                      for t in tokenizer.get_vocab())
        specials = tokenizer.all_special_tokens
    return max([longest, 1, *(len(s.encode("utf-8")) for s in specials)])


def min_tokens(tokenizer, text: str) -> int:
    """A lower bound on the tokens `text` encodes to."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // longest_token_bytes(tokenizer))
