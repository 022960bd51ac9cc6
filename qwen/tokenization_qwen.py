"""QWenTokenizer: the Qwen (v1) byte-level BPE on tiktoken, as a transformers (slow) tokenizer.

The vocabulary is `qwen.tiktoken` (one "base64(token bytes) rank" line per token, 151,643 ranks) plus 208 special
tokens appended after it. Text is NFC-normalised, split with the pre-tokenization regex below and merged by rank.
Encoding and decoding go straight to tiktoken; the transformers machinery is only used around it (padding,
tensors, saving), so `encode` runs at tiktoken speed.
"""

import base64
import binascii
import importlib.util
import itertools
import logging
import os
import unicodedata
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Literal

import tiktoken
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

logger = logging.getLogger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}

# The original pre-tokenization: cl100k's pattern except that digits are split one by one (\p{N}, not \p{N}{1,3}).
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_START_ID = 151643
# token text -> id, in the original order: <|endoftext|>=151643, <|im_start|>, <|im_end|>, <|extra_0..204|>
SPECIAL_TOKENS = {token: SPECIAL_START_ID + i for i, token in enumerate((ENDOFTEXT, IMSTART, IMEND, *EXTRAS))}

# Arguments that `_encode_plus` hands on unchanged to `prepare_for_model` for one sequence.
_PREPARE_FOR_MODEL_ARGS = (
    "add_special_tokens", "max_length", "stride", "pad_to_multiple_of", "padding_side", "return_tensors",
    "return_token_type_ids", "return_attention_mask", "return_overflowing_tokens", "return_special_tokens_mask",
    "return_length", "verbose",
)  # fmt: skip

AllowedSpecial = Literal["all"] | Collection[str]


def default_vocab_file() -> str:
    """Path of the copy of qwen.tiktoken shipped by the `dashscope` package (found without importing it)."""
    spec = importlib.util.find_spec("dashscope")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "resources" / VOCAB_FILES_NAMES["vocab_file"]
        if path.is_file():
            return str(path)
    raise ValueError(
        "No Qwen vocabulary found: the checkpoint has no qwen.tiktoken and the `dashscope` package, which ships a "
        "copy, is not installed. Run `pip install dashscope` or pass vocab_file='path/to/qwen.tiktoken'."
    )


