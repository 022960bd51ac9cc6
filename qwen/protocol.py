"""Pydantic models of the OpenAI v1 HTTP API that openai_api.py serves (schema only, no serving logic).

Covers POST /v1/chat/completions, POST /v1/completions (streamed or not), GET /v1/models and the error body.
Field names, types and limits follow the OpenAI API reference; extensions are marked. Unknown request fields
are ignored so newer clients keep working, and `null` for an optional field means "unset", as for OpenAI.
Sampling fields default to None: the server then takes the model's generation_config.json (Qwen-Chat's
top_p=0.8, repetition_penalty=1.1, ...), not OpenAI's defaults.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .sampling import BOUNDS, SamplingParams, resolve

MAX_STOP_SEQUENCES = 4  # OpenAI's limit on `stop`


def random_id(prefix: str, length: int = 24) -> str:
    return prefix + uuid.uuid4().hex[:length]


def chat_completion_id() -> str:
    return random_id("chatcmpl-", 32)


def completion_id() -> str:
    return random_id("cmpl-", 32)


def tool_call_id() -> str:
    return random_id("call_")


def _now() -> int:
    return int(time.time())


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_unset(cls, data: Any) -> Any:
        """OpenAI reads `"n": null` (any optional field set to null) as the field left out: its default."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required() or fields[key].default is None}


# --------------------------------------------------------------------------------------------- pieces



def bounded(name: str) -> Any:
    """The Field limits of sampling option `name`, from the one bounds table (qwen/sampling.py)."""
    bound = BOUNDS[name]
    low = {"gt" if bound.low_open else "ge": bound.low}
    return Field(**low, **({"le": bound.high} if bound.high != float("inf") else {}))


