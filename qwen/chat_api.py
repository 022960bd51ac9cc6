"""What every chat runtime shares (the model's chat()/chat_stream(), the API, the web page, the CLI), and the
original chat API itself as a mixin of QWenLMHeadModel.

- is this a chat model: `require_chat_model` / `is_chat_model` (generation_config.chat_format "chatml");
- which tokens and texts end a reply: `chat_stop_words`, split into ids and texts by `chat_stop_tokens`;
- token ids → text as it is generated, cut at the first stop string: `TextStream` (the one detokenize-and-stop
  loop; a stop string arriving split over several tokens is held back until it is certain).
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from qwen_generation_utils import (
    DEFAULT_MAX_WINDOW_SIZE,
    DEFAULT_SYSTEM,
    IncrementalDetokenizer,
    decode_tokens,
    eod_id,
    get_stop_words_ids,
    make_context,
    suppress_undecodable,
)

from .errors import NotAChatModelError

CHAT_FORMAT = "chatml"  # the prompt format of the -Chat checkpoints; a base model's generation_config says "raw"


def chat_format(generation_config) -> str:
    """The checkpoint's prompt format (generation_config.chat_format); ChatML when it does not say."""
    return getattr(generation_config, "chat_format", None) or CHAT_FORMAT


def is_chat_model(generation_config) -> bool:
    return chat_format(generation_config) == CHAT_FORMAT


def require_chat_model(generation_config, needed_by: str,
                       what_to_do: str = "use model.generate() on plain text, or load the -Chat checkpoint") -> None:
    """NotAChatModelError (a UserError and a ValueError) naming `needed_by` unless the checkpoint chats."""
    if not is_chat_model(generation_config):
        raise NotAChatModelError(
            f"{needed_by} needs a chat model (generation_config.chat_format 'chatml'); this one is "
            f"{chat_format(generation_config)!r}, a base model: {what_to_do}."
        )


def chat_stop_words(tokenizer, generation_config, extra: Iterable[Sequence[int]] = ()) -> list[list[int]]:
    """Token sequences that end a reply: `extra`, the checkpoint's stop_words_ids, and the chat format's own
    (<|im_end|>, <|im_start|> for ChatML)."""
    configured = getattr(generation_config, "stop_words_ids", None) or []
    words = [list(seq) for seq in [*extra, *configured, *get_stop_words_ids(chat_format(generation_config), tokenizer)]]
    return [seq for i, seq in enumerate(words) if seq and seq not in words[:i]]


def chat_stop_tokens(tokenizer, generation_config, extra: Iterable[Sequence[int]] = ()
                     ) -> tuple[tuple[int, ...], list[str]]:
    """(ids, texts) that end a chat reply: the end-of-document and eos ids with every one-token stop word, and the
    longer stop words as text (a batched engine stops on ids; a longer word is cut from the text)."""
    ids = {eod_id(tokenizer)}
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else eos or [])
    texts = []
    for seq in chat_stop_words(tokenizer, generation_config, extra):
        if len(seq) == 1:
            ids.add(seq[0])
        else:
            texts.append(tokenizer.decode(seq))
    return tuple(sorted(i for i in ids if i is not None)), texts


class StopStrings:
    """Cuts generated text at the first stop string, across chunks.

    push(text) returns the text that is certainly not part of a stop string; a tail that may be the start of
    one is held back until the next push. After a hit, `stopped` is True and the rest is dropped.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = self._possible_start(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back text, at the end of generation (it never became a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _possible_start(self, text: str) -> int:
        """Length of the longest tail of `text` that some stop string starts with."""
        longest = min(len(text), max((len(s) - 1 for s in self.stops), default=0))
        for size in range(longest, 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0


class TextStream:
    """Generated token ids → text, cut at the first stop string: push(ids) returns the new certain text,
    finish() the rest at the end; `stopped` once a stop string was met (generation should end)."""

    def __init__(self, tokenizer, stops: Iterable[str] = ()):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._cutter = StopStrings(stops)

    @property
    def stopped(self) -> bool:
        return self._cutter.stopped

    def push(self, token_ids: int | Sequence[int]) -> str:
        return self._cutter.push(self._detokenizer.push(token_ids))

    def finish(self) -> str:
        return self._cutter.push(self._detokenizer.finish()) + self._cutter.flush()


# ---------------------------------------------------------------------------------------------------------------
# The original chat API (chat / chat_stream), on GenerationMixin.generate with stop words


class _StopFlag(StoppingCriteria):
    """Ends generation as soon as `stop` is set from another thread (the consumer of a stream went away)."""

    def __init__(self):
        self.stop = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Streamer handing generated ids (the prompt skipped) to the consuming thread."""

    def __init__(self):
        self.queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self):
        self.queue.put(None)


