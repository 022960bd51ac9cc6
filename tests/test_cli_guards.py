"""The terminal chat survives hostile input: deeply nested JSON, escape sequences in a saved history, a line far
longer than a prompt may hold."""

import json

from conftest import run_repl
from transformers import GenerationConfig


class EchoModel:
    """Answers every query with a fixed text; records what it was asked."""

    def __init__(self, answer="fine"):
        self.answer, self.queries = answer, []

    def chat_stream(self, tokenizer, query, history, system, generation_config):
        self.queries.append(query)
        yield self.answer


def run(lines, tokenizer=None, model=None, config=None):
    return run_repl(lines, model or EchoModel(), config or GenerationConfig(max_new_tokens=8), tokenizer)


def test_deeply_nested_json_is_one_error_line(tmp_path):
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000)
    status, out, session, _ = run([f":load {nested}", ":conf stop_strings=" + "[" * 100_000, "hi", ":q"])
    assert status == 0
    assert f"Error: {nested} is not a JSON conversation saved with :save" in out
    assert "Error: bad value for stop_strings" in out and "nested too deeply" in out
    assert "Qwen> fine" in out  # the session went on


def test_history_shows_escape_sequences_instead_of_running_them(tmp_path):
    hostile = "\x1b]0;owned\x07\x1b[2J\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\\rover"
    saved = tmp_path / "chat.json"
    saved.write_text(json.dumps({"system": "sys\x1b[31m", "history": [[hostile, "answer\x9b1m\ttab\nnext"]]}))
    status, out, _, _ = run([f":load {saved}", ":history", ":system"], model=EchoModel("\x1b[2J"))
    assert status == 0
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\x9b" not in out
    assert "\\x1b]0;owned\\x07\\x1b[2J" in out and "\\x0dover" in out
    assert "answer\\x9b1m\ttab\nnext" in out  # tabs and newlines stay
    assert "system: sys\\x1b[31m" in out


def test_a_line_longer_than_the_prompt_window_is_refused_at_once(demo_tokenizer):
    config = GenerationConfig(max_new_tokens=8, max_window_size=8192)
    huge = "word " * 400_000  # 2 MB

    status, out, session, model = run([huge, "short question"], tokenizer=demo_tokenizer, config=config)
    assert status == 0
    assert "Error: this message is at least" in out and "more than the 8,192 a prompt may hold" in out
    assert model.queries == ["short question"] and len(session.history) == 1
    # just over the window: tokenized, and the exact count is named
    over = "hello " * 8_200
    _, out, _, model = run([over], tokenizer=demo_tokenizer, config=config)
    assert model.queries == [] and "Error: this message is 8,20" in out
