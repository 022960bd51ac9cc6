"""A chat model served through the batched engine: what the API server and the web page share.

The checkpoint's generation_config.json gives the chat settings (ChatML or raw, window, stop tokens) and the
sampling defaults; ``pieces()`` turns one engine request into text as it is generated — incremental
detokenization, stop strings cut even when they arrive split over several tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from qwen_generation_utils import make_context

from .chat_api import StopStrings, TextStream, chat_format, chat_stop_tokens
from .engine import Engine, TokenEvent, model_context_length
from .errors import GenerationError, ServerShutdownError
from .sampling import SamplingParams, resolve

# engine finish reason → OpenAI finish reason ("cancelled" happens only when we stopped it, or at shutdown)
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}


@dataclass
class Piece:
    """New text of one choice, the log-probabilities of the tokens behind it, and on the last piece why it ended."""

    text: str = ""
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def chat_engine(model, tokenizer, *, max_batch_size: int = 8, max_queue: int = 64, max_context: int | None = None,
                threads: int | None = None, compile_decode: bool = False) -> Engine:
    """The engine every script generates with (API, web page, benchmarks): its context limit is the model's unless
    given, and the output layer's padding rows past the tokenizer are never sampled."""
    return Engine(model, max_batch_size=max_batch_size, max_queue=max_queue,
                  max_context=max_context or model_context_length(model), decodable_tokens=len(tokenizer),
                  threads=threads, compile_decode=compile_decode)


class ChatBackend:
    """A model + tokenizer + engine, with the checkpoint's chat settings and sampling defaults."""

    def __init__(self, model, tokenizer, engine: Engine):
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.generation_config = getattr(model, "generation_config", None)
        self.chat_format = chat_format(self.generation_config)
        self.max_window_size = self.default("max_window_size", 6144)
        self.stop_token_ids, self.chat_stop_texts = chat_stop_tokens(tokenizer, self.generation_config)

    @classmethod
    def from_model(cls, model, tokenizer, **engine_options) -> ChatBackend:
        """A backend on a new `chat_engine` (engine_options: its keyword arguments)."""
        return cls(model, tokenizer, chat_engine(model, tokenizer, **engine_options))

    def default(self, name: str, fallback):
        """A setting of the checkpoint's generation_config, or `fallback` when it has none."""
        value = getattr(self.generation_config, name, None)
        return fallback if value is None else value

    def sampling_params(self, **requested) -> SamplingParams:
        """Engine sampling parameters: `requested` (SamplingParams fields; None = unset), else the checkpoint's
        generation_config, else the defaults; stop tokens default to the checkpoint's. Bad values: ValueError."""
        return resolve({"stop_token_ids": self.stop_token_ids, **requested}, self.generation_config)

    def chat_prompt(self, query: str, history, system: str) -> list[int]:
        """Prompt ids of one chat turn (ChatML; user text never parsed as control tokens)."""
        return make_context(self.tokenizer, query, history, system, self.max_window_size, self.chat_format)[1]

    async def pieces(self, handle, stops: Sequence[str]) -> AsyncIterator[Piece]:
        """The text of one engine request as it is generated, cut at the first stop string.

        Raises GenerationError when the engine fails the request; the request is cancelled however the
        consumer leaves (also when it stops iterating early).
        """
        text_stream = TextStream(self.tokenizer, stops)
        tokens: list[TokenEvent] = []  # events whose text is not released yet
        consumed = 0
        try:
            async for event in handle:
                if isinstance(event, TokenEvent):
                    consumed += 1
                    tokens.append(event)
                    text = text_stream.push(event.token_id)
                    if text_stream.stopped:
                        handle.cancel()
                        yield Piece(text, tokens if text else [], "stop", handle.prompt_tokens, consumed)
                        return
                    if text:
                        yield Piece(text, tokens)
                        tokens = []
                elif event.reason == "error":
                    raise GenerationError(f"generation failed: {event.error}")
                elif event.reason == "shutdown":
                    raise ServerShutdownError(
                        f"the server is shutting down and stopped this answer after {event.completion_tokens} "
                        "tokens; send the request again (to another instance, or once the server is back)"
                    )
                else:
                    text = text_stream.finish()
                    yield Piece(text, tokens, FINISH_REASONS[event.reason], event.prompt_tokens,
                                event.completion_tokens)
                    return
        finally:
            handle.cancel()


__all__ = ["ChatBackend", "GenerationError", "Piece", "ServerShutdownError", "StopStrings", "chat_engine"]
