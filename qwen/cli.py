"""The terminal chat behind ``cli_demo.py``: commands, typed ``:conf`` parsing, streaming, save/load.

The original demo ran ``:conf`` values through Python's eval, never passed the edited config to generation,
and redrew the whole screen per token. Here values are parsed and range-checked against a table when they are
set (a bad one is one line of error, the old value stays), the session's ``GenerationConfig`` is what every
turn generates with, streaming appends only the new text, and a turn whose generation fails is reported and
dropped: the session and its history go on.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from transformers import GenerationConfig, set_seed

from qwen_generation_utils import DEFAULT_MAX_WINDOW_SIZE, DEFAULT_SYSTEM, encode_plain

from .errors import UsageError  # what a person typed (a command, a :conf value, a seed) cannot be used
from .sampling import BOUNDS
from .token_bounds import min_tokens

# C0/C1 control characters but tab and newline: printed raw, a saved or generated text could move the cursor,
# clear the screen, retitle the window or write links (ANSI / OSC escapes). Shown as \x1b etc. instead.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` safe for the terminal: control characters (ESC, CR, BEL, ...) written as visible \\xNN escapes."""
    return _CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_str_list(text: str) -> list[str]:
    try:
        value = json.loads(text) if text.startswith("[") else [text]
    except RecursionError:  # "[[[[..." deeper than Python's stack
        raise ValueError("nested too deeply") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError('expected a string or a JSON list of strings, e.g. ["END"]')
    return value


def _between(low: float, high: float, *, low_open: bool = False):
    def check(value) -> bool:
        return math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    return check


_ANY_FINITE = _between(-math.inf, math.inf)
SEED_RANGE = (0, 2**32 - 1)  # transformers.set_seed seeds numpy too, which takes no more


# The options `:conf` may set: option → (parser, check of the parsed value, what the check wants). GenerationConfig's
# own defaults are all None in transformers 5, so they cannot tell the type. max_window_size / chat_format are
# Qwen's additions. Answers are streamed token by token, which beam search cannot do: num_beams stays 1.
CONF_OPTIONS: dict[str, tuple[Callable[[str], Any], Callable[[Any], bool] | None, str]] = {
    "max_new_tokens": (int, BOUNDS["max_new_tokens"].__contains__, BOUNDS["max_new_tokens"].describe()),
    "min_new_tokens": (int, _between(0, math.inf), "at least 0"),
    "do_sample": (_parse_bool, None, ""),
    "temperature": (float, BOUNDS["temperature"].__contains__, BOUNDS["temperature"].describe()),
    "top_p": (float, BOUNDS["top_p"].__contains__, BOUNDS["top_p"].describe()),
    "top_k": (int, BOUNDS["top_k"].__contains__, BOUNDS["top_k"].describe()),
    "min_p": (float, _between(0, 1), "in [0, 1]"),
    "typical_p": (float, _between(0, 1, low_open=True), "in (0, 1]"),
    "repetition_penalty": (float, BOUNDS["repetition_penalty"].__contains__, BOUNDS["repetition_penalty"].describe()),
    "no_repeat_ngram_size": (int, _between(0, math.inf), "at least 0"),
    "num_beams": (int, _between(1, 1), "1: answers are streamed token by token, which beam search cannot do"),
    "length_penalty": (float, _ANY_FINITE, "a finite number"),
    "stop_strings": (_parse_str_list, lambda v: all(v), "strings that are not empty"),
    "max_window_size": (int, _between(1, math.inf), "at least 1"),
}


def parse_seed(text: str) -> int:
    """A seed as typed (`:seed N`, `--seed N`); UsageError unless it is an integer in SEED_RANGE."""
    try:
        seed = int(text)
    except ValueError:
        raise UsageError(f"seed must be an integer, not '{text}'") from None
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, not {seed}")
    return seed


