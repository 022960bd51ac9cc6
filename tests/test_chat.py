"""model.chat / model.chat_stream on a tiny random model with the real Qwen vocabulary (shipped by dashscope).

A random model says nothing useful, so a scripted logits processor makes it "say" a chosen token sequence;
what is tested is the chat machinery around generation: prompt, history, stop words, streaming, overrides.
"""

import threading

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, PreTrainedTokenizerFast

from qwen.configuration_qwen import QWenConfig
from qwen.modeling_qwen import QWenLMHeadModel
from qwen.tokenization_qwen import QWenTokenizer
from qwen_generation_utils import make_context


class Script(LogitsProcessor):
    """Forces the model to emit `ids` in order (then repeats the last one); records the prompt and the steps."""

    def __init__(self, ids: list[int]):
        self.ids = ids
        self.prompt: list[int] | None = None
        self.steps = 0

    def __call__(self, input_ids, scores):
        if self.prompt is None:
            self.prompt = input_ids[0].tolist()
        step = input_ids.shape[1] - len(self.prompt)
        self.steps += 1
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0.0
        return forced


def tiny_chat_model(vocab_size: int, eos_token_id: int, chat_format: str = "chatml") -> QWenLMHeadModel:
    torch.manual_seed(0)
    config = QWenConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
        intermediate_size=192, seq_length=2048,
    )  # fmt: skip
    model = QWenLMHeadModel(config).eval()
    model.generation_config = GenerationConfig(
        chat_format=chat_format, max_window_size=6144, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        max_new_tokens=40, do_sample=False,
    )  # fmt: skip
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return QWenTokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_chat_model(151936, tokenizer.eod_id)


def reply_ids(tokenizer, text: str, tail: str = " and then garbage") -> list[int]:
    """The scripted reply: `text`, <|im_end|>, then text that must never show up."""
    return tokenizer.encode(text) + [tokenizer.im_end_id] + tokenizer.encode(tail)


def test_chat_returns_the_reply_and_extends_history(model, tokenizer):
    script = Script(reply_ids(tokenizer, "Hello, 世界! "))
    history = [("earlier question", "earlier answer")]
    response, new_history = model.chat(tokenizer, "hi there", history=history, logits_processor=[script])
    assert response == "Hello, 世界!"  # stripped, stop word and what follows cut off
    assert new_history == [("earlier question", "earlier answer"), ("hi there", "Hello, 世界!")]
    assert history == [("earlier question", "earlier answer")]  # the caller's list is not modified
    _, expected_prompt = make_context(tokenizer, "hi there", history, "You are a helpful assistant.", 6144)
    assert script.prompt == expected_prompt


def test_stop_word_ends_generation(model, tokenizer):
    reply = tokenizer.encode("short")
    script = Script(reply + [tokenizer.im_end_id] + tokenizer.encode(" never generated at all"))
    model.chat(tokenizer, "q", logits_processor=[script])
    # the reply, <|im_end|>, then the forced <|endoftext|>: nothing of the tail
    assert script.steps == len(reply) + 2


def test_im_start_also_ends_the_reply(model, tokenizer):
    script = Script(tokenizer.encode("first") + [tokenizer.im_start_id] + tokenizer.encode("user\nmore"))
    response, _ = model.chat(tokenizer, "q", logits_processor=[script])
    assert response == "first"


def test_extra_stop_words_ids(model, tokenizer):
    stop = tokenizer.encode("Observation:")
    script = Script(tokenizer.encode("Thought: look it up\nObservation: result"))
    response, _ = model.chat(tokenizer, "q", stop_words_ids=[stop], logits_processor=[script])
    assert response == "Thought: look it up\nObservation:"


def test_system_prompt_goes_into_the_prompt(model, tokenizer):
    script = Script(reply_ids(tokenizer, "Arr."))
    model.chat(tokenizer, "who are you?", system="You are a pirate.", logits_processor=[script])
    _, expected_prompt = make_context(tokenizer, "who are you?", [], "You are a pirate.", 6144)
    assert script.prompt == expected_prompt
    assert "<|im_start|>system\nYou are a pirate.<|im_end|>" in tokenizer.decode(script.prompt)


