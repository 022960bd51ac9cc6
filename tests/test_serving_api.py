"""openai_api.py / qwen.serving: a real uvicorn server on 127.0.0.1, driven by the real `openai` client.

Most tests run on a scripted model: a stand-in whose output is fixed in advance (plain text, or a ReAct tool
call when the prompt has tools), run by the real engine, so tool calls, stop strings and errors are exact.
The demo model serves the concurrency test, through the real `openai_api.py` process.
"""

import asyncio
import base64
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import re
import runpy
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import (
    ARGUMENTS,
    COUNTING,
    REPO,
    THOUGHT,
    WEATHER_TOOL,
    ScriptedLM,
    ServerThread,
    free_port,
    load_reference,
)

from qwen import protocol as api
from qwen.serving import create_app
from qwen.serving.streams import TextChunks, chunk_body, json_text
from qwen.tokenization_qwen import QWenTokenizer
from qwen_generation_utils import encode_plain, make_context


@pytest.fixture(scope="module")
def tokenizer():
    return QWenTokenizer()


@pytest.fixture(scope="module")
def scripted(tokenizer):
    model = ScriptedLM(tokenizer)
    with ServerThread(create_app(model, tokenizer, model_names=["scripted"], max_context=1024)) as server:
        server.model = model
        server.client = openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0)
        yield server


def chat(server, content="Count to ten.", **kwargs):
    return server.client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": content}], **kwargs
    )


def collect_stream(stream):
    """(content per choice, finish_reason per choice, chunks) of a streamed chat completion."""
    content, finish, chunks = {}, {}, list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return content, finish, chunks


# ------------------------------------------------------------------------------------ plain chat


def test_models_and_health(scripted):
    assert [m.id for m in scripted.client.models.list()] == ["scripted"]
    assert httpx.get(scripted.url + "/health").json()["status"] == "ok"


def test_chat_non_stream_with_usage(scripted, tokenizer):
    response = chat(scripted)
    choice = response.choices[0]
    assert choice.message.content == COUNTING and choice.finish_reason == "stop"
    assert response.id.startswith("chatcmpl-") and response.created > 0 and response.model == "scripted"
    prompt_ids = make_context(tokenizer, "Count to ten.", [], "You are a helpful assistant.")[1]
    assert scripted.model.prompts[-1] == prompt_ids
    assert response.usage.prompt_tokens == len(prompt_ids)
    # the text's tokens plus the <|im_end|> that ended it
    assert response.usage.completion_tokens == len(encode_plain(tokenizer, COUNTING)) + 1
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_stream_with_include_usage(scripted):
    content, finish, chunks = collect_stream(chat(scripted, stream=True, stream_options={"include_usage": True}))
    assert content == {0: COUNTING} and finish == {0: "stop"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chat(scripted).usage.total_tokens


@pytest.mark.parametrize("text", ["plain", 'a "quote", a \\ and a /', "two\nlines\ttab", "中文 🙂 \u2028",
                                  TextChunks.MARK, "", "\x00"])
def test_a_streamed_text_chunk_is_the_models_own_dump(text):
    """The per-token template gives the bytes the protocol's model dumps, whatever the text and the model's name."""
    def body(content, model=TextChunks.MARK, index=1):  # a client may name its model so
        choice = api.ChatCompletionChunkChoice(index=index, delta=api.DeltaMessage(content=content))
        return chunk_body(api.ChatCompletionChunk(id="chatcmpl-1", model=model, choices=[choice]))

    assert TextChunks(body(TextChunks.MARK))(text) == json_text(body(text))
    assert json.loads(TextChunks(body(TextChunks.MARK))(text))["choices"][0]["delta"]["content"] == text


def test_the_server_runs_on_uvloop(tokenizer):
    """uvicorn picks uvloop (requirements-api.txt) over asyncio's loop: less server CPU a streamed token."""
    import uvloop

    from qwen.serving.app import server_config

    loop = server_config(create_app(ScriptedLM(tokenizer), tokenizer)).get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_n_choices(scripted):
    response = chat(scripted, n=2)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.message.content for c in response.choices] == [COUNTING, COUNTING]
    content, finish, _ = collect_stream(chat(scripted, n=2, stream=True))
    assert content == {0: COUNTING, 1: COUNTING} and finish == {0: "stop", 1: "stop"}


