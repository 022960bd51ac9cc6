"""/v1/chat/completions: a request becomes a prompt plan (ChatML or ReAct with tools), each choice's engine
output becomes typed deltas (text, tool call, finish), and the deltas become one response or a chunk stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from qwen_generation_utils import make_continuation_context

from .. import protocol as api
from .. import react
from ..chat_api import is_chat_model
from ..engine import SamplingParams, TokenEvent
from .http import APIError
from .server import OpenAIServer
from .streams import TextChunks, answer_unless_disconnected, chunk_body, event_stream, json_text, merge

# how a tool call is reported: `tools` requests get tool_calls, legacy `functions` requests get function_call
CALL_FINISH_REASONS = {False: "tool_calls", True: "function_call"}


@dataclass
class ChatPlan:
    """What a chat request turned into: prompt ids, sampling per choice, and how to read the output."""

    prompt_ids: list[int]
    params: list[SamplingParams]
    stops: list[str]
    react: bool  # output is ReAct text: parse tool calls
    in_thought: bool  # the prompt ends in "Thought:" (continuing after a tool result)
    legacy_functions: bool  # the request used `functions`: answer with function_call


# ---- what one choice's stream carries from the handler to the response / chunk writers


@dataclass
class TextDelta:
    """Answer text, and the log-probabilities of the tokens behind it when they were asked for."""

    text: str
    logprobs: list[dict] | None = None


@dataclass
class CallDelta:
    """One complete tool call the model made."""

    call: api.FunctionCall


@dataclass
class FinishDelta:
    """The end of a choice: the OpenAI finish reason and the tokens it used."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


ChatDelta = TextDelta | CallDelta | FinishDelta


