"""Multiple-choice scoring by log-likelihood, batched: the original's method, many questions per forward pass.

The original (evaluate_mmlu/ceval/cmmlu.py) ran one forward pass per question over the whole 5-shot prompt and
read the logits at the last prompt position for the choice tokens (" A".." D" for MMLU, "A".."D" for C-Eval and
CMMLU); the prediction is the most likely choice. Here, per subject:

1. the token prefix every prompt shares (the 5 examples) goes through the model once, and its KV cache is
   reused by every question (a question's own tokens are the only new work);
2. questions run in batches: their remaining tokens left-padded to one width, with an attention mask (padding
   is never attended to) and position ids counted from the mask, so each row sees exactly the positions it
   would alone;
3. at the last position: log-softmax over the vocabulary, then the choice tokens' log-probabilities
   renormalized over the choices (softmax of the four), i.e. P(choice | prompt, one of the choices).

Batching and prefix reuse change nothing beyond float rounding: tests/test_eval_scoring.py checks the per-question
probabilities against a plain one-question forward pass (<= 1e-5 on a tiny checkpoint). The prefix is found on
token ids (longest common prefix), so tokenization at the seam is exactly that of the full prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

from ..compat import cache_kwargs

MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a separate pass


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    if not prompts:
        return 0
    first, length = prompts[0], min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        n = 0
        while n < length and prompt[n] == first[n]:
            n += 1
        length = n
    return max(length, 0)


def _prefix_cache(model, prefix: list[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = DynamicCache()
    model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    return [(layer.keys, layer.values) for layer in cache.layers]


def choice_log_probs(logits: torch.Tensor, choice_ids: Sequence[int]) -> torch.Tensor:
    """[B, V] last-position logits -> [B, C] probabilities of the choices, renormalized over the choices."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)[:, list(choice_ids)]
    return torch.softmax(log_probs, dim=-1)


@torch.inference_mode()
def choice_probabilities(
    model,
    prompts: Sequence[Sequence[int]],
    choice_ids: Sequence[int],
    *,
    batch_size: int = 8,
    share_prefix: bool = True,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[N, C] probabilities of each choice token after each prompt (float32, rows in the order of `prompts`)."""
    device = next(model.parameters()).device
    prompts = [list(p) for p in prompts]
    result = torch.empty(len(prompts), len(choice_ids))
    if not prompts:
        return result
    prefix_len = common_prefix_length(prompts) if share_prefix else 0
    max_positions = getattr(model.config, "seq_length", None) or getattr(model.config, "max_position_embeddings", 0)
    # QWen rescales RoPE (dynamic NTK) by total length past seq_length: then a shared cache would be stale
    if prefix_len < MIN_SHARED_PREFIX or max(len(p) for p in prompts) > (max_positions or float("inf")):
        prefix_len = 0
    prefix_kv = _prefix_cache(model, prompts[0][:prefix_len], device) if prefix_len else None

    # longest first, so a batch holds similar lengths (little padding) and memory peaks at the start
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        suffixes = [prompts[i][prefix_len:] for i in rows]
        width = max(len(s) for s in suffixes)
        input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in suffixes], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=device)
        kwargs = {}
        if prefix_kv is not None:
            batch = len(rows)
            mask = torch.cat([torch.ones(batch, prefix_len, dtype=mask.dtype, device=device), mask], dim=1)
            cache = DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                                 for k, v in prefix_kv])
            kwargs = {"use_cache": True, **cache_kwargs(cache)}
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
        logits = model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1, **kwargs
        ).logits[:, -1]
        result[rows] = choice_log_probs(logits, choice_ids).cpu()
        if on_batch is not None:
            on_batch(len(rows))
    return result


@torch.inference_mode()
def choice_probabilities_one_by_one(model, prompts: Sequence[Sequence[int]], choice_ids: Sequence[int]) -> torch.Tensor:
    """The original's way: one full forward pass per prompt, no padding, no cache (the reference and the
    bench's peer)."""
    device = next(model.parameters()).device
    rows = [choice_log_probs(model(input_ids=torch.tensor([list(p)], device=device)).logits[:, -1], choice_ids)
            for p in prompts]
    return torch.cat(rows).cpu() if rows else torch.empty(0, len(choice_ids))