def parse_conf_items(items: list[str]) -> dict[str, Any]:
    """``["max_new_tokens=5", "top_p=0.9"]`` → typed values; raises UsageError naming the bad item."""
    updates: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise UsageError(f"'{item}' is not key=value; e.g. :conf max_new_tokens=128 top_p=0.8")
        if key not in CONF_OPTIONS:
            known = ", ".join(CONF_OPTIONS)
            raise UsageError(f"unknown option '{key}'; settable options: {known}")
        if raw.lower() == "none":
            updates[key] = None
            continue
        try:
            updates[key] = CONF_OPTIONS[key][0](raw)
        except ValueError as exc:
            raise UsageError(f"bad value for {key}: '{raw}' ({exc})") from None
    return updates


def apply_conf(config: GenerationConfig, updates: dict[str, Any]) -> GenerationConfig:
    """A new config with ``updates`` applied and validated; ``config`` is left untouched."""
    for key, value in updates.items():
        _, check, wanted = CONF_OPTIONS.get(key, (None, None, ""))
        if value is not None and check is not None and not check(value):
            raise UsageError(f"bad value for {key}: {value!r} (must be {wanted})")
    new = copy.deepcopy(config)
    for key, value in updates.items():
        setattr(new, key, value)
    if new.temperature == 0:  # the OpenAI convention: temperature 0 means greedy
        new.do_sample, new.temperature = False, None
    elif updates.get("temperature") is not None and "do_sample" not in updates:
        new.do_sample = True  # asking for a temperature above 0 asks for sampling (the API server's meaning too)
    try:
        new.validate()  # not strict: sampling knobs left set under greedy decoding are harmless
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid generation config: {' '.join(str(exc).split())}") from None
    return new


@dataclass
class ChatSession:
    """One conversation: what the model sees (system, history) and how it generates (config, seed)."""

    model: Any
    tokenizer: Any
    config: GenerationConfig
    system: str = DEFAULT_SYSTEM
    seed: int = 1234
    history: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.initial_config = copy.deepcopy(self.config)

    def check_length(self, query: str) -> None:
        """UsageError when `query` alone is more tokens than a prompt may hold (max_window_size), so it could
        never be answered whole; the cheap lower bound is checked first, so a pasted 2 MB line is refused at once."""
        if self.tokenizer is None:
            return
        window = getattr(self.config, "max_window_size", None) or DEFAULT_MAX_WINDOW_SIZE
        bound = min_tokens(self.tokenizer, query)
        exact = bound <= window  # else the bound already says it is too long
        tokens = len(encode_plain(self.tokenizer, query)) if exact else bound
        if tokens > window:
            at_least = "" if exact else "at least "
            raise UsageError(f"this message is {at_least}{tokens:,} tokens, more than the {window:,} a prompt may "
                                 "hold (max_window_size); send a shorter one")

    def stream(self, query: str) -> Iterator[str]:
        """Yield the answer's new text piece by piece; the turn joins the history only once it completes.
        chat_stream cuts the config's stop strings and never samples ids past the tokenizer."""
        set_seed(self.seed)
        printed = ""
        stream = self.model.chat_stream(
            self.tokenizer, query, history=self.history, system=self.system, generation_config=self.config
        )
        try:
            for response in stream:  # the answer so far
                if piece := response[len(printed):]:
                    printed = response
                    yield piece
        finally:
            stream.close()  # stops generation at once when the consumer stops early (Ctrl-C)
        self.history.append((query, printed))

    def save(self, path: str) -> None:
        data = {"system": self.system, "history": [list(turn) for turn in self.history]}
        try:
            Path(path).expanduser().write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from None

    def load(self, path: str) -> None:
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise UsageError(f"{path} is not a JSON conversation saved with :save") from None
        turns = data.get("history") if isinstance(data, dict) else None
        valid = isinstance(turns, list) and all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in turns
        )
        if not valid or not isinstance(data.get("system", ""), str):
            raise UsageError(f"{path} is not a JSON conversation saved with :save")
        self.history = [(q, a) for q, a in turns]
        self.system = data.get("system", self.system)


HELP = """Commands:
  :help / :h              show this help
  :exit / :quit / :q      leave
  :clear / :cl            clear the screen
  :clear-his / :clh       forget the conversation
  :history / :his         show the conversation
  :seed [N]               show or set the random seed
  :conf [key=value ...]   show or change generation options (applies to the next answer)
  :reset-conf             restore the generation options the program started with
  :system [text]          show or set the system prompt (setting it clears nothing)
  :save FILE / :load FILE save or restore the conversation as JSON
Anything else is sent to the model; Ctrl-C stops an answer, Ctrl-C or Ctrl-D at the prompt exits."""

