import json
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from qwen.compat import CACHE_ARG, cache_kwargs
from qwen_generation_utils import encode_plain

REPO = Path(__file__).resolve().parents[1]
# Golden data produced by the original 2023 code (see tests/data/README.md); part of the repository.
REFERENCE = REPO / "tests" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require_program(path: str, install: str) -> None:
    """Skip (fail under CI, which installs everything) a test whose system program is missing, naming the install."""
    if not Path(path).exists():
        message = f"needs {path}, missing here: install it with `{install}`"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


def load_reference(name: str) -> dict:
    return json.loads((REFERENCE / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The converted offline demo model; prepared once ($QWEN_DEMO_DIR or the user cache), then reused."""
    from qwen.demo import demo_checkpoint as prepare

    return prepare()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_checkpoint)


# ------------------------------------------------------------------------------------------------------------
# A scripted model and a real uvicorn server, shared by the API server tests


COUNTING = "one, two, three, four, five, six, seven, eight, nine, ten."
THOUGHT = "I need the weather."
ARGUMENTS = '{"location": "Boston, MA"}'
# A ReAct call; the model would go on to invent the tool's result, which the "Observation:" stop word cuts.
CALL = f"Thought: {THOUGHT}\nAction: get_current_weather\nAction Input: {ARGUMENTS}\nObservation: invented"
CALL_AT_START = 'Action: lookup_city\nAction Input: {"name": "Paris"}\nObservation: invented'
FINAL = " I now know the final answer.\nFinal Answer: It is sunny and 22 °C in Boston."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location.",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}


def script(prompt: str) -> str:
    """What the scripted model answers to a prompt (its text, special tokens included)."""
    if prompt.endswith("Thought:"):  # continuing after a tool result
        return FINAL
    if "Action: the action to take, should be one of [lookup_city]" in prompt:
        return CALL_AT_START
    if "Action Input:" in prompt:  # the ReAct instruction: tools are on
        return CALL
    if "forever" in prompt:  # a minute or more at one token per 0.05 s: only a cancel ends it early
        return COUNTING * 50
    return COUNTING


class ScriptedLM(torch.nn.Module):
    """Writes script(prompt) token by token, then <|im_end|>: a model whose output is known in advance.

    Its cache (one layer) holds each row's token ids: key channel 0 is id + 1 (0 = padding), channel 1 marks
    prompt positions. So the real engine's cache merging, padding and row dropping keep every row's state.
    """

    def __init__(self, tokenizer, delay: float = 0.0):
        super().__init__()
        self.embed = torch.nn.Embedding(len(tokenizer), 1)  # unused: gives the engine a device and a vocab size
        self.tokenizer, self.delay = tokenizer, delay
        self.config = SimpleNamespace(max_position_embeddings=1024)
        self.generation_config = GenerationConfig(chat_format="chatml", max_window_size=6144, max_new_tokens=2000,
                                                  do_sample=False)
        self.prompts: list[list[int]] = []  # every prompt seen, in order
        self._targets: dict[tuple, list[int]] = {}

    def get_input_embeddings(self):
        return self.embed

    def target(self, prompt: list[int]) -> list[int]:
        key = tuple(prompt)
        if key not in self._targets:
            text = script(self.tokenizer.decode(prompt))
            self._targets[key] = encode_plain(self.tokenizer, text) + [self.tokenizer.im_end_id]
            self.prompts.append(prompt)
        return self._targets[key]

    def forward(self, input_ids, attention_mask, **kwargs):
        past_key_values = kwargs[CACHE_ARG]
        if self.delay:
            time.sleep(self.delay)
        width = input_ids.shape[1]
        is_prompt = float(past_key_values.get_seq_length() == 0)
        state = torch.stack([(input_ids + 1) * attention_mask[:, -width:], torch.full_like(input_ids, is_prompt)], -1)
        keys, _ = past_key_values.update(state[:, None].float(), state[:, None].float(), 0)
        logits = torch.full((input_ids.shape[0], 1, len(self.tokenizer)), -1e4)
        for row, (ids, prompt_flags) in enumerate(zip(keys[:, 0, :, 0].long() - 1, keys[:, 0, :, 1] > 0, strict=True)):
            prompt, generated = ids[(ids >= 0) & prompt_flags].tolist(), ids[(ids >= 0) & ~prompt_flags].tolist()
            target = self.target(prompt)
            logits[row, -1, target[min(len(generated), len(target) - 1)]] = 0
        return CausalLMOutputWithPast(logits=logits, **cache_kwargs(past_key_values))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on a free 127.0.0.1 port from a background thread."""

    def __init__(self, app):
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        import uvicorn  # the API extra: not in the core tests' environment

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the test server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