@pytest.mark.parametrize(
    "stop, expected",
    [("three", "one, two, "), (["nine", "o, thr"], "one, tw"), (["absent"], COUNTING)],
)
def test_stop_strings_trimmed_stream_and_not(scripted, stop, expected):
    response = chat(scripted, stop=stop)
    assert response.choices[0].message.content == expected and response.choices[0].finish_reason == "stop"
    content, finish, _ = collect_stream(chat(scripted, stop=stop, stream=True))
    assert content == {0: expected} and finish == {0: "stop"}


def test_max_tokens_gives_length(scripted, tokenizer):
    first_three = tokenizer.decode(encode_plain(tokenizer, COUNTING)[:3])
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        response = chat(scripted, **limit)
        assert response.choices[0].finish_reason == "length"
        assert response.choices[0].message.content == first_three and response.usage.completion_tokens == 3
    content, finish, _ = collect_stream(chat(scripted, max_tokens=3, stream=True))
    assert content == {0: first_three} and finish == {0: "length"}


def test_logprobs(scripted):
    response = chat(scripted, logprobs=True, top_logprobs=2, max_tokens=5)
    entries = response.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == response.choices[0].message.content
    assert all(e.logprob == pytest.approx(0.0) and len(e.top_logprobs) == 2 for e in entries)
    assert entries[0].top_logprobs[0].token == entries[0].token


# ---------------------------------------------------------------------------------- function calling


def test_tool_call_non_stream(scripted):
    response = chat(scripted, "What's the weather like in Boston?", tools=[WEATHER_TOOL])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_current_weather" and json.loads(call.function.arguments) == json.loads(ARGUMENTS)
    assert choice.message.content == THOUGHT


def test_tool_call_stream(scripted):
    stream = chat(scripted, "What's the weather like in Boston?", tools=[WEATHER_TOOL], stream=True)
    content, finish, chunks = collect_stream(stream)
    assert finish == {0: "tool_calls"} and content == {0: THOUGHT}  # no "Action:" text leaked
    deltas = [call for c in chunks for choice in c.choices for call in choice.delta.tool_calls or []]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].function.name == "get_current_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == json.loads(ARGUMENTS)


def test_tool_result_follow_up(scripted, tokenizer):
    messages = [
        {"role": "user", "content": "What's the weather like in Boston?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_current_weather", "arguments": ARGUMENTS}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": "22", "description": "Sunny"}'},
    ]
    for stream in (False, True):
        response = scripted.client.chat.completions.create(model="scripted", messages=messages,
                                                           tools=[WEATHER_TOOL], stream=stream)
        if stream:
            content, finish, _ = collect_stream(response)
            content, finish = content[0], finish[0]
        else:
            content, finish = response.choices[0].message.content, response.choices[0].finish_reason
        assert content == "It is sunny and 22 °C in Boston." and finish == "stop"
    prompt = tokenizer.decode(scripted.model.prompts[-1])
    assert prompt.endswith(f'Action Input: {ARGUMENTS}\nObservation: {messages[2]["content"]}\nThought:')


def test_legacy_functions_and_call_at_start(scripted):
    lookup = {"name": "lookup_city", "description": "Look a city up.", "parameters": {"type": "object"}}
    messages = [{"role": "user", "content": "Tell me about Paris."}]
    response = scripted.client.chat.completions.create(model="scripted", messages=messages, functions=[lookup])
    choice = response.choices[0]
    assert choice.finish_reason == "function_call" and not choice.message.tool_calls
    assert choice.message.function_call.name == "lookup_city"
    assert json.loads(choice.message.function_call.arguments) == {"name": "Paris"}
    stream = scripted.client.chat.completions.create(model="scripted", messages=messages, functions=[lookup],
                                                     stream=True)
    content, finish, chunks = collect_stream(stream)
    calls = [ch.delta.function_call for c in chunks for ch in c.choices if ch.delta.function_call]
    assert finish == {0: "function_call"} and content == {0: ""}
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("lookup_city", {"name": "Paris"})]