def load_tiktoken_bpe(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken vocabulary file: one "base64token rank" pair per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as e:
                raise ValueError(
                    f"{path}, line {line_number}: expected 'base64token rank', got {line[:80]!r}"
                ) from e
    return ranks


class QWenTokenizer(PreTrainedTokenizer):
    """Qwen (v1) tokenizer. Regular tokens are `bytes`, special tokens are `str` (as in the original).

    Args:
        vocab_file: qwen.tiktoken; default: the copy shipped by the `dashscope` package.
        errors: how `decode` treats bytes that are not valid UTF-8 ("replace"; overridable per call).
        extra_vocab_file: more "base64token rank" lines to append (tokens or ids already present are skipped).
        **kwargs: transformers tokenizer options, e.g. pad_token="<|extra_0|>" (only existing special tokens).

    `encode(text)` parses special-token text as control tokens (the original default); pass
    `allowed_special=set()` (or `split_special_tokens=True`) to encode it as plain text.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        errors: str = "replace",
        extra_vocab_file: str | None = None,
        **kwargs,
    ):
        if vocab_file is None:
            vocab_file = default_vocab_file()
            logger.info(
                "QWenTokenizer: no qwen.tiktoken given, using the copy shipped by dashscope: %s", vocab_file
            )
        self.errors = errors
        self.mergeable_ranks = load_tiktoken_bpe(vocab_file)
        self.special_tokens = dict(SPECIAL_TOKENS)
        if extra_vocab_file is not None:
            self._add_extra_vocab(load_tiktoken_bpe(extra_vocab_file))
        self._build_encoding()
        super().__init__(**kwargs)

    def _add_extra_vocab(self, extra_ranks: dict[bytes, int]) -> None:
        # As the original: an extra token that already exists, or whose id is taken, is skipped.
        used_ids = set(self.mergeable_ranks.values()) | set(self.special_tokens.values())
        for token, index in extra_ranks.items():
            if token in self.mergeable_ranks or index in used_ids:
                logger.info("extra token %r (id %d) already in the vocabulary, skipped", token, index)
                continue
            self.mergeable_ranks[token] = index
            used_ids.add(index)

    def _build_encoding(self) -> None:
        self.encoding = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        # id -> token: bytes for regular tokens, str for special ones
        self.decoder = {
            index: token
            for token, index in itertools.chain(self.mergeable_ranks.items(), self.special_tokens.items())
        }
        self._special_ids = frozenset(self.special_tokens.values())
        # The original's attribute name for the Encoding. A plain attribute, not a property: wrappers that
        # subclass the tokenizer's class and keep the wrapped tokenizer in `.tokenizer` (GPT-QModel's
        # Tokenicer) would otherwise hit the property and recurse.
        self.tokenizer = self.encoding

    # tiktoken's Encoding is not picklable in older tiktoken and would carry the ranks twice: rebuild on load.
    def __getstate__(self):
        state = self.__dict__.copy()
        for derived in ("encoding", "tokenizer", "decoder", "_special_ids"):
            state.pop(derived, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build_encoding()

    @property
    def eod_id(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self.special_tokens[IMSTART]

    @property
    def im_end_id(self) -> int:
        return self.special_tokens[IMEND]

    def __len__(self) -> int:
        return self.encoding.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> dict[bytes | str, int]:
        return {**self.mergeable_ranks, **self.special_tokens}

    # ---- special tokens: the vocabulary is fixed, only the existing special tokens can be named ----

    def _check_special_token(self, token) -> None:
        if str(token) not in self.special_tokens:
            raise ValueError(
                f"{str(token)!r} is not a special token of the Qwen vocabulary, which cannot grow. Use one of "
                f"{ENDOFTEXT}, {IMSTART}, {IMEND}, <|extra_0|> ... <|extra_204|> (e.g. pad_token='<|extra_0|>')."
            )

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        for token in new_tokens or ():
            self._check_special_token(token)
        return 0  # all of them are already in the vocabulary

    def __setattr__(self, key, value):
        if key in self.SPECIAL_TOKENS_ATTRIBUTES and value is not None:
            self._check_special_token(value)
        super().__setattr__(key, value)

    def _convert_token_to_id(self, token: bytes | str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token in self.mergeable_ranks:
            return self.mergeable_ranks[token]
        raise ValueError(f"unknown token {token!r}: regular Qwen tokens are bytes, special tokens are str")

    def _convert_id_to_token(self, index: int) -> bytes | str:
        if index in self.decoder:
            return self.decoder[index]
        raise ValueError(
            f"unknown token id {index}: the Qwen vocabulary has ids 0..{self.encoding.n_vocab - 1}"
        )

    # ---- encoding ----

    def _encode_ids(
        self, text: str, allowed_special: AllowedSpecial = "all", disallowed_special: AllowedSpecial = ()
    ) -> list[int]:
        """The one place text becomes ids. Default: special-token text is parsed as control tokens (original)."""
        text = unicodedata.normalize("NFC", text)
        return self.encoding.encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def tokenize(
        self,
        text: str,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: AllowedSpecial = (),
        **kwargs,
    ) -> list[bytes | str]:
        if kwargs.get("split_special_tokens", self.split_special_tokens):
            allowed_special = set()
        return [self.decoder[i] for i in self._encode_ids(text, allowed_special, disallowed_special)]

    def _tokenize(self, text: str, **kwargs) -> list[bytes | str]:
        return self.tokenize(text, allowed_special=set())

    def encode(
        self,
        text,
        text_pair=None,
        add_special_tokens: bool = True,
        padding=False,
        truncation=None,
        max_length=None,
        stride: int = 0,
        padding_side=None,
        return_tensors=None,
        *,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: AllowedSpecial = (),
        **kwargs,
    ):
        """`encode(text)` as the original; `allowed_special=set()` encodes special-token text as plain text."""
        if kwargs.pop("split_special_tokens", self.split_special_tokens):
            allowed_special = set()  # the transformers spelling of "special-token text is plain text"
        plain_call = text_pair is None and not padding and not truncation and max_length is None
        if isinstance(text, str) and plain_call and return_tensors is None and not kwargs:
            return self._encode_ids(text, allowed_special, disallowed_special)  # fast path: no HF bookkeeping
        return super().encode(
            text,
            text_pair,
            add_special_tokens,
            padding,
            truncation,
            max_length,
            stride,
            padding_side,
            return_tensors,
            allowed_special=allowed_special,
            disallowed_special=disallowed_special,
            **kwargs,
        )

    def _encode_plus(
        self,
        text,
        text_pair=None,
        *,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: AllowedSpecial = (),
        split_special_tokens: bool | None = None,
        **kwargs,
    ):
        if split_special_tokens if split_special_tokens is not None else self.split_special_tokens:
            allowed_special = set()
        single_text = isinstance(text, str) and (text_pair is None or isinstance(text_pair, str))
        if not single_text or kwargs.get("is_split_into_words") or kwargs.get("sanitize_control_tokens"):
            # batches (and pre-split input) come back here one sequence at a time
            return super()._encode_plus(
                text,
                text_pair,
                allowed_special=allowed_special,
                disallowed_special=disallowed_special,
                **kwargs,
            )
        pair_ids = (
            None if text_pair is None else self._encode_ids(text_pair, allowed_special, disallowed_special)
        )
        return self.prepare_for_model(
            self._encode_ids(text, allowed_special, disallowed_special),
            pair_ids=pair_ids,
            padding=kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD).value,
            truncation=kwargs.get("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE).value,
            prepend_batch_axis=True,
            **{name: kwargs[name] for name in _PREPARE_FOR_MODEL_ARGS if name in kwargs},
        )

    # ---- decoding ----

    def decode_bytes(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The raw bytes of `token_ids` (special tokens as their text), before any UTF-8 decoding."""
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        try:
            return self.encoding.decode_bytes(ids)
        except KeyError:
            unknown = sorted({i for i in ids if i not in self.decoder})
            raise ValueError(
                f"unknown token ids {unknown[:10]}: the Qwen vocabulary has ids "
                f"0..{self.encoding.n_vocab - 1}"
            ) from None

    def _decode(
        self, token_ids, skip_special_tokens: bool = False, errors: str | None = None, **kwargs
    ) -> str:
        return self.decode_bytes(token_ids, skip_special_tokens).decode("utf-8", errors=errors or self.errors)

    def convert_tokens_to_string(self, tokens: list[bytes | str]) -> str:
        parts = (t if isinstance(t, bytes) else t.encode("utf-8") for t in tokens)
        return b"".join(parts).decode("utf-8", errors=self.errors)

    # ---- saving ----

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write qwen.tiktoken (base ranks plus any extra vocabulary merged in at load time)."""
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf-8") as f:
            for token, rank in self.mergeable_ranks.items():
                f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
        return (path,)
