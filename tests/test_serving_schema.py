"""The OpenAPI schema and the server agree on what they accept (schemathesis found a tool message without
content and an empty prompt allowed by the schema, then refused)."""

import httpx
import jsonschema
import pytest
from conftest import ScriptedLM, ServerThread

from qwen.serving import create_app
from qwen.tokenization_qwen import QWenTokenizer

CALL = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                             "function": {"name": "f", "arguments": "{}"}}]}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
USER = {"role": "user", "content": "hi"}


@pytest.fixture(scope="module")
def served():
    tokenizer = QWenTokenizer()
    app = create_app(ScriptedLM(tokenizer), tokenizer, model_names=["s"])
    with ServerThread(app) as server:
        yield server, app.openapi()


def validator(schema: dict, name: str) -> jsonschema.Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": schema["components"]}
    return jsonschema.Draft202012Validator(root)


@pytest.mark.parametrize("path, body, accepted", [
    ("/v1/chat/completions", {"model": "s", "messages": [USER, CALL, {"role": "tool", "tool_call_id": "c1"}],
                              "tools": TOOLS}, False),
    ("/v1/chat/completions", {"model": "s", "messages": [USER, CALL, {"role": "tool", "tool_call_id": "c1",
                                                                      "content": None}], "tools": TOOLS}, False),
    ("/v1/chat/completions", {"model": "s", "messages": [USER, CALL, {"role": "tool", "tool_call_id": "c1",
                                                                      "content": "sunny"}], "tools": TOOLS}, True),
    ("/v1/completions", {"model": "s", "prompt": ""}, False),
    ("/v1/completions", {"model": "s", "prompt": ["a", ""]}, False),
    ("/v1/completions", {"model": "s", "prompt": "a", "max_tokens": 2}, True),
])
def test_schema_and_server_agree(served, path, body, accepted):
    server, schema = served
    name = "ChatCompletionRequest" if "chat" in path else "CompletionRequest"
    assert validator(schema, name).is_valid(body) == accepted
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert (response.status_code == 200) == accepted, response.text
    if not accepted:
        assert response.status_code == 400 and response.json()["error"]["param"]
