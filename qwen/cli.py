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
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from transformers import GenerationConfig, set_seed

from qwen_generation_utils import DEFAULT_SYSTEM, suppress_undecodable

from .chat_backend import StopStrings


class UserInputError(ValueError):
    """A mistake in what the user typed; the message says what is wrong and what to do."""


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_str_list(text: str) -> list[str]:
    value = json.loads(text) if text.startswith("[") else [text]
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
    "max_new_tokens": (int, _between(1, math.inf), "at least 1"),
    "min_new_tokens": (int, _between(0, math.inf), "at least 0"),
    "do_sample": (_parse_bool, None, ""),
    "temperature": (float, _between(0, math.inf), "a number >= 0 (0 means greedy)"),
    "top_p": (float, _between(0, 1, low_open=True), "in (0, 1]"),
    "top_k": (int, _between(0, math.inf), "at least 0 (0 means off)"),
    "min_p": (float, _between(0, 1), "in [0, 1]"),
    "typical_p": (float, _between(0, 1, low_open=True), "in (0, 1]"),
    # bounded as the API server's: dividing a logit by a tinier one overflows to inf / NaN
    "repetition_penalty": (float, _between(0.01, 100), "in [0.01, 100] (1 means off)"),
    "no_repeat_ngram_size": (int, _between(0, math.inf), "at least 0"),
    "num_beams": (int, _between(1, 1), "1: answers are streamed token by token, which beam search cannot do"),
    "length_penalty": (float, _ANY_FINITE, "a finite number"),
    "stop_strings": (_parse_str_list, lambda v: all(v), "strings that are not empty"),
    "max_window_size": (int, _between(1, math.inf), "at least 1"),
}


def parse_seed(text: str) -> int:
    """A seed as typed (`:seed N`, `--seed N`); UserInputError unless it is an integer in SEED_RANGE."""
    try:
        seed = int(text)
    except ValueError:
        raise UserInputError(f"seed must be an integer, not '{text}'") from None
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UserInputError(f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, not {seed}")
    return seed


def parse_conf_items(items: list[str]) -> dict[str, Any]:
    """``["max_new_tokens=5", "top_p=0.9"]`` → typed values; raises UserInputError naming the bad item."""
    updates: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise UserInputError(f"'{item}' is not key=value; e.g. :conf max_new_tokens=128 top_p=0.8")
        if key not in CONF_OPTIONS:
            known = ", ".join(CONF_OPTIONS)
            raise UserInputError(f"unknown option '{key}'; settable options: {known}")
        if raw.lower() == "none":
            updates[key] = None
            continue
        try:
            updates[key] = CONF_OPTIONS[key][0](raw)
        except ValueError as exc:
            raise UserInputError(f"bad value for {key}: '{raw}' ({exc})") from None
    return updates


def apply_conf(config: GenerationConfig, updates: dict[str, Any]) -> GenerationConfig:
    """A new config with ``updates`` applied and validated; ``config`` is left untouched."""
    for key, value in updates.items():
        _, check, wanted = CONF_OPTIONS.get(key, (None, None, ""))
        if value is not None and check is not None and not check(value):
            raise UserInputError(f"bad value for {key}: {value!r} (must be {wanted})")
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
        raise UserInputError(f"invalid generation config: {' '.join(str(exc).split())}") from None
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

    def generation_config(self) -> GenerationConfig:
        """This turn's config: stop strings are cut here (generate() would need the tokenizer passed for them),
        and ids past the tokenizer (padding rows of the output layer: Qwen has 151,936 for 151,851 ids) are
        never sampled."""
        config = copy.deepcopy(self.config)
        config.stop_strings = None
        if self.tokenizer is not None:
            suppress_undecodable(config, self.tokenizer, self.model)
        return config

    def stream(self, query: str) -> Iterator[str]:
        """Yield the answer's new text piece by piece; the turn joins the history only once it completes."""
        set_seed(self.seed)
        seen, printed = "", ""
        cutter = StopStrings(self.config.stop_strings or [])
        stream = self.model.chat_stream(
            self.tokenizer, query, history=self.history, system=self.system,
            generation_config=self.generation_config(),
        )
        try:
            for response in stream:
                if len(response) > len(seen):
                    piece = cutter.push(response[len(seen):])
                    seen = response
                    if piece:
                        printed += piece
                        yield piece
                if cutter.stopped:
                    break
            if piece := cutter.flush():
                printed += piece
                yield piece
        finally:
            stream.close()  # stops generation at once when the consumer stops early (Ctrl-C, a stop string)
        self.history.append((query, printed))

    def save(self, path: str) -> None:
        data = {"system": self.system, "history": [list(turn) for turn in self.history]}
        try:
            Path(path).expanduser().write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        except OSError as exc:
            raise UserInputError(f"cannot write {path}: {exc.strerror}") from None

    def load(self, path: str) -> None:
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except OSError as exc:
            raise UserInputError(f"cannot read {path}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserInputError(f"{path} is not a JSON conversation saved with :save") from None
        turns = data.get("history") if isinstance(data, dict) else None
        valid = isinstance(turns, list) and all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in turns
        )
        if not valid or not isinstance(data.get("system", ""), str):
            raise UserInputError(f"{path} is not a JSON conversation saved with :save")
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
            except UserInputError as exc:
                self.say(f"Error: {exc}")

    def answer(self, query: str) -> None:
        self.say("\nQwen> ", end="")
        try:
            for piece in self.session.stream(query):
                self.say(piece, end="")
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
            self.say(f"[{i}] User: {query}\n[{i}] Qwen: {response}")

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
        self.say(f"system: {self.session.system}")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise UserInputError("say where to save, e.g. :save chat.json")
        self.session.save(arg)
        self.say(f"Saved {len(self.session.history)} turns to {arg}.")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise UserInputError("say which file to load, e.g. :load chat.json")
        self.session.load(arg)
        self.say(f"Loaded {len(self.session.history)} turns from {arg}.")
