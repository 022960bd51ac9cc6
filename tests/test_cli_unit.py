"""The terminal chat's logic without a model: typed :conf parsing, save/load, command dispatch."""

import json

import pytest
from conftest import run_repl as shared_run_repl
from transformers import GenerationConfig

from qwen.cli import apply_conf, parse_conf_items
from qwen.errors import UsageError


def test_conf_values_are_parsed_by_type_never_evaluated():
    updates = parse_conf_items(["max_new_tokens=5", "top_p=0.5", "do_sample=false", 'stop_strings=["END"]'])
    assert updates == {"max_new_tokens": 5, "top_p": 0.5, "do_sample": False, "stop_strings": ["END"]}
    assert type(updates["max_new_tokens"]) is int and type(updates["top_p"]) is float
    with pytest.raises(UsageError, match="bad value for max_new_tokens"):
        parse_conf_items(["max_new_tokens=__import__('os').system('true')"])


@pytest.mark.parametrize(
    "item, message",
    [("bogus=1", "unknown option 'bogus'"), ("top_p", "is not key=value"), ("top_k=abc", "bad value for top_k")],
)
def test_conf_mistakes_name_the_problem(item, message):
    with pytest.raises(UsageError, match=message):
        parse_conf_items([item])


def test_apply_conf_validates_and_keeps_the_original():
    base = GenerationConfig(do_sample=True, top_p=0.8, max_new_tokens=512)
    new = apply_conf(base, {"max_new_tokens": 5, "temperature": 0})
    assert new.max_new_tokens == 5 and new.do_sample is False
    assert base.max_new_tokens == 512 and base.do_sample is True
    with pytest.raises(UsageError, match="bad value for max_new_tokens"):
        apply_conf(base, {"max_new_tokens": -3})
    with pytest.raises(UsageError, match="invalid generation config"):  # GenerationConfig's own checks
        apply_conf(base, {"early_stopping": "bogus"})


def test_a_temperature_above_zero_turns_sampling_on():
    greedy = GenerationConfig(do_sample=False, max_new_tokens=512)  # e.g. the demo model's default
    assert apply_conf(greedy, {"temperature": 0.7}).do_sample is True
    assert apply_conf(greedy, {"temperature": 0.7, "do_sample": False}).do_sample is False  # said explicitly
    assert apply_conf(greedy, {"top_p": 0.5}).do_sample is False


class FakeStreamingModel:
    """Stands in for the model so the REPL's wiring can be checked without weights."""

    def __init__(self):
        self.calls = []

    def chat_stream(self, tokenizer, query, history, system, generation_config):
        self.calls.append((query, list(history), system, generation_config.max_new_tokens))
        self.stop_strings = generation_config.stop_strings
        yield "Hel"
        yield "Hello"


def run_repl(lines, model=None, tmp_config=None):
    return shared_run_repl(lines, model or FakeStreamingModel(), tmp_config or GenerationConfig(max_new_tokens=512))


def test_repl_streams_and_applies_conf_to_the_next_turn(tmp_path):
    status, out, session, model = run_repl(["hi", ":conf max_new_tokens=7", "again", ":conf bogus=1", ":q"])
    assert status == 0
    assert "Qwen> Hello\n" in out  # appended pieces, not redrawn text
    assert [call[3] for call in model.calls] == [512, 7]
    assert "Error: unknown option 'bogus'" in out
    assert session.history == [("hi", "Hello"), ("again", "Hello")]


def test_save_then_load_restores_history_and_system(tmp_path):
    path = tmp_path / "chat.json"
    _, _, session, _ = run_repl(["hi", ":system Be terse.", f":save {path}", ":clh"])
    assert session.history == [] and json.loads(path.read_text())["history"] == [["hi", "Hello"]]
    _, out, session, _ = run_repl([f":load {path}", ":his"])
    assert session.history == [("hi", "Hello")] and session.system == "Be terse."
    assert "[1] User: hi" in out


def test_load_of_a_bad_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    status, out, session, _ = run_repl([f":load {bad}", f":load {tmp_path / 'missing.json'}"])
    assert status == 0 and session.history == []
    assert "is not a JSON conversation saved with :save" in out and "cannot read" in out


def test_unknown_colon_word_goes_to_the_model():
    _, _, _, model = run_repl([":hello there"])
    assert model.calls[0][0] == ":hello there"


def test_bad_settings_are_refused_when_set_and_the_session_goes_on():
    """Each of these used to be accepted and crash the chat at the next message (or hang it: num_beams)."""
    bad = [":seed -1", ":seed 99999999999999", ":conf temperature=nan", ":conf top_k=-5",
           ":conf repetition_penalty=0", ":conf num_beams=3", ":conf top_p=0", ":conf stop_strings=[\"\"]"]
    status, out, session, model = run_repl([*bad, "hi", ":q"])
    assert status == 0
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == len(bad), out
    assert "seed must be between 0 and 4294967295" in errors[0] and "must be at least 0" in errors[3]
    assert "beam search" in errors[5]
    assert session.seed == 1234 and session.config.to_dict() == session.initial_config.to_dict()
    assert session.history == [("hi", "Hello")]


class FailingOnceModel(FakeStreamingModel):
    def chat_stream(self, tokenizer, query, history, system, generation_config):
        if query == "boom":
            yield "Hel"
            raise RuntimeError("CUDA out of memory")
        yield from super().chat_stream(tokenizer, query, history, system, generation_config)


def test_a_failed_generation_ends_the_turn_not_the_session():
    status, out, session, _ = run_repl(["hi", "boom", "again", ":q"], model=FailingOnceModel())
    assert status == 0
    assert "[the answer failed (RuntimeError: CUDA out of memory)" in out
    assert session.history == [("hi", "Hello"), ("again", "Hello")]


def test_stop_strings_reach_the_chat_stream():
    """`:conf stop_strings` goes to chat_stream, which cuts them (test_chat: chat_stream cuts stop strings)."""
    _, _, _, model = run_repl([':conf stop_strings=["llo"]', "hi"])
    assert model.stop_strings == ["llo"]
