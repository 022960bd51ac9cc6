"""qwen.protocol: the OpenAI v1 schema, checked against the real `openai` client (mock HTTP transport)."""

import json

import httpx
import openai
import pytest
from pydantic import ValidationError

from qwen.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ErrorResponse,
    FunctionCall,
    ModelCard,
    ModelList,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
    chat_completion_id,
    completion_id,
    format_validation_error,
    tool_call_id,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


class MockServer:
    """Records what the real openai client sends and answers with a canned body."""

    def __init__(self):
        self.requests = []
        self.reply = httpx.Response(500)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.url.path, json.loads(request.content) if request.content else None))
        return self.reply

    def client(self):
        return openai.OpenAI(
            api_key="sk-test",
            base_url="http://qwen.test/v1",
            max_retries=0,
            http_client=httpx.Client(transport=httpx.MockTransport(self)),
        )


def sse(*models):
    body = "".join(f"data: {m.model_dump_json(exclude_unset=True)}\n\n" for m in models) + "data: [DONE]\n\n"
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


@pytest.fixture
def server():
    return MockServer()


def test_ids_have_openai_prefixes_and_are_unique():
    assert chat_completion_id().startswith("chatcmpl-") and completion_id().startswith("cmpl-")
    assert tool_call_id().startswith("call_")
    assert len({tool_call_id() for _ in range(100)}) == 100


def test_openai_client_chat_request_validates(server):
    server.reply = httpx.Response(200, json=ChatCompletionResponse(model="qwen", choices=[]).model_dump())
    server.client().chat.completions.create(
        model="Qwen-7B-Chat",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Boston?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_current_weather", "arguments": '{"location": "Boston"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_current_weather"}},
        temperature=0.7,
        top_p=0.8,
        seed=1,
        n=2,
        stop=["\n\n", "END"],
        max_completion_tokens=64,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logprobs=True,
        top_logprobs=3,
        user="u1",
        stream=False,
        extra_body={"top_k": 5, "repetition_penalty": 1.1},
    )
    path, body = server.requests[-1]
    assert path == "/v1/chat/completions"
    request = ChatCompletionRequest.model_validate(body)
    assert request.messages[1].content[0].text == "Weather in Boston?"
    assert request.messages[2].tool_calls[0].function.name == "get_current_weather"
    assert request.messages[3].tool_call_id == "call_1"
    assert request.tools[0].function.parameters == WEATHER_TOOL["function"]["parameters"]
    assert request.tool_choice.function.name == "get_current_weather"
    assert (request.top_k, request.repetition_penalty, request.max_new_tokens) == (5, 1.1, 64)
    assert request.stop_list() == ["\n\n", "END"] and request.top_logprobs == 3


def test_openai_client_legacy_functions_request_validates(server):
    server.reply = httpx.Response(200, json=ChatCompletionResponse(model="qwen", choices=[]).model_dump())
    plugin = {
        "name_for_human": "文生图",
        "name_for_model": "image_gen",
        "name": "image_gen",
        "description_for_model": "draws",
        "parameters": [{"name": "prompt", "required": True}],
    }
    server.client().chat.completions.create(
        model="qwen",
        messages=[
            {"role": "user", "content": "画猫"},
            {"role": "assistant", "content": None, "function_call": {"name": "image_gen", "arguments": "{}"}},
            {"role": "function", "name": "image_gen", "content": "url"},
        ],
        functions=[plugin],
        function_call="auto",
        stream=True,
        stream_options={"include_usage": True},
    )
    request = ChatCompletionRequest.model_validate(server.requests[-1][1])
    assert request.functions == [plugin] and request.function_call == "auto"
    assert request.messages[1].function_call.name == "image_gen" and request.messages[2].role == "function"
    assert request.stream and request.stream_options.include_usage


def test_openai_client_reads_our_chat_response(server):
    call = ToolCall(function=FunctionCall(name="get_current_weather", arguments='{"location": "Boston"}'))
    logprobs = ChoiceLogprobs(
        content=[
            TokenLogprob(
                token="Hi", logprob=-0.1, bytes=[72, 105], top_logprobs=[TopLogprob(token="Hi", logprob=-0.1)]
            )
        ]
    )
    ours = ChatCompletionResponse(
        model="qwen",
        usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
        choices=[
            ChatCompletionChoice(
                index=0,
                finish_reason="tool_calls",
                logprobs=logprobs,
                message=ChatCompletionMessage(content="I need the weather.", tool_calls=[call]),
            )
        ],
    )
    server.reply = httpx.Response(200, json=json.loads(ours.model_dump_json()))
    theirs = server.client().chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "hi"}]
    )
    assert theirs.id == ours.id and theirs.id.startswith("chatcmpl-") and theirs.object == "chat.completion"
    choice = theirs.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I need the weather."
    assert choice.message.tool_calls[0].id == call.id and call.id.startswith("call_")
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"location": "Boston"}
    assert choice.logprobs.content[0].top_logprobs[0].logprob == -0.1
    assert theirs.usage.total_tokens == 7
    # and their object, dumped, is valid for ours: the round trip keeps everything
    assert ChatCompletionResponse.model_validate(theirs.model_dump()) == ours