class QWenChatMixin:
    """chat() and chat_stream() of the original hub code, for a model with generate(stop_words_ids=...)."""

    def _chat_inputs(self, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs):
        """Shared by chat and chat_stream: the per-call generation config, prompt and stop words."""
        generation_config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        require_chat_model(generation_config, "chat()")
        max_window_size = kwargs.pop("max_window_size", None) or getattr(
            generation_config, "max_window_size", DEFAULT_MAX_WINDOW_SIZE
        )
        unused = generation_config.update(**kwargs)  # per-call overrides (max_new_tokens, top_p, ...)
        if generation_config.eos_token_id is None:  # e.g. a demo model with another tokenizer
            generation_config.eos_token_id = eod_id(tokenizer)
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = generation_config.eos_token_id
        suppress_undecodable(generation_config, tokenizer, self)  # never sample an id it cannot decode
        history = [tuple(turn) for turn in (history or [])]
        raw_text, context_tokens = make_context(
            tokenizer, query, history=history, system=system, max_window_size=max_window_size, chat_format=CHAT_FORMAT
        )
        stop_words_ids = chat_stop_words(tokenizer, generation_config, stop_words_ids or [])
        input_ids = torch.tensor([context_tokens], device=self.device)
        return generation_config, unused, history, raw_text, input_ids, stop_words_ids

    def chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        system: str = DEFAULT_SYSTEM,
        append_history: bool = True,
        stop_words_ids: list[list[int]] | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> tuple[str, list[tuple[str, str]]]:
        """One chat turn: returns the response and a new history list (with (query, response) appended unless
        append_history=False, as the original's parameter of that name)."""
        generation_config, extra, history, raw_text, input_ids, stop_words_ids = self._chat_inputs(
            tokenizer, query, history, system, stop_words_ids, generation_config, kwargs
        )
        outputs = self.generate(
            input_ids, generation_config=generation_config, stop_words_ids=stop_words_ids, **extra
        )[0].tolist()
        # EOS (forced after a stop word, or padding) is never part of the reply.
        eos = generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        end = next((i for i in range(input_ids.shape[1], len(outputs)) if outputs[i] in eos_ids), len(outputs))
        response = decode_tokens(
            outputs[:end],
            tokenizer,
            raw_text_len=len(raw_text),
            context_length=input_ids.shape[1],
            chat_format=CHAT_FORMAT,
            verbose=False,
            errors="replace",
        )
        if append_history:
            history.append((query, response))
        return response, history

    def chat_stream(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        system: str = DEFAULT_SYSTEM,
        stop_words_ids: list[list[int]] | None = None,
        logits_processor: LogitsProcessorList | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> Iterator[str]:
        """Yields the response so far (cumulative text) as tokens arrive; closing the generator stops generation.
        generation_config.stop_strings (texts) end the response too, and are not part of it."""
        generation_config, extra, _, _, input_ids, stop_words_ids = self._chat_inputs(
            tokenizer, query, history, system, stop_words_ids, generation_config, kwargs
        )
        # cut here, as text: generate() would need the tokenizer passed to match them
        stops, generation_config.stop_strings = generation_config.stop_strings or [], None
        # Generation ends on a stop word (generate() forces EOS after a longer one); those ids never reach the text.
        end_ids = set(chat_stop_tokens(tokenizer, generation_config, stop_words_ids)[0])
        streamer, stop_flag = _TokenQueue(), _StopFlag()
        failure: list[BaseException] = []

        def run():
            try:
                self.generate(
                    input_ids,
                    generation_config=generation_config,
                    logits_processor=logits_processor,
                    stop_words_ids=stop_words_ids,
                    stopping_criteria=StoppingCriteriaList([stop_flag]),
                    streamer=streamer,
                    **extra,
                )
            except BaseException as error:  # re-raised in the consumer's thread
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=run, name="qwen-chat-stream", daemon=True)
        worker.start()
        text_stream = TextStream(tokenizer, [stops] if isinstance(stops, str) else stops)
        text, shown = "", ""
        try:
            while (ids := streamer.queue.get()) is not None:
                ended = any(i in end_ids for i in ids)
                if ended:
                    ids = ids[: min(ids.index(i) for i in end_ids if i in ids)]
                text += text_stream.push(ids)
                if ended or text_stream.stopped:
                    break
                if (current := text.strip()) != shown:
                    shown = current
                    yield shown
            text += text_stream.finish()
            if failure:
                raise failure[0]
            if (current := text.strip()) != shown:
                yield current
        finally:
            stop_flag.stop.set()
            worker.join()


__all__ = [
    "CHAT_FORMAT",
    "QWenChatMixin",
    "StopStrings",
    "TextStream",
    "chat_format",
    "chat_stop_tokens",
    "chat_stop_words",
    "is_chat_model",
    "require_chat_model",
]