class ChatCompletions:
    """The chat route's logic, on the shared OpenAIServer."""

    def __init__(self, server: OpenAIServer):
        self.server, self.backend = server, server.backend

    async def __call__(self, request: api.ChatCompletionRequest, http_request: Request):
        server = self.server
        server.check_model(request.model)
        server.check_fits(request.n, "n")
        plan = await server.prepare(self.plan, request)
        handles = server.submit(plan.prompt_ids, plan.params)
        streams = [self.deltas(h, plan) for h in handles]
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            chunks = self.chunks(streams, request.model, len(plan.prompt_ids), include_usage, plan)
            return event_stream(chunks, handles)
        response = self.response(streams, request.model, len(plan.prompt_ids), plan)
        return await answer_unless_disconnected(http_request, handles, response)

    def plan(self, request: api.ChatCompletionRequest) -> ChatPlan:
        backend = self.backend
        legacy = request.functions is not None
        try:
            functions = react.normalize_tools(
                [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None,
                request.functions,
            )
            choice = request.function_call if legacy else request.tool_choice
            if hasattr(choice, "model_dump"):
                choice = choice.model_dump()
            tools = react.select_tools(functions, choice)
            query, history, system = react.parse_messages(request.messages, tools)
        except react.ReActError as exc:
            raise APIError(400, str(exc)) from exc
        continuing = query is react.TEXT_COMPLETION
        if continuing and not is_chat_model(backend.generation_config):
            raise APIError(400, "continuing after a tool result needs a chat model (chat_format chatml)")
        if continuing:
            _, prompt_ids = make_continuation_context(backend.tokenizer, history, system, backend.max_window_size)
        else:
            prompt_ids = backend.chat_prompt(query, history, system)
        use_react = bool(tools) or continuing
        stops = request.stop_list() + backend.chat_stop_texts + react.stop_words_for(use_react)
        params = [
            self.server.request_sampling_params(request, request.max_new_tokens, i, request.logprobs,
                                                request.top_logprobs or 0)
            for i in range(request.n)
        ]
        return ChatPlan(prompt_ids, params, stops, use_react, continuing, legacy)

    async def deltas(self, handle, plan: ChatPlan) -> AsyncIterator[ChatDelta]:
        """One choice of a chat completion: text and tool calls as they come, then one FinishDelta."""
        parser = react.ReActStreamParser(in_thought=plan.in_thought) if plan.react else None
        called = False
        async for piece in self.backend.pieces(handle, plan.stops):
            logprobs = self.logprobs(piece.tokens) if handle.params.logprobs else None
            if parser is None:
                events = [react.ContentDelta(piece.text)] if piece.text else []
            else:
                events = parser.feed(piece.text) + (parser.finish() if piece.finish_reason else [])
                if parser.done and not piece.finish_reason:
                    handle.cancel()  # past the answer: the model started a new step
            content = "".join(e.text for e in events if isinstance(e, react.ContentDelta))
            if content or logprobs:
                yield TextDelta(content, logprobs)
            for event in events:
                if isinstance(event, react.ToolCallEvent):
                    called = True
                    yield CallDelta(api.FunctionCall(name=event.name, arguments=event.arguments))
            if piece.finish_reason:
                reason = piece.finish_reason
                if called and reason == "stop":
                    reason = CALL_FINISH_REASONS[plan.legacy_functions]
                yield FinishDelta(reason, piece.prompt_tokens, piece.completion_tokens)

    def logprobs(self, tokens: list[TokenEvent]) -> list[dict]:
        token_text = self.server.token_text
        entries = []
        for event in tokens:
            text, data = token_text(event.token_id)
            top = [
                {"token": t, "logprob": lp, "bytes": b}
                for t, b, lp in ((*token_text(i), lp) for i, lp in event.top_logprobs or [])
            ]
            entries.append({"token": text, "logprob": event.logprob, "bytes": data, "top_logprobs": top})
        return entries

    async def response(self, streams, model: str, prompt_tokens: int, plan: ChatPlan) -> dict:
        n = len(streams)
        content = [""] * n
        calls: list[list[api.FunctionCall]] = [[] for _ in range(n)]
        logprobs: list[list[dict]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        completion_tokens = 0
        async for i, delta in merge(streams):
            match delta:
                case TextDelta():
                    content[i] += delta.text
                    logprobs[i] += delta.logprobs or []
                case CallDelta():
                    calls[i].append(delta.call)
                case FinishDelta():
                    finish[i] = delta.reason
                    completion_tokens += delta.completion_tokens
        choices = []
        for i in range(n):
            message = api.ChatCompletionMessage(content=content[i] or (None if calls[i] else ""))
            if calls[i] and plan.legacy_functions:
                message.function_call = calls[i][0]
            elif calls[i]:
                message.tool_calls = [api.ToolCall(function=call) for call in calls[i]]
            choice_logprobs = api.ChoiceLogprobs(content=logprobs[i]) if plan.params[i].logprobs else None
            choices.append(api.ChatCompletionChoice(index=i, message=message, finish_reason=finish[i],
                                                    logprobs=choice_logprobs))
        usage = api.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        body = api.ChatCompletionResponse(model=model, choices=choices, usage=usage).model_dump(exclude_none=True)
        for choice in body["choices"]:
            choice["message"].setdefault("content", None)  # OpenAI sends null content beside tool calls
        return body

    async def chunks(self, streams, model: str, prompt_tokens: int, include_usage: bool,
                     plan: ChatPlan) -> AsyncIterator[str]:
        chunk_id = api.chat_completion_id()
        usage = None if not include_usage else api.Usage(prompt_tokens=prompt_tokens)
        call_counts = [0] * len(streams)

        def body(index: int, delta: api.DeltaMessage, **fields) -> dict:
            choice = api.ChatCompletionChunkChoice(index=index, delta=delta, **fields)
            return chunk_body(api.ChatCompletionChunk(id=chunk_id, model=model, choices=[choice]))

        def chunk(index: int, delta: api.DeltaMessage, **fields) -> str:
            return json_text(body(index, delta, **fields))

        text_chunks = [TextChunks(body(i, api.DeltaMessage(content=TextChunks.MARK))) for i in range(len(streams))]

        for i in range(len(streams)):
            yield chunk(i, api.DeltaMessage(role="assistant", content=""))
        async for i, delta in merge(streams):
            match delta:
                case TextDelta() if not delta.logprobs:
                    yield text_chunks[i](delta.text)
                case TextDelta():
                    logprobs = api.ChoiceLogprobs(content=delta.logprobs)
                    yield chunk(i, api.DeltaMessage(content=delta.text), logprobs=logprobs)
                case CallDelta():
                    function = api.DeltaFunctionCall(name=delta.call.name, arguments=delta.call.arguments)
                    if plan.legacy_functions:
                        yield chunk(i, api.DeltaMessage(function_call=function))
                    else:
                        tool_call = api.DeltaToolCall(index=call_counts[i], id=api.tool_call_id(), type="function",
                                                      function=function)
                        call_counts[i] += 1
                        yield chunk(i, api.DeltaMessage(tool_calls=[tool_call]))
                case FinishDelta():
                    yield chunk(i, api.DeltaMessage(), finish_reason=delta.reason)
                    if usage is not None:
                        usage.completion_tokens += delta.completion_tokens
        if usage is not None:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            usage_chunk = api.ChatCompletionChunk(id=chunk_id, model=model, choices=[], usage=usage)
            yield json_text(usage_chunk.model_dump(exclude_none=True))