Temperature = Annotated[float, bounded("temperature")]
TopP = Annotated[float, bounded("top_p")]
TopK = Annotated[int, bounded("top_k")]
RepetitionPenalty = Annotated[float, bounded("repetition_penalty")]  # extension; HF semantics, 1 = off
PresencePenalty = Annotated[float, bounded("presence_penalty")]
FrequencyPenalty = Annotated[float, bounded("frequency_penalty")]
Seed = Annotated[int, bounded("seed")]
MaxTokens = Annotated[int, bounded("max_new_tokens")]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)]
FinishReason = Literal["stop", "length", "tool_calls", "function_call", "content_filter"]


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(OpenAIModel):
    id: str = Field(default_factory=tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


# A tool / function message must carry the tool's result, as in OpenAI's schema: said in the JSON Schema too, so
# clients and fuzzers generate what the server accepts.
_RESULT_ROLES = ("tool", "function")
_RESULT_NEEDS_CONTENT = {
    "if": {"properties": {"role": {"enum": list(_RESULT_ROLES)}}, "required": ["role"]},
    "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
}


class ChatMessage(OpenAIModel):
    """A request message; which fields matter depends on the role (see qwen.react.parse_messages)."""

    model_config = ConfigDict(json_schema_extra=_RESULT_NEEDS_CONTENT)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    function_call: FunctionCall | None = None  # assistant, legacy

    @model_validator(mode="after")
    def _result_has_content(self) -> ChatMessage:
        if self.role in _RESULT_ROLES and self.content is None:
            raise ValueError(f"a {self.role!r} message needs `content`: the result of the tool call it answers")
        return self


class FunctionDefinition(OpenAIModel):
    # Extra keys are kept: the Qwen plugin form (name_for_human, description_for_model, ...) travels through.
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema
    strict: bool | None = None


class ChatCompletionTool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False


class Usage(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _SamplingRequest(OpenAIModel):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None  # extension; 0 = off
    repetition_penalty: RepetitionPenalty | None = None  # extension
    presence_penalty: PresencePenalty | None = None
    frequency_penalty: FrequencyPenalty | None = None
    # extension (vLLM's): generate past the end-of-text tokens up to max_tokens, so benchmarks measure equal work
    ignore_eos: bool | None = None
    stop: Stop | None = None
    n: int | None = Field(default=1, ge=1, le=8)
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def sampling_request(self) -> dict[str, Any]:
        """The fields this request shares by name with SamplingParams (None = unset)."""
        return {f.name: getattr(self, f.name) for f in fields(SamplingParams) if f.name in type(self).model_fields}

    def to_sampling_params(self, defaults=None, **given) -> SamplingParams:
        """This request's sampling (as vLLM's to_sampling_params): its fields, then `given` (what the server works
        out: max_new_tokens, per-choice seed, stop ids, ...), unset ones from `defaults` (the checkpoint's
        GenerationConfig), then the built-in defaults. Bad values: ValueError."""
        return resolve({**self.sampling_request(), **given}, defaults)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# ----------------------------------------------------------------------------------------------- chat


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None  # newer name of max_tokens; wins over it
    logprobs: bool | None = False
    top_logprobs: Annotated[int, bounded("top_logprobs")] | None = None
    tools: list[ChatCompletionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[dict[str, Any]] | None = None  # legacy; OpenAI form or Qwen plugin form
    function_call: Literal["none", "auto"] | NamedFunction | None = None  # legacy tool_choice

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None


class ChatCompletionMessage(OpenAIModel):
    """The assistant message of a response."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # legacy, for requests that sent `functions`


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str = Field(default_factory=chat_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage = Field(default_factory=Usage)
    system_fingerprint: str | None = None


class DeltaFunctionCall(OpenAIModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIModel):
    index: int
    id: str | None = None  # sent with the first delta of a call
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None  # sent with the first chunk
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    function_call: DeltaFunctionCall | None = None


class ChatCompletionChunkChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None  # only in the last chunk, with stream_options.include_usage
    system_fingerprint: str | None = None


# ------------------------------------------------------------------------------------ text completions


NonEmptyText = Annotated[str, Field(min_length=1)]


class CompletionRequest(_SamplingRequest):
    prompt: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)]  # an empty prompt has nothing to run
    max_tokens: MaxTokens | None = 16  # OpenAI's default for this endpoint
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the top-N alternatives per token
    echo: bool | None = False  # prepend the prompt to the returned text
    # extension: read "<|im_start|>"-style text in the prompt as special tokens; off so user text stays text
    allow_special_tokens: bool | None = False

    def prompt_list(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(OpenAIModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage = Field(default_factory=Usage)
    system_fingerprint: str | None = None


class CompletionChunk(OpenAIModel):
    """One server-sent event of a streamed completion (OpenAI reuses the "text_completion" object)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------- models


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "qwen"


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ----------------------------------------------------------------------------------------------- errors


class ErrorInfo(OpenAIModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo

    @classmethod
    def of(
        cls,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=type, param=param, code=code))


# Errors that only say "this union member did not fit"; when a better error of the same value exists, it wins.
_MISMATCH_TYPES = {
    "string_type",
    "list_type",
    "int_type",
    "int_parsing",
    "float_type",
    "float_parsing",
    "bool_type",
    "bool_parsing",
    "dict_type",
    "model_type",
    "model_attributes_type",
    "none_required",
    "is_instance_of",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


def _is_field(part: str | int) -> bool:
    # pydantic puts union members in `loc` ("str", "list[str]", "NamedToolChoice", "function-after[...]");
    # our field names are all snake_case, so anything else is such a tag.
    return isinstance(part, int) or (part.isidentifier() and part.islower() and part not in _TYPE_TAGS)


def error_location(loc: tuple) -> str:
    """('body', 'messages', 0, 'str', 'content') → 'messages[0].content'."""
    parts = list(loc[1:] if loc[:1] == ("body",) else loc)
    text = ""
    for part in filter(_is_field, parts):
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _union_root(loc: tuple) -> str | None:
    """Location of the union a failed alternative belongs to, or None when the error is not inside a union."""
    parts = list(loc[1:] if loc[:1] == ("body",) else loc)
    tag = next((i for i, part in enumerate(parts) if not _is_field(part)), None)
    return None if tag is None else error_location(tuple(parts[:tag]))


def format_validation_error(exc: ValidationError | Any) -> str:
    """One clear message for a failed request validation, naming the field, e.g.
    "temperature: Input should be less than or equal to 2 (got 3.5)".

    Accepts a pydantic ValidationError, FastAPI's RequestValidationError (anything with .errors()) or the
    list of errors.
    Of the alternatives of a union the most specific complaint is reported (the deepest one that is not just
    "wrong type"); other invalid fields are listed by name.
    """
    errors = list(exc.errors() if hasattr(exc, "errors") else exc)
    if not errors:
        return "invalid request"
    for error in errors:
        loc = tuple(error.get("loc", ()))
        error["where"], error["root"], error["depth"] = error_location(loc), _union_root(loc), len(loc)
    specific = [e for e in errors if e.get("type") not in _MISMATCH_TYPES]
    primary = max(specific, key=lambda e: e["depth"]) if specific else errors[0]
    where = primary["where"]
    if specific:
        message = primary["msg"].removeprefix("Value error, ")
    else:  # every alternative of a union failed on its type: say what was expected
        expected = dict.fromkeys(
            e["msg"].removeprefix("Input should be ") for e in errors if e["where"] == where
        )
        message = "Input should be " + " or ".join(expected)
    if primary.get("type") not in ("missing", "value_error", "json_invalid") and "input" in primary:
        message += f" (got {_short(primary['input'])})"
    text = f"{where}: {message}" if where and not message.startswith(where + ":") else message
    same_union = primary["root"] is not None
    others = {e["where"] for e in errors if not (same_union and e["root"] == primary["root"])} - {where}
    if others:
        plural = "s" if len(others) > 1 else ""
        text += f" (and {len(others)} more invalid field{plural}: {', '.join(sorted(others))})"
    return text
