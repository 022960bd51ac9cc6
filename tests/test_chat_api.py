"""qwen.chat_api: the chat-model check, the chat stop words and the text stream every chat runtime shares."""

from types import SimpleNamespace

import pytest
from transformers import GenerationConfig

from qwen.chat_api import (
    StopStrings,
    TextStream,
    chat_stop_tokens,
    chat_stop_words,
    is_chat_model,
    require_chat_model,
)
from qwen.errors import NotAChatModelError, UserError
from qwen.evaluation import tasks
from qwen.sft import model as sft_model
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


def test_chat_stop_tokens_are_ids_for_one_token_words_and_text_for_longer_ones(tokenizer):
    config = GenerationConfig(chat_format="chatml", eos_token_id=[5, 6], stop_words_ids=[[42, 43], [9]])
    ids, texts = chat_stop_tokens(tokenizer, config)
    assert ids == tuple(sorted({tokenizer.eod_id, 5, 6, 9, *chatml_ids(tokenizer)}))
    assert texts == [tokenizer.decode([42, 43])]


@pytest.mark.parametrize("config, chats", [
    (GenerationConfig(chat_format="chatml"), True),
    (GenerationConfig(), True),  # every hub checkpoint says which; one that does not is read as ChatML
    (GenerationConfig(chat_format="raw"), False),  # Qwen-7B's generation_config.json
])
def test_the_chat_check_is_one_rule_for_chat_fine_tuning_and_evaluation(config, chats):
    model = SimpleNamespace(generation_config=config)
    assert is_chat_model(config) is chats and sft_model.is_chat_model(model) is chats
    if chats:
        tasks.require_chat(model, "chat_mmlu")
    else:
        with pytest.raises(NotAChatModelError, match=r"^evaluate_chat_mmlu.py needs a chat model .*'raw'.*"
                                                     r"pass -c Qwen/Qwen-7B-Chat, or use the base script"):
            tasks.require_chat(model, "chat_mmlu")


def test_the_benchmarks_stop_a_chat_reply_on_the_servers_stop_ids(tokenizer):
    from qwen.chat_backend import ChatBackend

    model = SimpleNamespace(generation_config=GenerationConfig(chat_format="chatml", eos_token_id=7,
                                                               stop_words_ids=[[8]]))
    assert tasks.chat_stop_ids(model, tokenizer) == ChatBackend(model, tokenizer, engine=None).stop_token_ids
    assert {7, 8, tokenizer.eod_id, *chatml_ids(tokenizer)} == set(tasks.chat_stop_ids(model, tokenizer))
