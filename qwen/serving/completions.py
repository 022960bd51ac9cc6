"""/v1/completions: raw text prompts (no chat template), n choices per prompt, optional echo and logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request

from qwen_generation_utils import encode_plain

from .. import protocol as api
from ..engine import TokenEvent
from .http import APIError
from .server import OpenAIServer
from .streams import TextChunks, answer_unless_disconnected, chunk_body, event_stream, json_text, merge


class TextCompletions:
    """The completion route's logic, on the shared OpenAIServer."""

    def __init__(self, server: OpenAIServer):
        self.server, self.backend = server, server.backend

    def encode_prompt(self, text: str, allow_special_tokens: bool) -> list[int]:
        if allow_special_tokens:
            return list(self.backend.tokenizer.encode(text, add_special_tokens=False))
        return encode_plain(self.backend.tokenizer, text)

    async def __call__(self, request: api.CompletionRequest, http_request: Request):
        server = self.server
        server.check_model(request.model)
        prompts = request.prompt_list()
        server.check_fits(request.n * len(prompts), "n × prompts" if len(prompts) > 1 else "n")
        encoded = await server.prepare(lambda: [self.encode_prompt(p, request.allow_special_tokens) for p in prompts])
        want_logprobs = request.logprobs is not None
        params = [server.request_sampling_params(request, request.max_tokens, j, want_logprobs, request.logprobs or 0)
                  for j in range(request.n)]
        handles = []
        try:
            for ids in encoded:
                handles += server.submit(ids, params)
        except APIError:
            for handle in handles:
                handle.cancel()
            raise
        stops = request.stop_list()
        streams = [self.backend.pieces(h, stops) for h in handles]
        echoes = [prompts[k // request.n] if request.echo else "" for k in range(len(handles))]
        prompt_tokens = sum(len(ids) for ids in encoded)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            chunks = self.chunks(streams, echoes, request.model, prompt_tokens, include_usage, want_logprobs)
            return event_stream(chunks, handles)
        response = self.response(streams, echoes, request.model, prompt_tokens, want_logprobs)
        return await answer_unless_disconnected(http_request, handles, response)

    def logprobs(self, tokens: list[TokenEvent], offset: int) -> api.CompletionLogprobs:
        token_text = self.server.token_text
        result = api.CompletionLogprobs()
        for event in tokens:
            text = token_text(event.token_id)[0]
            result.tokens.append(text)
            result.token_logprobs.append(event.logprob)
            result.top_logprobs.append({token_text(i)[0]: lp for i, lp in event.top_logprobs or []} or None)
            result.text_offset.append(offset)
            offset += len(text)
        return result

    async def response(self, streams, echoes, model, prompt_tokens, want_logprobs) -> dict:
        texts = list(echoes)
        tokens: list[list[TokenEvent]] = [[] for _ in streams]
        finish = [None] * len(streams)
        completion_tokens = 0
        async for i, piece in merge(streams):
            texts[i] += piece.text
            tokens[i] += piece.tokens
            if piece.finish_reason:
                finish[i] = piece.finish_reason
                completion_tokens += piece.completion_tokens
        choices = [
            api.CompletionChoice(
                index=i, text=texts[i], finish_reason=finish[i],
                logprobs=self.logprobs(tokens[i], len(echoes[i])) if want_logprobs else None,
            )
            for i in range(len(streams))
        ]
        usage = api.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        return api.CompletionResponse(model=model, choices=choices, usage=usage).model_dump(exclude_none=True)

    async def chunks(self, streams, echoes, model, prompt_tokens, include_usage, want_logprobs) -> AsyncIterator[str]:
        chunk_id = api.completion_id()
        offsets = [len(e) for e in echoes]
        usage = None if not include_usage else api.Usage(prompt_tokens=prompt_tokens)

        def body(index: int, text: str, **fields) -> dict:
            choice = api.CompletionChoice(index=index, text=text, **fields)
            return chunk_body(api.CompletionChunk(id=chunk_id, model=model, choices=[choice]))

        def chunk(index: int, text: str, **fields) -> str:
            return json_text(body(index, text, **fields))

        text_chunks = [TextChunks(body(i, TextChunks.MARK)) for i in range(len(streams))]

        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo)
        async for i, piece in merge(streams):
            logprobs = self.logprobs(piece.tokens, offsets[i]) if want_logprobs else None
            offsets[i] += len(piece.text)
            if piece.text and not (logprobs or piece.finish_reason):
                yield text_chunks[i](piece.text)
            elif piece.text or piece.finish_reason:
                yield chunk(i, piece.text, logprobs=logprobs, finish_reason=piece.finish_reason)
            if piece.finish_reason and usage is not None:
                usage.completion_tokens += piece.completion_tokens
        if usage is not None:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            usage_chunk = api.CompletionChunk(id=chunk_id, model=model, choices=[], usage=usage)
            yield json_text(usage_chunk.model_dump(exclude_none=True))