def _original_continuation_prompt(history, system):
    """The prompt text the original openai_api.py built to continue the last assistant turn."""
    prompt = f"<|im_start|>system\n{system}<|im_end|>"
    for query, response in history:
        prompt += f"\n<|im_start|>user\n{query.lstrip(chr(10)).rstrip()}<|im_end|>"
        prompt += f"\n<|im_start|>assistant\n{response.lstrip(chr(10)).rstrip()}<|im_end|>"
    return prompt[: -len("<|im_end|>")]


@pytest.mark.parametrize("case", load_reference("react_golden.json")["parse_messages"], ids=lambda c: c["name"])
def test_prompt_matches_golden(case, scripted, tokenizer):
    """The server's prompt for the golden requests is the original's, token for token."""
    request = api.ChatCompletionRequest(model="scripted", messages=case["messages"], functions=case["functions"])
    prompt_ids = scripted.app.state.chat.plan(request).prompt_ids
    if case["query"].startswith("<TEXT_COMPLETION"):
        expected = tokenizer.encode(_original_continuation_prompt(case["history"], case["system"]))
    else:
        expected = make_context(tokenizer, case["query"], [tuple(h) for h in case["history"]], case["system"])[1]
    assert prompt_ids == expected


# -------------------------------------------------------------------------------- text completions