COMMAND_ALIASES = {
    ":help": "help", ":h": "help",
    ":exit": "exit", ":quit": "exit", ":q": "exit",
    ":clear": "clear", ":cl": "clear",
    ":clear-his": "clear_history", ":clh": "clear_history",
    ":history": "history", ":his": "history",
    ":seed": "seed",
    ":conf": "conf",
    ":reset-conf": "reset_conf",
    ":system": "system",
    ":save": "save",
    ":load": "load",
}  # fmt: skip


class Repl:
    """Reads lines, runs commands, streams answers. ``run()`` returns the exit status."""

    def __init__(self, session: ChatSession, out: TextIO = sys.stdout, read_line: Callable[[str], str] = input):
        self.session, self.out, self.read_line = session, out, read_line

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def run(self) -> int:
        self.say("Type :help for commands. Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt exits.")
        while True:
            try:
                line = self.read_line("\nUser> ")
            except (EOFError, KeyboardInterrupt):
                self.say()
                return 0
            except UnicodeDecodeError:
                self.say("That input is not valid UTF-8; please type it again.")
                continue
            text = line.strip()
            if not text:
                self.say("Please type a message or :help.")
                continue
            name, _, arg = text.partition(" ")
            command = COMMAND_ALIASES.get(name)
            if command is None:  # unknown ":word" goes to the model as text, as in the original
                self.answer(text)
                continue
            if command == "exit":
                return 0
            try:
                getattr(self, f"cmd_{command}")(arg.strip())
            except UsageError as exc:
                self.say(f"Error: {exc}")

    def answer(self, query: str) -> None:
        try:
            self.session.check_length(query)
        except UsageError as exc:
            self.say(f"Error: {exc}")
            return
        self.say("\nQwen> ", end="")
        try:
            for piece in self.session.stream(query):
                self.say(printable(piece), end="")
            self.say()
        except KeyboardInterrupt:
            self.say("\n[stopped; this answer is not kept in the history]")
        except Exception as exc:  # a failed generation ends this turn only; the conversation goes on
            self.say(f"\n[the answer failed ({type(exc).__name__}: {exc}); it is not kept in the history, "
                     "the conversation so far is kept]")

    def cmd_help(self, arg: str) -> None:
        self.say(HELP)

    def cmd_clear(self, arg: str) -> None:
        self.say("\033[H\033[2J", end="")

    def cmd_clear_history(self, arg: str) -> None:
        self.session.history.clear()
        self.say("History cleared.")

    def cmd_history(self, arg: str) -> None:
        if not self.session.history:
            self.say("(no history)")
        for i, (query, response) in enumerate(self.session.history, 1):
            self.say(f"[{i}] User: {printable(query)}\n[{i}] Qwen: {printable(response)}")

    def cmd_seed(self, arg: str) -> None:
        if arg:
            self.session.seed = parse_seed(arg)
        self.say(f"seed = {self.session.seed}")

    def cmd_conf(self, arg: str) -> None:
        if arg:
            self.session.config = apply_conf(self.session.config, parse_conf_items(arg.split()))
        shown = {key: getattr(self.session.config, key, None) for key in CONF_OPTIONS}
        self.say("  ".join(f"{key}={value}" for key, value in shown.items() if value is not None))

    def cmd_reset_conf(self, arg: str) -> None:
        self.session.config = copy.deepcopy(self.session.initial_config)
        self.say("Generation options restored.")

    def cmd_system(self, arg: str) -> None:
        if arg:
            self.session.system = arg
        self.say(f"system: {printable(self.session.system)}")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise UsageError("say where to save, e.g. :save chat.json")
        self.session.save(arg)
        self.say(f"Saved {len(self.session.history)} turns to {arg}.")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise UsageError("say which file to load, e.g. :load chat.json")
        self.session.load(arg)
        self.say(f"Loaded {len(self.session.history)} turns from {arg}.")