def test_openai_client_reads_our_chat_stream(server):
    chunk_id = chat_completion_id()

    def chunk(delta, finish_reason=None, usage=None):
        choices = (
            [] if usage else [ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=finish_reason)]
        )
        return ChatCompletionChunk(id=chunk_id, model="qwen", choices=choices, usage=usage)

    server.reply = sse(
        chunk(DeltaMessage(role="assistant", content="")),
        chunk(DeltaMessage(content="I need ")),
        chunk(DeltaMessage(content="the weather.")),
        chunk(
            DeltaMessage(
                tool_calls=[
                    DeltaToolCall(
                        index=0,
                        id="call_x",
                        type="function",
                        function=DeltaFunctionCall(name="get_current_weather", arguments=""),
                    )
                ]
            )
        ),
        chunk(
            DeltaMessage(
                tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments='{"location"'))]
            )
        ),
        chunk(
            DeltaMessage(
                tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=': "Boston"}'))]
            )
        ),
        chunk(DeltaMessage(), finish_reason="tool_calls"),
        chunk(None, usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)),
    )
    events = list(
        server.client().chat.completions.create(
            model="qwen",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {e.id for e in events} == {chunk_id}
    content = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    arguments = "".join(
        tc.function.arguments or "" for e in events if e.choices for tc in e.choices[0].delta.tool_calls or []
    )
    assert content == "I need the weather." and json.loads(arguments) == {"location": "Boston"}
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "tool_calls"
    assert events[-1].usage.total_tokens == 7


def test_openai_client_completion_request_and_response(server):
    ours = CompletionResponse(
        model="qwen",
        choices=[
            CompletionChoice(
                index=0,
                text=" world",
                finish_reason="length",
                logprobs=CompletionLogprobs(
                    text_offset=[5], token_logprobs=[-0.5], tokens=[" world"], top_logprobs=[{" world": -0.5}]
                ),
            )
        ],
    )
    server.reply = httpx.Response(200, json=json.loads(ours.model_dump_json()))
    theirs = server.client().completions.create(
        model="qwen",
        prompt=["hello", "<|im_start|>"],
        max_tokens=8,
        logprobs=2,
        echo=True,
        seed=3,
        stop="\n",
        temperature=0,
        extra_body={"allow_special_tokens": True, "top_k": 1},
    )
    request = CompletionRequest.model_validate(server.requests[-1][1])
    assert request.prompt_list() == ["hello", "<|im_start|>"] and request.allow_special_tokens
    assert (request.logprobs, request.echo, request.stop_list(), request.top_k) == (2, True, ["\n"], 1)
    assert theirs.id.startswith("cmpl-") and theirs.choices[0].text == " world"
    assert theirs.choices[0].logprobs.top_logprobs == [{" world": -0.5}]
    assert CompletionResponse.model_validate(theirs.model_dump()) == ours
    # defaults: OpenAI's 16 tokens, special-token text stays text
    request = CompletionRequest(model="qwen", prompt="x")
    assert request.max_tokens == 16 and not request.allow_special_tokens and request.prompt_list() == ["x"]


def test_openai_client_lists_models(server):
    server.reply = httpx.Response(200, json=ModelList(data=[ModelCard(id="Qwen-7B-Chat")]).model_dump())
    models = server.client().models.list()
    assert [m.id for m in models] == ["Qwen-7B-Chat"] and models.data[0].owned_by == "qwen"


def test_openai_client_reads_our_error_body(server):
    body = ErrorResponse.of(
        "temperature: Input should be less than or equal to 2 (got 3)", param="temperature"
    )
    assert body.model_dump() == {
        "error": {
            "message": body.error.message,
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }
    server.reply = httpx.Response(400, json=body.model_dump())
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model="qwen", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 400 and caught.value.param == "temperature"
    assert "less than or equal to 2" in caught.value.message


def test_round_trips():
    request = ChatCompletionRequest(
        model="qwen",
        messages=[{"role": "user", "content": "hi"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        stop="x",
        unknown_field=1,
    )
    assert ChatCompletionRequest.model_validate_json(request.model_dump_json()) == request
    assert not hasattr(request, "unknown_field")  # extra fields are ignored
    chunk = ChatCompletionChunk(
        id="chatcmpl-1",
        model="qwen",
        choices=[
            ChatCompletionChunkChoice(index=0, delta=DeltaMessage(function_call=DeltaFunctionCall(name="f")))
        ],
    )
    assert ChatCompletionChunk.model_validate_json(chunk.model_dump_json()) == chunk
    plugin_tool = {
        "type": "function",
        "function": {"name": "image_gen", "name_for_human": "文生图", "parameters": {}},
    }
    kept = ChatCompletionRequest(model="q", messages=[{"role": "user", "content": "hi"}], tools=[plugin_tool])
    assert (
        kept.tools[0].function.model_dump()["name_for_human"] == "文生图"
    )  # Qwen plugin keys travel through


BASE = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"temperature": 2.5}, "temperature: Input should be less than or equal to 2 (got 2.5)"),
        ({"top_p": 0}, "top_p: Input should be greater than 0"),
        ({"top_k": -1}, "top_k:"),
        ({"n": 9}, "n: Input should be less than or equal to 8"),
        ({"presence_penalty": -3}, "presence_penalty:"),
        ({"frequency_penalty": 2.1}, "frequency_penalty:"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs:"),
        ({"top_logprobs": 2}, "top_logprobs: only allowed when logprobs is true"),
        ({"stream_options": {"include_usage": True}}, "stream_options: only allowed when stream is true"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop: List should have at most 4 items"),
        ({"stop": 5}, "stop: Input should be a valid string or a valid list (got 5)"),
        ({"max_tokens": 0}, "max_tokens:"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role: Input should be"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type: Input should be 'text' (got 'image_url')",
        ),
        ({"messages": [{"content": "hi"}]}, "messages[0].role: Field required"),
        ({"tool_choice": "sometimes"}, "tool_choice: Input should be 'none', 'auto' or 'required'"),
        ({"tool_choice": {"type": "function"}}, "tool_choice.function: Field required"),
        (
            {"tools": [{"type": "function", "function": {"description": "x"}}]},
            "tools[0].function.name: Field",
        ),
    ],
)
def test_validation_errors_name_the_field(patch, field):
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({**BASE, **patch})
    message = format_validation_error(caught.value)
    assert message.startswith(field), message
    assert "more invalid field" not in message  # one problem, one message (union alternatives are not extra)


def test_validation_error_lists_other_fields_and_reads_fastapi_errors():
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({**BASE, "top_p": 0, "n": 0})
    assert format_validation_error(caught.value).endswith("(and 1 more invalid field: n)")
    # FastAPI's RequestValidationError.errors() puts "body" first in loc
    fastapi_errors = [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]
    assert format_validation_error(fastapi_errors).startswith("top_p: Input should be greater than 0")
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate({"model": "qwen", "prompt": "x", "logprobs": 6})
    assert format_validation_error(caught.value).startswith(
        "logprobs: Input should be less than or equal to 5"
    )
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate({"model": "qwen"})
    assert format_validation_error(caught.value) == "prompt: Field required"


def test_every_sampling_field_of_the_schema_reaches_the_engine():
    """request -> checkpoint generation_config -> built-in default, in one place (SamplingParams.resolve): each
    field the API schema shares by name with SamplingParams arrives as sent, and unset ones fall back in order."""
    from dataclasses import fields

    from transformers import GenerationConfig

    from qwen import protocol as api
    from qwen.engine import SamplingParams

    request = api.ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=7, temperature=0.5, top_p=0.5,
        top_k=3, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, seed=9,
    )  # fmt: skip
    shared = request.sampling_request()
    assert set(shared) == {f.name for f in fields(SamplingParams)} & set(type(request).model_fields)
    params = SamplingParams.resolve(shared, GenerationConfig(temperature=0.9, top_p=0.9, top_k=1))
    sent = {name: value for name, value in shared.items() if value is not None}
    assert {name: getattr(params, name) for name in sent} == sent and len(sent) >= 7
    checkpoint = GenerationConfig(do_sample=True, temperature=0.9, top_p=0.8, max_new_tokens=11)
    unset = SamplingParams.resolve({}, checkpoint)
    assert (unset.temperature, unset.top_p, unset.max_new_tokens, unset.top_k) == (0.9, 0.8, 11, 0)
    assert SamplingParams.resolve({}, GenerationConfig(do_sample=False, temperature=0.9)).temperature == 0
    assert SamplingParams.resolve({"temperature": 0.001}, checkpoint).temperature == 0  # greedy, as the original
