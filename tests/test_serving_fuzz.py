"""Schema-driven fuzzing of the API server: requests generated from its own /openapi.json, never a 5xx.

Schemathesis reads the served schema (request bodies and error responses documented) and Hypothesis draws
requests for every operation, both valid ones (they reach the model: a tiny random checkpoint, its context
capped so each answer is short) and invalid ones (wrong types, missing fields, out-of-range values). Every
request goes to a real uvicorn server over HTTP; none may get a server error, and the server must stay up.
"""

import pytest
import requests
import schemathesis
import torch
from conftest import ServerThread
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from qwen.convert import make_tiny_checkpoint
from qwen.loading import load_model_and_tokenizer
from qwen.serving import create_app

CASES = 320  # Hypothesis examples; each is one HTTP request
MAX_CONTEXT = 40  # tokens: a ChatML prompt is ~20, so an answer is at most ~20 tokens (and a completion's 40)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    model, tokenizer = load_model_and_tokenizer(str(make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz"))),
                                                cpu_only=True, dtype=torch.float32)
    # a queue of 2: requests for more choices are refused early (400), which keeps the run short
    app = create_app(model, tokenizer, model_names=["tiny"], accept_any_model=True, max_context=MAX_CONTEXT,
                     max_batch_size=2, max_queue=2, api_key="sk-fuzz")
    with ServerThread(app) as server:
        yield server


def with_a_valid_conversation(case):
    if isinstance(case.body, dict):
        case.body["messages"] = [{"role": "user", "content": "Hi"}]
        case.body.pop("functions", None)  # `functions` beside `tools` is refused
    return case


def test_generated_requests_never_get_a_server_error(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    posted = {op.path for op in operations if op.method.upper() == "POST"}
    assert posted == {"/v1/chat/completions", "/v1/completions"}
    strategies = [op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode]
    # The schema cannot say that a conversation must end with a user turn, so most generated chats are refused
    # by the prompt builder; these keep every other generated field and fix the conversation, to reach the model.
    chat = next(op for op in operations if op.path == "/v1/chat/completions")
    strategies.append(chat.as_strategy().map(with_a_valid_conversation))
    strategy = st.one_of(strategies)
    session = requests.Session()
    session.headers["Authorization"] = "Bearer sk-fuzz"
    statuses: list[int] = []
    server_errors: list[str] = []
    answered_chats: list = []

    @settings(max_examples=CASES, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case):
        response = case.call(base_url=fuzz_server.url, session=session, timeout=60)
        statuses.append(response.status_code)
        if case.path == "/v1/chat/completions" and response.status_code == 200:
            answered_chats.append(case)
        if response.status_code >= 500:
            server_errors.append(f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code} "
                                 f"{response.text[:300]}")

    fuzz()
    assert len(statuses) >= 300
    assert not server_errors, "\n".join(server_errors[:5])
    assert 200 in statuses and 400 in statuses  # both answered requests and rejected ones were generated
    assert answered_chats, "no generated chat request reached the model"
    assert requests.get(fuzz_server.url + "/health", timeout=5).json()["status"] == "ok"
