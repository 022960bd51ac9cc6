"""Schema-driven fuzzing of the API server: requests generated from its own /openapi.json, never a 5xx.

Schemathesis reads the served schema (request bodies and error responses documented) and Hypothesis draws
requests for every operation, both valid ones (they reach the model: a tiny random checkpoint, its context
capped so each answer is short) and invalid ones (wrong types, missing fields, out-of-range values). Every
request goes to a real uvicorn server over HTTP; none may get a server error, and the server must stay up.
"""

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from test_openai_api import ServerThread

from qwen.convert import make_tiny_checkpoint
from qwen.loading import load_model_and_tokenizer
from qwen.serving import create_app

CASES = 360  # Hypothesis examples; each is one HTTP request
MAX_CONTEXT = 96  # tokens: a ChatML prompt is ~20, so valid requests get answers of a few dozen tokens at most


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    model, tokenizer = load_model_and_tokenizer(str(make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz"))),
                                                cpu_only=True)
    app = create_app(model, tokenizer, model_names=["tiny"], accept_any_model=True, max_context=MAX_CONTEXT,
                     max_batch_size=8, max_queue=16, api_key="sk-fuzz")
    with ServerThread(app) as server:
        yield server


def test_generated_requests_never_get_a_server_error(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    posted = {op.path for op in operations if op.method.upper() == "POST"}
    assert posted == {"/v1/chat/completions", "/v1/completions"}
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode])
    session = requests.Session()
    session.headers["Authorization"] = "Bearer sk-fuzz"
    statuses: list[int] = []
    server_errors: list[str] = []

    @settings(max_examples=CASES, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case):
        response = case.call(base_url=fuzz_server.url, session=session, timeout=60)
        statuses.append(response.status_code)
        if response.status_code >= 500:
            server_errors.append(f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code} "
                                 f"{response.text[:300]}")

    fuzz()
    assert len(statuses) >= 300
    assert not server_errors, "\n".join(server_errors[:5])
    assert 200 in statuses and 400 in statuses  # both answered requests and rejected ones were generated
    assert requests.get(fuzz_server.url + "/health", timeout=5).json()["status"] == "ok"
