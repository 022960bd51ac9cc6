"""The API server under hostile and careless clients, through a real uvicorn server: huge requests, cross-site
access, empty secrets, padding ids, bad text, internal errors, overload, shutdown, OpenAI compatibility.

Most tests run on the scripted model of conftest.py (output known in advance), the padding-id ones on a tiny random
checkpoint whose padding rows are made the most likely.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import REPO, WEATHER_TOOL, ScriptedLM, ServerThread, free_port

from qwen.convert import make_tiny_checkpoint
from qwen.engine import Engine, SamplingParams
from qwen.evaluation.generation import generate_texts
from qwen.loading import load_model_and_tokenizer
from qwen.serving import DEFAULT_MAX_MESSAGES, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_SHUTDOWN_TIMEOUT, create_app
from qwen.tokenization_qwen import QWenTokenizer

USER = [{"role": "user", "content": "Count to ten."}]


@pytest.fixture(scope="module")
def tokenizer():
    return QWenTokenizer()


@pytest.fixture(scope="module")
def scripted(tokenizer):
    app = create_app(ScriptedLM(tokenizer, delay=0.01), tokenizer, model_names=["s"], max_context=1024,
                     max_queue=4, max_batch_size=4)
    with ServerThread(app) as server:
        server.app = app
        yield server


def post(server, path, body, timeout: float = 30) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"},
                      timeout=timeout)


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def sse_events(response: httpx.Response) -> list:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ------------------------------------------------- a huge request stalls no other client; size limits


def test_a_100000_message_request_stalls_neither_health_nor_other_streams(scripted):
    """3.8 MB of one-line user messages (joining them was quadratic, on the event loop: ~80 s of a frozen
    server). Now it is prepared off the loop: /health answers within 1 s and another stream goes on meanwhile;
    the request itself is answered (its prompt is longer than the context: a clear 400)."""
    messages = [{"role": "user", "content": f"{i}: x"} for i in range(100_000)]
    body = json.dumps({"model": "s", "messages": messages})
    assert 3_500_000 < len(body) <= DEFAULT_MAX_REQUEST_BYTES
    big: dict = {}
    stream_chunks: list[float] = []
    health_answers: list[float] = []

    def send_big():
        try:
            big["response"] = post(scripted, "/v1/chat/completions", body, timeout=300)
        finally:
            big["at"] = time.monotonic()

    def stream():
        with httpx.stream("POST", scripted.url + "/v1/chat/completions", timeout=60, json={
                "model": "s", "messages": [{"role": "user", "content": "Count forever."}], "stream": True,
                "max_tokens": 300}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    stream_chunks.append(time.monotonic())

    streamer = threading.Thread(target=stream)
    streamer.start()
    while not stream_chunks:
        time.sleep(0.01)
    sender = threading.Thread(target=send_big)
    sender.start()
    with httpx.Client(base_url=scripted.url, timeout=1.0) as client:
        while "at" not in big:
            # the server stays live: /health within 1 s while the big request is being prepared
            assert client.get("/health").status_code == 200
            health_answers.append(time.monotonic())
            time.sleep(0.05)
    sender.join()
    streamer.join()
    response = big["response"]
    assert response.status_code == 400 and error_of(response)["code"] == "context_length_exceeded"
    # ordering: while the big request was being handled, health answered and the other stream kept flowing
    started = health_answers[0]
    assert sum(started < t < big["at"] for t in health_answers) >= 3
    assert sum(started < t < big["at"] for t in stream_chunks) >= 3


def test_request_body_and_message_count_limits(tokenizer):
    app = create_app(ScriptedLM(tokenizer), tokenizer, model_names=["s"], max_request_bytes=2000, max_messages=3)
    with ServerThread(app) as server:
        big = {"model": "s", "messages": [{"role": "user", "content": "x" * 3000}]}
        response = post(server, "/v1/chat/completions", big)
        assert response.status_code == 413 and "2,000 bytes" in error_of(response)["message"]

        def chunked():  # no Content-Length: the body is counted while it is read
            yield json.dumps(big).encode()

        response = httpx.post(server.url + "/v1/chat/completions", content=chunked(), timeout=30,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        response = post(server, "/v1/chat/completions", {"model": "s", "messages": USER * 4})
        assert response.status_code == 400 and error_of(response)["param"] == "messages"
        assert "limit of 3" in error_of(response)["message"]
        assert post(server, "/v1/chat/completions", {"model": "s", "messages": USER * 3}).status_code == 200


# ------------------------------------------------------------ no cross-site use unless allowed (CORS)


def test_no_cross_origin_access_by_default(scripted):
    preflight = httpx.options(scripted.url + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-credentials" not in preflight.headers
    simple = httpx.get(scripted.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_allowed_origins_open_cross_origin_access_deliberately(tokenizer):
    app = create_app(ScriptedLM(tokenizer), tokenizer, model_names=["s"], allowed_origins=["https://app.example"],
                     allow_credentials=True)
    with ServerThread(app) as server:
        def preflight(origin):
            return httpx.options(server.url + "/v1/models", headers={
                "Origin": origin, "Access-Control-Request-Method": "GET"})

        good = preflight("https://app.example")
        assert good.headers["access-control-allow-origin"] == "https://app.example"
        assert good.headers["access-control-allow-credentials"] == "true"
        assert "access-control-allow-origin" not in preflight("https://evil.example").headers
    with pytest.raises(ValueError, match="credentials"):
        create_app(ScriptedLM(tokenizer), tokenizer, allowed_origins=["*"], allow_credentials=True)


# ------------------------------------------------------------------ an empty key never turns auth off


def test_empty_secrets_are_refused_and_the_key_can_come_from_the_environment(tokenizer):
    for secrets in ({"api_key": ""}, {"api_key": "  "}, {"api_auth": "alice:"}, {"api_auth": ":secret"}):
        with pytest.raises(ValueError, match="empty"):
            create_app(ScriptedLM(tokenizer), tokenizer, **secrets)
    env = {k: v for k, v in os.environ.items() if k != "QWEN_API_KEY"}
    for argv, env_key in ((["--api-key", ""], None), ([], ""), (["--api-auth", "alice:"], None)):
        run_env = env if env_key is None else {**env, "QWEN_API_KEY": env_key}
        result = subprocess.run([sys.executable, "openai_api.py", *argv], cwd=REPO, env=run_env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "empty" in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "web_demo.py", "--auth", "alice:"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "neither part empty" in result.stderr

    import openai_api

    os.environ["QWEN_API_KEY"] = "sk-from-env"
    try:
        assert openai_api.parse_args([]).api_key == "sk-from-env"
        assert openai_api.parse_args(["--api-key", "sk-flag"]).api_key == "sk-flag"
    finally:
        del os.environ["QWEN_API_KEY"]


# ---------------------------------------------------- never a token id the tokenizer cannot decode


@pytest.fixture(scope="module")
def padding_loving(tmp_path_factory):
    """A tiny random checkpoint whose output rows past the tokenizer (151,851..151,935) win every argmax."""
    model, tokenizer = load_model_and_tokenizer(str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))),
                                                cpu_only=True)
    head = model.get_output_embeddings()
    assert head.out_features > len(tokenizer)
    padding = torch.arange(len(tokenizer), head.out_features)
    head.register_forward_hook(lambda module, inputs, logits: logits.index_fill(-1, padding, 100.0))
    return model, tokenizer


def test_the_engine_never_samples_ids_the_tokenizer_cannot_decode(padding_loving):
    model, tokenizer = padding_loving
    engine = Engine(model, decodable_tokens=len(tokenizer))
    handles = [engine.submit([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=t, seed=0, logprobs=True,
                                                       top_logprobs=3)) for t in (0, 1.0)]
    while engine.num_running or engine.num_waiting:
        engine.step()
    for handle in handles:
        events = list(handle)
        tokens = [e for e in events[:-1]]
        assert tokens and all(e.token_id < len(tokenizer) for e in tokens)
        assert all(i < len(tokenizer) for e in tokens for i, _ in e.top_logprobs)
        tokenizer.decode([e.token_id for e in tokens])  # decodable


def test_benchmark_generation_never_samples_padding_rows(padding_loving):
    """The evaluation scripts generate through the same engine construction as the servers (chat_engine)."""
    model, tokenizer = padding_loving
    texts = generate_texts(model, tokenizer, [[1, 2, 3], [4, 5]], max_new_tokens=4)
    assert len(texts) == 2 and all(texts)  # decoded ids below len(tokenizer): no "unknown token id"
    # and the padding rows really win when nothing masks them
    assert int(model(torch.tensor([[1, 2, 3]])).logits[0, -1].argmax()) >= len(tokenizer)


def test_api_answers_from_a_model_that_favours_padding_rows(padding_loving):
    model, tokenizer = padding_loving
    with ServerThread(create_app(model, tokenizer, model_names=["tiny"])) as server:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": USER, "stream": True, "max_tokens": 5, "temperature": 0}) as response:
            events = sse_events(response)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        assert events[-2]["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_stream_that_fails_midway_ends_with_an_error_event_and_done(scripted, monkeypatch):
    import qwen.chat_api as chat_api

    pushes = []

    class BrokenDetokenizer(chat_api.IncrementalDetokenizer):
        def push(self, token_id):
            pushes.append(token_id)
            if len(pushes) == 3:
                raise ValueError("unknown token ids [151894]: internal detail")
            return super().push(token_id)

    monkeypatch.setattr(chat_api, "IncrementalDetokenizer", BrokenDetokenizer)
    with httpx.stream("POST", scripted.url + "/v1/chat/completions", timeout=60,
                      json={"model": "s", "messages": USER, "stream": True}) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "server_error" and "internal detail" not in error["message"]


# ------------------------------------------------------------------------- unpaired surrogates


@pytest.mark.parametrize("path, body, where", [
    ("/v1/chat/completions", '{"model": "s", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/completions", '{"model": "s", "prompt": "x\\ud800", "echo": true, "max_tokens": 2}', "prompt"),
])
def test_unpaired_surrogates_are_a_clear_400(scripted, path, body, where):
    response = post(scripted, path, body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == where and "surrogate" in error_of(response)["message"]
    paired = body.replace("\\ud800", "\\ud83d\\ude00").replace("\\udfff", "s")  # a real emoji is fine
    assert post(scripted, path, paired).status_code == 200


# ------------------------------------------------------ bad input is a 400; a 500 hides internals


def test_deeply_nested_json_is_a_400(scripted):
    deep = '{"model": "s", "messages": ' + "[" * 5000 + "]" * 5000 + "}"
    response = post(scripted, "/v1/chat/completions", deep)
    assert response.status_code == 400 and "deep" in error_of(response)["message"]
    nested = {"model": "s", "messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "array", "items": {}}}}}}]}
    node = nested["tools"][0]["function"]["parameters"]["properties"]["a"]
    for _ in range(100):
        node["items"] = {"type": "array", "items": {}}
        node = node["items"]
    response = post(scripted, "/v1/chat/completions", nested)
    assert response.status_code == 400 and "nested more than 64 levels" in error_of(response)["message"]


@pytest.mark.parametrize("extra, field", [
    ({"functions": [{"name": 123, "parameters": {"type": "object"}}]}, "functions[0].name"),
    ({"functions": [{"name_for_model": ["x"], "name": "f"}]}, "functions[0].name_for_model"),
    ({"repetition_penalty": 1e-45}, "repetition_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 123}}}]},
     "tools[0].function.parameters.type"),
])
def test_bad_tools_and_penalties_are_a_400_naming_the_field(scripted, extra, field):
    response = post(scripted, "/v1/chat/completions", {"model": "s", "messages": USER, **extra})
    assert response.status_code == 400, response.text
    assert error_of(response)["message"].startswith(field), error_of(response)


def test_a_500_hides_internals_and_keeps_the_connection_usable(scripted, monkeypatch):
    def broken(request):
        raise RuntimeError("secret internal state at /home/model/weights")

    monkeypatch.setattr(scripted.app.state.chat, "plan", broken)
    with httpx.Client(base_url=scripted.url, timeout=30) as client:  # one keep-alive connection
        failed = client.post("/v1/chat/completions", json={"model": "s", "messages": USER})
        assert failed.status_code == 500 and "secret" not in failed.text
        assert error_of(failed)["type"] == "server_error"
        monkeypatch.undo()
        again = client.post("/v1/chat/completions", json={"model": "s", "messages": USER, "max_tokens": 2})
        assert again.status_code == 200


# ------------------------------------------------------------- 400 for what never fits, 429 to retry


def test_a_request_that_can_never_fit_is_a_400_and_real_429s_carry_retry_after(scripted):
    response = post(scripted, "/v1/chat/completions", {"model": "s", "messages": USER, "n": 5})
    assert response.status_code == 400 and "--max-queue" in error_of(response)["message"]
    assert error_of(response)["param"] == "n"
    response = post(scripted, "/v1/completions", {"model": "s", "prompt": ["a", "b", "c"], "n": 2})
    assert response.status_code == 400 and "6 generations" in error_of(response)["message"]
    # a real 429: the queue (4) is full of long streams
    forever = {"model": "s", "messages": [{"role": "user", "content": "Count forever."}], "stream": True}
    with httpx.Client(base_url=scripted.url, timeout=60) as client:
        streams = [client.stream("POST", "/v1/chat/completions", json={**forever, "n": 2}) for _ in range(2)]
        opened = [s.__enter__() for s in streams]
        try:
            busy = httpx.post(scripted.url + "/v1/chat/completions", json={"model": "s", "messages": USER})
            assert busy.status_code == 429 and busy.headers["retry-after"].isdigit()
        finally:
            for stream, response in zip(streams, opened, strict=True):
                response.close()
                stream.__exit__(None, None, None)


# --------------------------------------------------------------------------------------- shutdown


def test_draining_answers_503_and_stops_running_streams_after_the_grace_period(tokenizer):
    app = create_app(ScriptedLM(tokenizer, delay=0.02), tokenizer, model_names=["s"], shutdown_timeout=0.5)
    with ServerThread(app) as server:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
                "model": "s", "messages": [{"role": "user", "content": "Count forever."}], "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            app.state.server.begin_shutdown()
            refused = post(server, "/v1/chat/completions", {"model": "s", "messages": USER})
            assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
            assert httpx.get(server.url + "/health").json()["status"] == "stopping"
            events = [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
                      for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutdown"
        assert "shutting down" in events[-2]["error"]["message"]
        assert sum(bool(e["choices"] and e["choices"][0]["delta"].get("content")) for e in events[:-2]) > 0


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-served"))


def test_sigterm_stops_admitting_cuts_running_requests_after_the_grace_period_and_exits_0(tiny_checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "openai_api.py", "-c", str(tiny_checkpoint), "--server-port", str(port),
         "--model-name", "tiny", "--shutdown-timeout", "3", "--no-compile"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "openai_api.py did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        results: list[list] = []

        def long_stream():  # ~2,000 tokens of a random model: far longer than the 3 s grace period
            body = {"model": "tiny", "messages": USER, "stream": True, "max_tokens": 100_000, "temperature": 1.0,
                    "seed": 1}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
                results.append(sse_events(response))

        threads = [threading.Thread(target=long_stream) for _ in range(2)]
        for thread in threads:
            thread.start()
        while httpx.get(url + "/health").json()["running"] < 2:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        # still listening while the running requests finish: new ones get 503, /health says stopping
        health = httpx.get(url + "/health", timeout=10)
        while health.status_code == 200:
            health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "stopping"
        refused = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": USER}, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
        for thread in threads:
            thread.join(60)
        assert process.wait(60) == 0
        output = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert len(results) == 2
    for events in results:
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutdown", events[-3:]
    assert "Traceback" not in output and "shutting down: no new requests" in output, output


# -------------------------------------------------------------------------- OpenAI compatibility


def test_null_means_unset(scripted):
    body = {"model": "s", "messages": USER, "n": None, "stream": None, "logprobs": None, "temperature": None,
            "top_logprobs": None, "stream_options": None, "max_tokens": None, "seed": None, "stop": None,
            "tools": None, "tool_choice": None, "user": None}
    response = post(scripted, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1
    completion = post(scripted, "/v1/completions", {"model": "s", "prompt": "x", "n": None, "echo": None,
                                                    "logprobs": None, "max_tokens": None, "stream": None})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 16


def test_unknown_model_is_404_unless_any_name_is_accepted(scripted, tokenizer):
    client = openai.OpenAI(base_url=scripted.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=USER)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    app = create_app(ScriptedLM(tokenizer), tokenizer, model_names=["s"], accept_any_model=True)
    with ServerThread(app) as server:
        assert post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": USER}).status_code == 200


def test_tool_schemas_are_validated(scripted):
    bad = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "parameters": {"type": 123}}}
    response = post(scripted, "/v1/chat/completions", {"model": "s", "messages": USER, "tools": [bad]})
    assert response.status_code == 400 and "not a valid JSON Schema" in error_of(response)["message"]
    good = post(scripted, "/v1/chat/completions", {"model": "s", "messages": USER, "tools": [WEATHER_TOOL]})
    assert good.status_code == 200


def test_largest_seed_with_several_choices(scripted):
    response = post(scripted, "/v1/chat/completions",
                    {"model": "s", "messages": USER, "seed": 2**64 - 1, "n": 2, "temperature": 1.0, "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert [c["index"] for c in response.json()["choices"]] == [0, 1]


def test_405_carries_allow_and_401_carries_a_realm(tokenizer, scripted):
    wrong_method = httpx.get(scripted.url + "/v1/chat/completions")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    app = create_app(ScriptedLM(tokenizer), tokenizer, model_names=["s"], api_key="sk-x", api_auth="a:b")
    with ServerThread(app) as server:
        challenge = httpx.get(server.url + "/v1/models").headers["www-authenticate"]
    assert 'Bearer realm="Qwen API"' in challenge and 'Basic realm="Qwen API"' in challenge


def test_openapi_documents_request_bodies_and_errors(scripted):
    schema = httpx.get(scripted.url + "/openapi.json").json()
    for path, request_model in (("/v1/chat/completions", "ChatCompletionRequest"),
                                ("/v1/completions", "CompletionRequest")):
        operation = schema["paths"][path]["post"]
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{request_model}"
        assert {"200", "400", "401", "404", "413", "429", "503"} <= set(operation["responses"])
        request_schema = schema["components"]["schemas"][request_model]
        assert "model" in request_schema["required"] and "n" in request_schema["properties"]
    assert "ChatMessage" in schema["components"]["schemas"]


def test_default_limits_match_the_script_help():
    """openai_api.py's --help states the server's defaults."""
    help_text = " ".join(subprocess.run([sys.executable, "openai_api.py", "--help"], cwd=REPO, capture_output=True,
                                        text=True, timeout=60).stdout.split())
    assert f"(default {DEFAULT_MAX_REQUEST_BYTES // 2**20} MiB)" in help_text
    assert f"(default {DEFAULT_MAX_MESSAGES:,})" in help_text
    assert f"(default {DEFAULT_SHUTDOWN_TIMEOUT:.0f})" in help_text


# -------------------------------------------------------------------------------------------- CLI


def test_cli_chat_with_stop_strings_on_a_model_that_favours_padding_rows(padding_loving):
    """The README's own `:conf stop_strings=["a"]` crashed generate() (it wants the tokenizer for them), and
    padding ids crashed decoding; now both answers come and the history keeps them."""
    import io

    from qwen.cli import ChatSession, Repl

    model, tokenizer = padding_loving
    session = ChatSession(model, tokenizer, model.generation_config)
    lines = iter([':conf stop_strings=["a"] max_new_tokens=6 do_sample=false', "hi", "again", ":q"])
    out = io.StringIO()
    assert Repl(session, out=out, read_line=lambda prompt: next(lines)).run() == 0
    assert "failed" not in out.getvalue() and "Error" not in out.getvalue(), out.getvalue()
    assert [q for q, _ in session.history] == ["hi", "again"]
    assert all("a" not in answer for _, answer in session.history)
