"""qwen.chat_api: the chat-model check, the chat stop words and the text stream every chat runtime shares."""

import pytest
from transformers import GenerationConfig

from qwen.chat_api import StopStrings, TextStream, chat_stop_words, is_chat_model, require_chat_model
from qwen.errors import UserError
from qwen.tokenization_qwen import QWenTokenizer
from qwen_generation_utils import chatml_ids


@pytest.fixture(scope="module")
def tokenizer():
    return QWenTokenizer()


def test_stop_strings_held_back_across_chunks():
    cutter = StopStrings(["o, thr"])
    pieces = [cutter.push(t) for t in ["one, t", "w", "o", ",", " th", "ree"]]
    assert "".join(pieces) == "one, tw" and cutter.stopped
    assert pieces == ["one, t", "w", "", "", "", ""]  # "o", "o,", "o, th" held back: they may start the stop
    assert StopStrings(["xyz"]).push("abc x") == "abc "


def test_text_stream_never_splits_a_character_and_cuts_a_stop_string_split_over_tokens(tokenizer):
    ids = tokenizer.encode("好的 one two three four")
    stream = TextStream(tokenizer, ["two thr"])
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.finish() == "好的 one " and stream.stopped
    plain = TextStream(tokenizer)
    assert "".join(plain.push(i) for i in ids) + plain.finish() == "好的 one two three four"


def test_chat_stop_words_are_the_formats_and_the_checkpoints_once(tokenizer):
    config = GenerationConfig(chat_format="chatml", stop_words_ids=[[42, 43], [chatml_ids(tokenizer)[0]]])
    words = chat_stop_words(tokenizer, config, extra=[[7]])
    assert words[:2] == [[7], [42, 43]]
    assert sorted(seq[0] for seq in words if len(seq) == 1) == sorted([7, *chatml_ids(tokenizer)])
    assert len(words) == len({tuple(w) for w in words})


def test_a_base_model_is_not_a_chat_model():
    assert is_chat_model(GenerationConfig(chat_format="chatml")) and is_chat_model(GenerationConfig())
    base = GenerationConfig(chat_format="raw")
    with pytest.raises(UserError, match="web_demo.py needs a chat model.*'raw'"):
        require_chat_model(base, "web_demo.py")
    with pytest.raises(ValueError):  # model.chat()'s callers catch ValueError, as with the original
        require_chat_model(base, "chat()")
