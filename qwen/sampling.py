"""Sampling: the options a request may set, their bounds, how a request's values are resolved, and the sampler.

BOUNDS is the one table of what each option accepts: the API schema (qwen/protocol.py), the CLI's `:conf`
(qwen/cli.py) and the web page (qwen/webui.py, through SamplingParams) all read it, so they reject the same values.
A new option is a field of SamplingParams (+ its bound here, + its use in `sample`) and a field of the same name in
the API schema; nothing in between matches names by hand.

`sample(logits, params, states)` draws one token per row of a batch with each row's own parameters and generator,
as tensors on the logits' device: no per-row read back to the host (the engine reads the [n] tokens once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from qwen_generation_utils import DEFAULT_MAX_NEW_TOKENS

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit
GREEDY_BELOW = 0.01  # as the original: a temperature this small means greedy decoding
INVALID = -1  # what `sample` gives a row whose probabilities are not finite (nan / inf)


@dataclass(frozen=True)
class Bound:
    """The closed range [low, high] (open at low when low_open) a numeric option accepts; `note` says what a
    special value means."""

    low: float
    high: float = math.inf
    low_open: bool = False
    note: str = ""

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def describe(self) -> str:
        """E.g. "in [0.01, 100] (1 means off)", "at least 1"."""
        if self.high == math.inf:
            text = f"{'above' if self.low_open else 'at least'} {self.low:g}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return text + (f" ({self.note})" if self.note else "")


BOUNDS: dict[str, Bound] = {
    "max_new_tokens": Bound(1),
    "temperature": Bound(0, 2, note="0 means greedy"),  # OpenAI's range
    "top_p": Bound(0, 1, low_open=True),
    "top_k": Bound(0, note="0 means off"),
    # HF semantics; bounded so that dividing a logit by it stays a finite float32 (1e-45 made inf / NaN)
    "repetition_penalty": Bound(0.01, 100, note="1 means off"),
    "presence_penalty": Bound(-2, 2),  # OpenAI's range
    "frequency_penalty": Bound(-2, 2),
    "top_logprobs": Bound(0, MAX_TOP_LOGPROBS),
    "seed": Bound(-(2**63), 2**64 - 1),  # what torch.Generator.manual_seed takes
}


def check(name: str, value) -> None:
    """ValueError naming `name` and its range unless `value` is within BOUNDS[name] (None: unset, accepted)."""
    bound = BOUNDS.get(name)
    if bound is not None and value is not None and value not in bound:
        raise ValueError(f"invalid sampling parameters: {name} must be {bound.describe()}, not {value!r}")


@dataclass
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    repetition_penalty: float = 1.0  # HF semantics: over prompt and generated tokens, divides positive logits
    presence_penalty: float = 0.0  # OpenAI semantics: over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed → same tokens, whatever else shares the batch
    stop_token_ids: tuple[int, ...] = ()  # e.g. eos, <|im_end|>, <|im_start|>; never emitted as a TokenEvent
    ignore_eos: bool = False  # vLLM's extension: go on past the stop tokens, up to max_new_tokens (benchmarks)
    logprobs: bool = False  # log-probabilities of the model's raw distribution (before penalties/temperature)
    top_logprobs: int = 0

    def __post_init__(self):
        self.stop_token_ids = tuple(self.stop_token_ids)
        for name in BOUNDS:
            check(name, getattr(self, name))

    @classmethod
    def resolve(cls, requested: Mapping[str, Any], checkpoint=None) -> SamplingParams:
        return resolve(requested, checkpoint)

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def resolve(requested: Mapping[str, Any], checkpoint=None) -> SamplingParams:
    """Each field from the request, else the checkpoint's generation_config, else the built-in default.

    `requested` holds field names of SamplingParams (None = unset); `checkpoint` is a GenerationConfig (or None).
    A checkpoint that does not sample means temperature 0, and so does a temperature below GREEDY_BELOW.
    """

    def from_checkpoint(name: str):
        if name == "temperature" and getattr(checkpoint, "do_sample", None) is False:
            return 0.0
        return getattr(checkpoint, name, None)

    values = {}
    for name in (f.name for f in fields(SamplingParams)):
        value = requested.get(name)
        value = from_checkpoint(name) if value is None else value
        if value is not None:
            values[name] = value
    if 0 <= values.get("temperature", 1.0) < GREEDY_BELOW:  # a negative one is left for the bounds check
        values["temperature"] = 0.0
    return SamplingParams(**values)


@dataclass
class SamplerState:
    """Per-request sampler state: its random generator, and for penalties the counts of generated tokens [V] and
    the mask of prompt tokens [V] (made on first use)."""

    generator: torch.Generator
    counts: torch.Tensor | None = None
    prompt_seen: torch.Tensor | None = None
    prompt: Sequence[int] = field(default=(), repr=False)

    def observe(self, params: SamplingParams, vocab: int, device) -> None:
        """Make the penalty tensors when `params` needs them."""
        if params.uses_penalties and self.counts is None:
            self.counts = torch.zeros(vocab, device=device)
            self.prompt_seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.prompt_seen[torch.tensor(list(self.prompt), dtype=torch.long, device=device)] = True

    def record(self, token: int) -> None:
        """Count the sampled token, for the penalties of the next ones."""
        if self.counts is not None:
            self.counts[token] += 1


def apply_penalties(logits: torch.Tensor, params: SamplingParams, state: SamplerState) -> torch.Tensor:
    """One row's logits [V] with the repetition (HF), presence and frequency (OpenAI) penalties applied."""
    counts = state.counts
    if params.repetition_penalty != 1:
        seen = state.prompt_seen | (counts > 0)
        penalized = torch.where(logits < 0, logits * params.repetition_penalty, logits / params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    # OpenAI: logits - count * frequency_penalty - (count > 0) * presence_penalty
    return logits - counts * params.frequency_penalty - (counts > 0).float() * params.presence_penalty


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[SamplerState]) -> torch.Tensor:
    """One token per row: logits [n, V] (float), row i sampled with params[i] and states[i].generator → [n] long.

    Greedy rows take the argmax. Sampled rows: penalties, temperature, top-k, top-p, then a draw that needs no
    multinomial: argmax(probs / E) with E ~ Exponential(1) from the row's own generator picks token t with
    probability probs[t] (gpt-fast's multinomial_sample_one_no_sync), so nothing is read back per row. A sampled
    row whose probabilities are nan / inf gets INVALID (the caller fails that request only).
    """
    n, vocab = logits.shape
    device = logits.device
    if any(p.uses_penalties for p in params):
        logits = torch.stack([apply_penalties(row, p, s) if p.uses_penalties else row
                              for row, p, s in zip(logits, params, states, strict=True)])  # fmt: skip
    tokens = logits.argmax(-1)
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    if not drawn:
        return tokens
    rows = logits[drawn]  # [m, V]
    chosen = [params[i] for i in drawn]
    temperature = torch.tensor([p.temperature for p in chosen], device=device)
    rows = rows / temperature[:, None]
    if any(p.top_k for p in chosen):
        k = torch.tensor([min(p.top_k, vocab) for p in chosen], device=device)
        top = torch.topk(rows, int(k.max())).values  # [m, max k]
        kth = top.gather(1, (k.clamp(min=1) - 1)[:, None])
        kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, -math.inf))  # top_k 0: keep all
        rows = rows.masked_fill(rows < kth, -math.inf)
    if any(p.top_p < 1 for p in chosen):
        # keep the smallest set of most likely tokens whose mass reaches top_p
        top_p = torch.tensor([p.top_p for p in chosen], device=device)
        probs, order = torch.sort(rows.softmax(-1), descending=True)
        drop = ((probs.cumsum(-1) - probs) > top_p[:, None]) & (top_p[:, None] < 1)
        rows = rows.scatter(1, order, torch.where(drop, -math.inf, rows.gather(1, order)))
    probs = rows.softmax(-1)
    noise = torch.stack([torch.empty(vocab, device=device).exponential_(generator=states[i].generator)
                         for i in drawn])  # fmt: skip
    picked = (probs / noise).argmax(-1)
    # a row whose distribution is not finite (e.g. penalties overflowed to inf, softmax gave nan) gets INVALID
    picked = torch.where(probs.isfinite().all(-1), picked, torch.full_like(picked, INVALID))
    tokens = tokens.clone()
    tokens[torch.tensor(drawn, device=device)] = picked
    return tokens


__all__ = ["BOUNDS", "INVALID", "Bound", "SamplerState", "SamplingParams", "check", "resolve", "sample"]
