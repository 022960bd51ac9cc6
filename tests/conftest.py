import io
import json
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from qwen.compat import CACHE_ARG, cache_kwargs
from qwen_generation_utils import encode_plain

pytest_plugins = ["heartbeat"]  # a line a minute while a long test runs (tests/heartbeat.py)

REPO = Path(__file__).resolve().parents[1]
# Golden data produced by the original 2023 code (see tests/data/README.md); part of the repository.
REFERENCE = REPO / "tests" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require_program(path: str, install: str, alternative: str = "") -> None:
    """Skip (fail under CI, which installs everything) a test whose system program is missing, naming the install."""
    if not Path(path).exists():
        message = f"needs {path}, missing here: install it with `{install}`{alternative}"
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
    if "from memory" in prompt:  # tools offered, none called: a direct ReAct final answer
        return "Thought: I know this.\nFinal Answer: It is always sunny in Boston."
    if "Action: the action to take, should be one of [lookup_city]" in prompt:
        return CALL_AT_START
    if "Action Input:" in prompt:  # the ReAct instruction: tools are on
        return CALL
    if "forever" in prompt:  # a minute or more at one token per 0.05 s: only a cancel ends it early
        return COUNTING * 50
    return COUNTING


class ScriptedLM(torch.nn.Module):
    """Writes script(prompt) token by token, then <|im_end|>: a model whose output is known in advance.

    Its cache (one layer) holds each row's token ids: key channel 0 is id + 1, channel 1 marks prompt tokens (those
    the engine feeds in a prefill call, which asks for the last logits only). A row sees the cache columns the
    engine's attention mask opens to its last token, so the real engine's slots, chunks and masks keep every row's
    state; the engine's filler rows (token 0 at position 0 in a decode call) are skipped.
    """

    # its cache records which call fed each token, so a reused prefix (prompt + answer) would read as generated
    supports_prefix_cache = False

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

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, **kwargs):
        cache = kwargs[CACHE_ARG]
        if self.delay:
            time.sleep(self.delay)
        prefill = logits_to_keep == 1
        state = torch.stack([input_ids + 1, torch.full_like(input_ids, prefill)], -1).float()  # [n, T, 2]
        keys, _ = cache.update(state[:, None], state[:, None], 0)
        seen = attention_mask[:, 0, -1, :] == 0  # the columns each row's last token attends to
        logits = torch.full((input_ids.shape[0], 1, len(self.tokenizer)), -1e4)
        for row in range(input_ids.shape[0]):
            if not prefill and int(position_ids[row, -1]) == 0:
                continue  # a filler row of the decode step
            ids, prompt_flags = keys[row, 0, seen[row], 0].long() - 1, keys[row, 0, seen[row], 1] > 0
            prompt, generated = ids[prompt_flags].tolist(), ids[~prompt_flags].tolist()
            target = self.target(prompt)
            logits[row, -1, target[min(len(generated), len(target) - 1)]] = 0
        return CausalLMOutputWithPast(logits=logits, **cache_kwargs(cache))


def run_repl(lines, model, config, tokenizer=None):
    """Runs qwen.cli's Repl over `lines` as typed input (EOF after them): (status, printed text, session, model)."""
    from qwen.cli import ChatSession, Repl

    session = ChatSession(model, tokenizer, config)
    inputs = iter(lines)

    def read_line(prompt):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    status = Repl(session, out=out, read_line=read_line).run()
    return status, out.getvalue(), session, model


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


# ---- tiny models for the engine tests ----

ENGINE_TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _hf_model(name):
    # a larger init than the default spreads the logits, so greedy picks are not near-ties
    common = dict(ENGINE_TINY, intermediate_size=128, num_key_value_heads=2, initializer_range=0.1)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[name]
    return model_cls(config_cls(**common, bos_token_id=None, eos_token_id=None, pad_token_id=0))


def _qwen_model():
    from qwen.configuration_qwen import QWenConfig
    from qwen.modeling_qwen import QWenLMHeadModel

    # seq_length 8: some rows start above it, others cross it while in the batch (NTK alpha and logN change)
    config = QWenConfig(**ENGINE_TINY, kv_channels=16, intermediate_size=256, seq_length=8, initializer_range=0.1)
    return QWenLMHeadModel(config)


def build_engine_model(name: str):
    """A tiny random "llama", "qwen2" or "qwen" model for the engine tests (seeded, no eos: exact lengths)."""
    torch.manual_seed(0)
    model = (_qwen_model() if name == "qwen" else _hf_model(name)).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like the engine
    model.generation_config.pad_token_id = 0
    return model


def generate_tokens(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of model.generate on the prompt alone, no padding: what the engine must give a request."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def generate_logprobs(model, prompt: list[int], n: int) -> list[float]:
    """Log-probabilities of each greedy token under model.generate on the prompt alone."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[0, len(prompt) :]
    return [float(step[0].log_softmax(-1)[t]) for step, t in zip(out.logits, tokens, strict=True)]


# ------------------------------------------------------------------------------------------------------------
# A tiny random QWen model, shared by the model and KV-cache tests


TINY_VOCAB = 128  # the vocabulary of tiny_config's models


def tiny_config(**overrides):
    """A tiny QWen config (2 layers, 64 wide) for the model and KV-cache tests; `overrides` replace its fields."""
    from qwen.configuration_qwen import QWenConfig

    fields = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_channels=16,
        intermediate_size=192,
        seq_length=64,
        max_position_embeddings=256,
        initializer_range=0.2,  # wide logit gaps: greedy choices do not hinge on rounding
    )
    return QWenConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides):
    """A seeded random QWenLMHeadModel of tiny_config(**overrides), in eval mode."""
    from qwen.modeling_qwen import QWenLMHeadModel

    torch.manual_seed(seed)
    model = QWenLMHeadModel(tiny_config(**overrides)).eval()
    with torch.no_grad():  # random biases and norm weights, so that a wrong split or a skipped norm shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def left_padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [n, max(lengths)] left-padded with 0, and their attention mask."""
    torch.manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, TINY_VOCAB, (len(lengths), width))  # 0 is the pad id
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    return ids.masked_fill(mask == 0, 0), mask