def test_completions_endpoint(scripted, tokenizer):
    prompt = "Say <|im_start|> and count:"
    response = scripted.client.completions.create(model="scripted", prompt=prompt, max_tokens=4)
    assert scripted.model.prompts[-1] == encode_plain(tokenizer, prompt)  # special-token text stays text
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 4
    assert response.choices[0].text == tokenizer.decode(encode_plain(tokenizer, COUNTING)[:4])
    special = scripted.client.completions.create(model="scripted", prompt=prompt, max_tokens=2,
                                                 extra_body={"allow_special_tokens": True})
    assert tokenizer.im_start_id in scripted.model.prompts[-1] and special.choices[0].finish_reason == "length"
    streamed = scripted.client.completions.create(model="scripted", prompt=prompt, stop=[", three"], stream=True,
                                                  max_tokens=50)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "one, two"


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "body, words",
    [
        ("{not json", ["JSON"]),
        ({"model": "scripted", "messages": [{"role": "wizard", "content": "hi"}]}, ["messages[0].role"]),
        ({"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, ["temperature"]),
        ({"model": "scripted"}, ["messages"]),
        ({"model": "scripted", "messages": [{"role": "tool", "content": "42"}]}, ["messages[0]", "tool"]),
        ({"model": "scripted", "messages": [{"role": "user", "content": "word " * 2000}]}, ["context window"]),
    ],
)
def test_invalid_requests_get_400(scripted, body, words):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(scripted.url + "/v1/chat/completions", content=content,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and all(w in error["message"] for w in words), error


def test_openai_client_sees_bad_request(scripted):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(scripted, temperature=9)


# ------------------------------------------------------------------------------ auth and CORS


def test_auth_and_preflight(tokenizer):
    app = create_app(ScriptedLM(tokenizer), tokenizer, model_names=["s"], api_key="sk-right",
                     api_auth="alice:secret", allowed_origins=["http://example.com"])
    with ServerThread(app) as server:
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-right", max_retries=0)
        assert good.chat.completions.create(model="s", messages=[{"role": "user", "content": "hi"}]).choices
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/v1/models", auth=("alice", "secret")).status_code == 200
        assert httpx.get(server.url + "/v1/models", auth=("alice", "wrong")).status_code == 401
        preflight = httpx.options(server.url + "/v1/chat/completions", headers={
            "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://example.com"
        # a browser's real request after the preflight: CORS headers on the 401 too, so the page can read it
        denied = httpx.get(server.url + "/v1/models", headers={"Origin": "http://example.com"})
        assert denied.status_code == 401 and "access-control-allow-origin" in denied.headers


def test_basic_auth_header_parsing():
    from qwen.serving.auth import basic_credentials

    assert basic_credentials("Basic " + base64.b64encode(b"u:p:w").decode()) == "u:p:w"
    assert basic_credentials("Basic !!!") is None and basic_credentials("Bearer x") is None


# ------------------------------------------------------------------------- slots, queue, disconnect


def test_queue_full_429_and_disconnect_frees_slot(tokenizer):
    """One slot: a second request gets 429 while a stream runs; closing the stream frees the slot."""
    model = ScriptedLM(tokenizer, delay=0.05)
    app = create_app(model, tokenizer, model_names=["s"], max_batch_size=1, max_queue=1)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Count forever."}]
        stream = client.chat.completions.create(model="s", messages=messages, stream=True)
        next(chunk for chunk in stream if chunk.choices[0].delta.content)  # generating now
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="s", messages=messages)
        health = httpx.get(server.url + "/health").json()
        assert health["running"] == 1
        stream.close()  # the client goes away mid-answer
        deadline = time.time() + 10
        while httpx.get(server.url + "/health").json() != {"status": "ok", "running": 0, "waiting": 0,
                                                           "decode_step": "eager"}:
            assert time.time() < deadline, "the closed stream still holds its slot"
            time.sleep(0.05)
        answer = client.chat.completions.create(model="s", messages=messages, max_tokens=2)
        assert answer.choices[0].finish_reason == "length"


def test_non_stream_disconnect_frees_slot(tokenizer):
    model = ScriptedLM(tokenizer, delay=0.05)
    app = create_app(model, tokenizer, model_names=["s"], max_batch_size=1, max_queue=1)
    with ServerThread(app) as server:
        body = {"model": "s", "messages": [{"role": "user", "content": "Count forever."}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)
        deadline = time.time() + 10
        while httpx.get(server.url + "/health").json()["running"]:
            assert time.time() < deadline, "the abandoned request still holds its slot"
            time.sleep(0.05)


# ------------------------------------------------------------- the real openai_api.py on the demo model

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow"}


@contextlib.contextmanager
def api_process(*flags, env=None):
    """The real openai_api.py on a free port, until /health answers; yields (url, process) and stops it."""
    port = free_port()
    command = [sys.executable, str(REPO / "openai_api.py"), "--server-port", str(port), *flags]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, f"openai_api.py exited:\n{process.stdout.read()}"
            assert time.time() < deadline, "openai_api.py did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield SimpleNamespace(url=url, port=port, process=process)
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def demo_server(demo_checkpoint):
    # eager: a seeded sample repeats only on the same step (the compiled one's logits differ by rounding)
    with api_process("-c", str(demo_checkpoint), "--model-name", "qwen-demo", "--model-name", "gpt-3.5-turbo",
                     "--api-key", "sk-demo", "--no-compile") as server:
        yield server


def decode_step(url: str) -> str:
    return httpx.get(url + "/health", timeout=5).json()["decode_step"]


@pytest.mark.slow
def test_the_server_compiles_its_decode_step_in_the_background_and_answers_as_the_eager_one(tmp_path):
    """openai_api.py's default on the CPU: the decode step compiles on a thread while requests are served
    eagerly; once /health says "compiled", greedy answers (3 at once) are the eager server's; a SIGTERM during
    the compile still exits 0 at once."""
    from qwen.checkpoints import make_tiny_checkpoint

    checkpoint = str(make_tiny_checkpoint(tmp_path / "tiny"))
    prompts = ["The capital of France", "One, two, three,", "def fibonacci(n):"]

    def answers(url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            done = pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=12,
                                                                temperature=0), prompts)
            return [(c.choices[0].text, c.usage.completion_tokens) for c in done]

    with api_process("-c", checkpoint, "--no-compile") as eager:
        assert decode_step(eager.url) == "eager"
        expected = answers(eager.url)
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # compiled from scratch, as on a new machine
    with api_process("-c", checkpoint, env=cold) as server:
        assert decode_step(server.url) == "compiling"
        assert answers(server.url) == expected  # served meanwhile, eagerly
        deadline = time.time() + 300
        while decode_step(server.url) == "compiling" and time.time() < deadline:
            time.sleep(1)
        assert decode_step(server.url) == "compiled"
        assert answers(server.url) == expected
        server.process.terminate()
        log = server.process.communicate(timeout=30)[0]
    assert re.search(r"decode step compiled in \d+ s", log), log
    with api_process("-c", checkpoint, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-2")}) as server:
        assert decode_step(server.url) == "compiling"
        server.process.terminate()
        assert server.process.wait(30) == 0


def readme_api_snippets() -> list[tuple[str, str]]:
    """(language, code) of the README's API examples: the blocks of its API section that call the server."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## OpenAI-compatible API", 1)[1]
    section = section.split("\n### ", 1)[0]
    return [(lang, code) for lang, code in re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
            if "127.0.0.1:8000/v1" in code]


def test_readme_api_snippets_work_verbatim_on_the_demo_server():
    """The README's curl / openai / LangChain examples, run as written (on a free port instead of 8000) against
    `python openai_api.py` started as the README starts it, with the README's key."""
    snippets = readme_api_snippets()
    assert [lang for lang, _ in snippets] == ["bash", "python", "python"]
    with api_process(env={"QWEN_API_KEY": "sk-mysecret"}) as server:
        for lang, code in snippets:
            code = code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
            if "langchain_openai" in code and importlib.util.find_spec("langchain_openai") is None:
                continue  # not in requirements-dev.txt: runs where langchain-openai is installed
            command = ["bash", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0 and '"error"' not in done.stdout, (code, done.stdout, done.stderr)
            assert done.stdout.strip(), code
            if lang == "bash":
                assert done.stdout.rstrip().endswith("data: [DONE]"), done.stdout
        server.process.terminate()
        log = server.process.communicate(timeout=30)[0]
    assert "serving 'qwen-demo' (any other model name is answered too); auth: Bearer key" in log, log
    assert "Loading weights" not in log, log


def test_eight_concurrent_streams_while_bad_requests_fail(demo_server):
    """8 clients stream at once and each gets its own correct answer; 400s in between disturb nothing."""
    client = openai.AsyncOpenAI(base_url=demo_server.url + "/v1", api_key="sk-demo", max_retries=0)

    async def ask(country):
        stream = await client.chat.completions.create(
            model="qwen-demo", temperature=0, max_tokens=24, stream=True,
            messages=[{"role": "user", "content": f"What is the capital of {country}? Answer in one word."}],
        )
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def bad_request():
        await asyncio.sleep(0.3)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="qwen-demo", messages=[{"role": "robot", "content": "x"}])
        return "rejected"

    async def main():
        return await asyncio.gather(*(ask(c) for c in CAPITALS), bad_request(), bad_request())

    results = asyncio.run(main())
    for (country, capital), (text, finish) in zip(CAPITALS.items(), results, strict=False):
        assert capital in text and finish == "stop", (country, text, finish)
    assert results[-2:] == ["rejected", "rejected"]
    models = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="sk-demo").models.list()
    assert [m.id for m in models] == ["qwen-demo", "gpt-3.5-turbo"]


def test_seed_reproducible_on_demo(demo_server):
    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="sk-demo", max_retries=0)

    def sample(seed):
        response = client.chat.completions.create(
            model="qwen-demo", seed=seed, temperature=1.0, max_tokens=16,
            messages=[{"role": "user", "content": "Write a word."}],
        )
        return response.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_cli_errors_are_clear():
    result = subprocess.run([sys.executable, str(REPO / "openai_api.py"), "--api-auth", "nocolon"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "USER:PASSWORD" in result.stderr


# ------------------------------------------------------------------------------------------- examples


@pytest.mark.parametrize("stream", [False, True])
def test_function_call_example(scripted, monkeypatch, capsys, stream):
    """examples/function_call.py runs its whole loop: tool call, local function, final answer."""
    argv = ["function_call.py", "--base-url", scripted.url + "/v1"] + (["--stream"] if stream else [])
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "examples" / "function_call.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert 'Tool call: get_current_weather({"location": "Boston, MA"})' in out
    assert "Answer: It is sunny and 22 °C in Boston." in out


def test_function_call_example_says_when_the_model_made_no_call(scripted, monkeypatch, capsys):
    argv = ["function_call.py", "--base-url", scripted.url + "/v1", "--question", "Weather in Boston, from memory?"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "examples" / "function_call.py"), run_name="__main__")
    captured = capsys.readouterr()
    assert exit_.value.code == 1 and "Answer:" not in captured.out
    assert captured.out == ("The model made no tool call; its answer did not come from a tool: "
                            "It is always sunny in Boston.\n")
    assert "The offline demo model cannot call tools" in captured.err


def test_openai_client_example(scripted, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["openai_client.py", "--base-url", scripted.url + "/v1"])
    runpy.run_path(str(REPO / "examples" / "openai_client.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count(COUNTING) == 2 and "finish_reason=stop" in out
