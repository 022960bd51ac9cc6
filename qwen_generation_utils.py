"""ChatML prompts, stop words and streaming detokenization, shared by every script.

Works with `qwen.tokenization_qwen.QWenTokenizer` and with any transformers tokenizer that has the ChatML tokens
<|im_start|> and <|im_end|>. The layout and window trimming follow the original Qwen `make_context`; role and
content text is always encoded with special-token parsing off, so user text never becomes a control token.
"""

import codecs
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerFast

DEFAULT_SYSTEM = "You are a helpful assistant."  # the system prompt the chat models were trained with
# The chat models' generation_config.json defaults (Qwen-7B-Chat), used where a checkpoint does not set them.
DEFAULT_MAX_WINDOW_SIZE = 6144  # prompt tokens kept of a conversation (older turns dropped first)
DEFAULT_MAX_NEW_TOKENS = 512
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
CHAT_FORMATS = ("chatml", "raw")

History = Sequence[tuple[str, str]]


def _check_chat_format(chat_format: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {chat_format!r}: use one of {', '.join(CHAT_FORMATS)}")


def encode_plain(tokenizer, text: str) -> list[int]:
    """Ids of `text` with special-token text encoded as plain text and no BOS/EOS added (any tokenizer)."""
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def _token_id(tokenizer, token: str) -> int:
    try:
        token_id = tokenizer.convert_tokens_to_ids(token)
    except (KeyError, ValueError):
        token_id = None
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"the tokenizer {type(tokenizer).__name__} has no {token} token, which ChatML prompts need: "
            "use a ChatML tokenizer (Qwen, or one with <|im_start|>/<|im_end|>) or chat_format='raw'"
        )
    return token_id


def chatml_ids(tokenizer) -> tuple[int, int]:
    """(im_start_id, im_end_id) of any tokenizer that has the ChatML tokens."""
    return _token_id(tokenizer, IM_START), _token_id(tokenizer, IM_END)