def test_history_is_trimmed_to_the_window(model, tokenizer):
    history = [(f"question {i} " + "words " * 30, f"answer {i} " + "more " * 30) for i in range(4)]
    script = Script(reply_ids(tokenizer, "ok"))
    model.chat(tokenizer, "last", history=history, max_window_size=150, logits_processor=[script])
    _, expected_prompt = make_context(tokenizer, "last", history, "You are a helpful assistant.", 150)
    assert script.prompt == expected_prompt
    prompt_text = tokenizer.decode(script.prompt)
    assert "question 3" in prompt_text and "question 0" not in prompt_text


def test_keyword_arguments_override_the_generation_config_for_one_call(model, tokenizer):
    script = Script(tokenizer.encode(" a b c d e f g h i j k"))
    response, _ = model.chat(tokenizer, "q", max_new_tokens=3, logits_processor=[script])
    assert script.steps == 3 and response == "a b c"
    assert model.generation_config.max_new_tokens == 40


def test_stream_yields_growing_text_ending_in_the_chat_response(model, tokenizer):
    script_ids = reply_ids(tokenizer, "流式输出 works, 好的! ")
    response, _ = model.chat(tokenizer, "q", logits_processor=[Script(script_ids)])
    chunks = list(model.chat_stream(tokenizer, "q", logits_processor=[Script(script_ids)]))
    assert len(chunks) > 3 and chunks[-1] == response
    assert all(later.startswith(earlier) for earlier, later in zip(chunks, chunks[1:], strict=False))
    assert all("\ufffd" not in chunk for chunk in chunks)  # never half a character


def test_closing_the_stream_stops_generation(model, tokenizer):
    script = Script(tokenizer.encode(" again"))  # never ends by itself
    stream = model.chat_stream(tokenizer, "q", max_new_tokens=400, logits_processor=[script])
    assert next(stream) == "again"
    stream.close()  # what a consumer does on Ctrl-C / disconnect
    assert script.steps < 400
    assert not any(t.name == "qwen-chat-stream" and t.is_alive() for t in threading.enumerate())


def test_stream_ends_at_a_stop_string_split_over_tokens(model, tokenizer):
    """generation_config.stop_strings end the stream (the text before them is the answer) and the generation."""
    script = Script(tokenizer.encode(" one two three"))  # then " three" forever
    chunks = list(model.chat_stream(tokenizer, "q", max_new_tokens=400, stop_strings=["two three"],
                                    logits_processor=[script]))
    assert chunks[-1] == "one" and script.steps < 400


def test_base_model_refuses_chat(tokenizer):
    base = tiny_chat_model(151936, tokenizer.eod_id, chat_format="raw")
    with pytest.raises(ValueError, match="base model"):
        base.chat(tokenizer, "hi")
    with pytest.raises(ValueError, match="base model"):
        next(base.chat_stream(tokenizer, "hi"))


def chatml_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A small non-Qwen byte-level BPE tokenizer with the ChatML tokens (as SmolLM2's)."""
    from tokenizers import ByteLevelBPETokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, a chat model says hello"] * 10, vocab_size=300, special_tokens=specials)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def test_chat_with_a_non_qwen_chatml_tokenizer():
    tokenizer = chatml_byte_tokenizer()
    model = tiny_chat_model(len(tokenizer), tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    script_ids = tokenizer.encode("hello world, é!") + [im_end] + tokenizer.encode("tail")
    response, history = model.chat(tokenizer, "hi", logits_processor=[Script(script_ids)])
    assert response == "hello world, é!" and history == [("hi", response)]
    chunks = list(model.chat_stream(tokenizer, "hi", logits_processor=[Script(script_ids)]))
    assert chunks[-1] == response


def test_chat_never_samples_an_id_the_tokenizer_cannot_decode(tokenizer):
    """The output layer has 151,936 rows for 151,851 ids: make a padding row the most likely one everywhere."""
    model = tiny_chat_model(151936, tokenizer.eod_id)
    padding_row = len(tokenizer) + 10
    with torch.no_grad():
        model.lm_head.weight[padding_row] = model.transformer.ln_f.weight * 50
    response, _ = model.chat(tokenizer, "Hi", history=[], max_new_tokens=5)
    streamed = list(model.chat_stream(tokenizer, "Hi", history=[], max_new_tokens=5))
    assert isinstance(response, str) and streamed  # decoded, no "unknown token id" error
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, suppress_tokens=None)[0, 3:].tolist()
    assert ids == [padding_row] * 3  # the row really wins when nothing masks it