def undecodable_ids(tokenizer, model) -> list[int]:
    """Ids of `model`'s output layer past the tokenizer (padding rows: Qwen has 151,936 for 151,851 ids), which
    generation must never sample; add them to generation_config.suppress_tokens."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    rows = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", 0)
    return list(range(len(tokenizer), rows))


def suppress_undecodable(generation_config, tokenizer, model) -> None:
    """Add undecodable_ids() to generation_config.suppress_tokens (in place; each id once)."""
    suppressed = {*(generation_config.suppress_tokens or []), *undecodable_ids(tokenizer, model)}
    generation_config.suppress_tokens = sorted(suppressed) or None


def eod_id(tokenizer) -> int:
    """The end-of-document id: Qwen's <|endoftext|>, else the tokenizer's eos token."""
    qwen_eod = getattr(tokenizer, "eod_id", None)
    return qwen_eod if qwen_eod is not None else tokenizer.eos_token_id


def chatml_turn(tokenizer, role: str, content: str | None) -> tuple[list[int], list[bool]]:
    """One ChatML turn "<|im_start|>role\\ncontent<|im_end|>" as ids, and which ids a fine-tune learns.

    content None: the open turn a reply is generated into ("<|im_start|>role\\n"). The label mask is the
    original finetune.py's: <|im_start|> and <|im_end|> of every turn are learned, the role line never, the
    content only in assistant turns.
    """
    im_start, im_end = chatml_ids(tokenizer)
    head = [*encode_plain(tokenizer, role), *encode_plain(tokenizer, "\n")]
    if content is None:
        return [im_start, *head], [True] + [False] * len(head)
    body = encode_plain(tokenizer, content)
    ids = [im_start, *head, *body, im_end]
    return ids, [True] + [False] * len(head) + [role == "assistant"] * len(body) + [True]


def render_chatml(
    tokenizer, turns: Sequence[tuple[str, str]], system: str = DEFAULT_SYSTEM
) -> tuple[list[int], list[bool]]:
    """A whole conversation for training: ids of the system turn and `turns` [(role, content), ...], each turn
    followed by "\\n", and a per-token mask of the ids a fine-tune learns (labels = ids where the mask is set).

    The same tokens make_context() builds for inference, so training and serving see one layout. The newline
    after a turn is learned exactly when the turn's <|im_end|> is (always, as in the original preprocess()).
    """
    nl = encode_plain(tokenizer, "\n")
    ids, mask = [], []
    for role, content in [("system", system), *turns]:
        turn_ids, turn_mask = chatml_turn(tokenizer, role, content)
        ids += turn_ids + nl
        mask += turn_mask + [True] * len(nl)
    return ids, mask


def make_context(
    tokenizer,
    query: str,
    history: History | None = None,
    system: str = "",
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """Build the prompt for `query` after `history` [(query, response), ...]: returns (raw_text, context_tokens).

    ChatML: system turn, then as many past turns as fit in `max_window_size` tokens (newest kept first; the first
    turn that does not fit drops it and everything older), then the query and an open assistant turn.
    "raw": the query alone, encoded as plain text.
    """
    _check_chat_format(chat_format)
    if chat_format == "raw":
        return query, encode_plain(tokenizer, query)

    nl = encode_plain(tokenizer, "\n")

    def turn(role: str, content: str) -> tuple[str, list[int]]:
        return f"{IM_START}{role}\n{content}{IM_END}", chatml_turn(tokenizer, role, content)[0]

    system_text, system_tokens = turn("system", system)
    history_text, history_tokens = "", []
    for past_query, past_response in reversed(history or []):
        query_text, query_tokens = turn("user", past_query)
        response_text, response_tokens = turn("assistant", past_response)
        turn_tokens = nl + query_tokens + nl + response_tokens
        if len(system_tokens) + len(turn_tokens) + len(history_tokens) >= max_window_size:
            break
        history_tokens = turn_tokens + history_tokens
        history_text = f"\n{query_text}\n{response_text}" + history_text

    query_text, query_tokens = turn("user", query)
    raw_text = f"{system_text}{history_text}\n{query_text}\n{IM_START}assistant\n"
    assistant_open = chatml_turn(tokenizer, "assistant", None)[0]
    context_tokens = system_tokens + history_tokens + nl + query_tokens + nl + assistant_open
    return raw_text, context_tokens


def get_stop_words_ids(chat_format: str, tokenizer) -> list[list[int]]:
    """Id sequences that end a reply: ChatML turn markers, or "Human:" / end-of-document for raw prompts."""
    _check_chat_format(chat_format)
    if chat_format == "chatml":
        im_start, im_end = chatml_ids(tokenizer)
        return [[im_end], [im_start]]
    return [encode_plain(tokenizer, "Human:"), [eod_id(tokenizer)]]


def decode_tokens(
    tokens,
    tokenizer,
    raw_text_len: int,
    context_length: int,
    chat_format: str,
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
):
    """The reply text in `tokens` (prompt + generation), stripped, as the original; optionally with why it ended.

    The prompt is cut off by token count (`context_length`), which is exact for any tokenizer; `raw_text_len` is
    accepted for compatibility with the original signature. ChatML replies end at the first <|im_end|>,
    <|im_start|> or <|endoftext|> (what a stop word is turned into); raw replies end at <|endoftext|>.
    """
    _check_chat_format(chat_format)
    if torch.is_tensor(tokens):
        tokens = tokens.tolist()
    generated = list(tokens[context_length:])
    end_reason = f"Gen length {len(tokens)}"
    decode_kwargs = {"errors": errors} if hasattr(tokenizer, "decode_bytes") else {}  # QWenTokenizer only

    if chat_format == "chatml":
        stop_ids = {*chatml_ids(tokenizer), eod_id(tokenizer)}
        stop_at = next((i for i, token in enumerate(generated) if token in stop_ids), None)
        if stop_at is not None:
            end_reason = f"Gen {tokenizer.decode([generated[stop_at]])!r}"
            generated = generated[:stop_at]
        text = tokenizer.decode(generated, **decode_kwargs)
    else:
        text = tokenizer.decode(generated, **decode_kwargs)
        eod_text = tokenizer.decode([eod_id(tokenizer)])
        if eod_text in text:
            end_reason = f"Gen {eod_text!r}"
            text = text.split(eod_text)[0]
    if verbose:
        print("\nRaw Generate: ", text)
        print("\nEnd Reason:", end_reason)
    text = text.strip()
    if verbose:
        print("\nGenerate: ", text)
    return (text, end_reason) if return_end_reason else text


class StopWordsLogitsProcessor(LogitsProcessor):
    """Forces `eos_token_id` for every row whose ids end with one of `stop_words_ids`."""

    def __init__(self, stop_words_ids: Sequence[Sequence[int]], eos_token_id: int):
        if not isinstance(stop_words_ids, Sequence) or not all(
            isinstance(seq, Sequence) and seq and all(isinstance(i, int) and i >= 0 for i in seq)
            for seq in stop_words_ids
        ):
            raise ValueError(
                f"stop_words_ids must be a list of non-empty lists of token ids, got {stop_words_ids!r}"
            )
        if not isinstance(eos_token_id, int) or eos_token_id < 0:
            raise ValueError(f"eos_token_id must be a token id (int >= 0), got {eos_token_id!r}")
        # a stop sequence that is just eos needs no forcing: generation already ends on eos
        self.stop_words_ids = [list(seq) for seq in stop_words_ids if list(seq) != [eos_token_id]]
        self.eos_token_id = eos_token_id

    def stopped_rows(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        stopped = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for seq in self.stop_words_ids:
            if len(seq) <= input_ids.shape[1]:
                tail = input_ids[:, -len(seq) :]
                stopped |= (tail == torch.tensor(seq, device=input_ids.device)).all(dim=1)
        return stopped

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        stopped = self.stopped_rows(input_ids)
        if not stopped.any():
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos_token_id] = 0.0
        return torch.where(stopped[:, None], forced, scores)


class IncrementalDetokenizer:
    """Turns generated ids into text as they arrive, never emitting half of a multi-byte character.

    `push(ids)` returns only the new complete text, `finish()` flushes what is pending (U+FFFD where the bytes are
    really broken), `text` is everything emitted. Work per step is O(new tokens):
    - QWenTokenizer: token bytes into an incremental UTF-8 decoder (it holds back at most 3 bytes);
    - other tokenizers: decode a small window (read_offset / prefix_offset) and emit the difference.
    """

    # an unfinished UTF-8 character has at most 3 bytes, so at most 3 ids are ever held back
    MAX_HELD_TOKENS = 3
    # emitted ids kept as decoding context for the next step (other tokenizers)
    PREFIX_TOKENS = 4

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._byte_level = hasattr(tokenizer, "decode_bytes")  # QWenTokenizer exposes token bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._window: list[int] = []  # a few emitted ids, then the pending ones (other tokenizers)
        self._read_offset = 0  # ids of _window before it are already emitted
        # a fast tokenizer whose decode adds nothing to its backend's is asked directly: transformers' decode wraps
        # the same call in argument conversion and checks, twice a token here
        plain = (isinstance(tokenizer, PreTrainedTokenizerFast) and not tokenizer.clean_up_tokenization_spaces
                 and type(tokenizer)._decode is PreTrainedTokenizerFast._decode)
        self._decode_ids = tokenizer.backend_tokenizer.decode if plain else tokenizer.decode

    def push(self, token_ids: int | Sequence[int]) -> str:
        if torch.is_tensor(token_ids):
            token_ids = token_ids.reshape(-1).tolist()
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if self._byte_level:
            data = self.tokenizer.decode_bytes(ids, skip_special_tokens=self.skip_special_tokens)
            new_text = self._utf8.decode(data)
        else:
            self._window.extend(ids)
            new_text = self._window_delta(final=False)
        self.text += new_text
        return new_text

    def finish(self) -> str:
        new_text = self._utf8.decode(b"", final=True) if self._byte_level else self._window_delta(final=True)
        self.text += new_text
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=self.skip_special_tokens)

    def _window_delta(self, final: bool) -> str:
        # Decode the emitted tail (prefix) with and without the new ids: the difference is the new text. The
        # prefix keeps tokenizers whose decode depends on the neighbouring token (leading spaces) right.
        prefix_text = self._decode(self._window[: self._read_offset])
        pending = len(self._window) - self._read_offset
        # Hold back the last 0, 1, .. 3 ids until the new text no longer ends in an unfinished character; if
        # none does, the bytes are really broken (or a real U+FFFD): the last try (0 held) sends them as they are.
        max_held = 0 if final else min(self.MAX_HELD_TOKENS, pending)
        for held in (*range(max_held + 1), 0):
            end = len(self._window) - held
            new_text = self._decode(self._window[:end])[len(prefix_text) :]
            if not new_text.endswith("\ufffd"):
                break
        emitted, held_ids = self._window[:end], self._window[end:]
        self._window = emitted[-self.PREFIX_TOKENS :] + held_ids
        self._read_offset = min(len(emitted), self.PREFIX_TOKENS)
        return new_text


def make_continuation_context(
    tokenizer, history: History, system: str = "", max_window_size: int = DEFAULT_MAX_WINDOW_SIZE
) -> tuple[str, list[int]]:
    """ChatML prompt that continues the last assistant reply of `history` (its <|im_end|> left off).

    Used for ReAct follow-ups, where the last reply ends with "Observation: <tool result>\\nThought:" and the
    model writes on from there. As the original openai_api.py, every query and reply is stripped of leading
    newlines and trailing whitespace; the layout is make_context's (earlier turns trimmed to the window).
    """
    if not history:
        raise ValueError("make_continuation_context needs a history whose last reply is to be continued")
    stripped = [(query.lstrip("\n").rstrip(), response.lstrip("\n").rstrip()) for query, response in history]
    *earlier, (last_query, last_response) = stripped
    raw_text, tokens = make_context(tokenizer, last_query, earlier, system, max_window_size)
    return raw_text + last_response, tokens + encode_plain(tokenizer, last_response)
