"""Tool calling for the Qwen chat models through the ReAct prompt they were trained on.

The original openai_api.py folded OpenAI `messages` + `functions` into a ReAct conversation (the instruction
below, then "Thought: / Action: / Action Input: / Observation:" steps) and parsed the model's text back into
an assistant message. This module is the only copy of that prompt; examples, evals and the server all use it.

Request side:  normalize_tools() → select_tools() (tool_choice) → parse_messages() → (query, history,
               system), and stop_words_for(tools) for generation.
Response side: parse_response(text) for a whole answer, ReActStreamParser for a stream of text deltas.

Format facts (query/history/system, the parsed messages) are pinned by tests/data/react_golden.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from qwen_generation_utils import DEFAULT_SYSTEM

from .errors import ReActError

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. "
    "What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""


# An assistant turn that answered without calling a tool, as the model writes it in a tools conversation.
FINAL_ANSWER_TURN = "Thought: I now know the final answer.\nFinal Answer: {content}"
CALL_TURN = "Thought: {thought}\nAction: {name}\nAction Input: {arguments}"
OBSERVATION = "\nObservation: {content}"
CONTINUE_THOUGHT = "\nThought:"  # ends a prompt whose last step was a tool result: the model thinks next

STOP_WORDS = ["Observation:", "Observation:\n"]  # the model would otherwise invent the tool's result


class _TextCompletion:
    """Sentinel type for a query that is no new user turn: the model continues the last assistant turn."""

    def __repr__(self) -> str:
        return "TEXT_COMPLETION"


# parse_messages() returns this as the query when the conversation ends with tool results: the prompt is the
# history with its last assistant turn left open (no <|im_end|>) and ending in "\nThought:".
TEXT_COMPLETION = _TextCompletion()


# ----------------------------------------------------------------------------------------------- tools


def normalize_tools(
    tools: list[Mapping] | None = None, functions: list[Mapping] | None = None
) -> list[dict] | None:
    """OpenAI `tools` ([{type: "function", function: {...}}]) or `functions` → a list of function dicts.

    Function dicts are kept as given: OpenAI form {name, description, parameters} or the Qwen plugin form
    {name_for_human, name_for_model, description_for_model, parameters}. None when there are no tools.
    """
    if tools and functions:
        raise ReActError("pass either `tools` or the legacy `functions`, not both")
    if functions:
        result = [dict(f) for f in functions]
    elif tools:
        result = []
        for i, tool in enumerate(tools):
            if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), Mapping):
                raise ReActError(
                    f'tools[{i}]: only {{"type": "function", "function": {{...}}}} tools are supported'
                )
            result.append(dict(tool["function"]))
    else:
        return None
    field = "functions" if functions else "tools"
    for i, function in enumerate(result):
        _check_function(function, f"{field}[{i}]" if functions else f"tools[{i}].function")
    return result


def _check_function(function: Mapping, where: str) -> None:
    """A function definition's names must be text and its `parameters` a valid JSON Schema (ReActError if not)."""
    if not (function.get("name_for_model") or function.get("name")):
        raise ReActError(f"{where}: a function needs a `name`")
    for key in ("name", "name_for_model", "name_for_human", "description", "description_for_model"):
        if function.get(key) is not None and not isinstance(function[key], str):
            raise ReActError(f"{where}.{key} must be a string, not {type(function[key]).__name__}")
    parameters = function.get("parameters")
    if parameters is None:
        return
    if isinstance(parameters, list) and all(isinstance(p, Mapping) for p in parameters):
        return  # the Qwen plugin form: a list of {name, description, required, schema} objects
    if not isinstance(parameters, Mapping):
        raise ReActError(f"{where}.parameters must be a JSON Schema object (or, in the Qwen plugin form, a list "
                         f"of parameter objects), not {type(parameters).__name__}")
    import jsonschema  # the API server's dependency (requirements-api.txt)

    try:
        jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator).check_schema(
            parameters
        )
    except jsonschema.SchemaError as exc:
        path = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise ReActError(f"{where}.parameters{path} is not a valid JSON Schema: {exc.message}") from None


def tool_name(function: Mapping) -> str:
    """The name the model calls a function by (Qwen plugin form: name_for_model)."""
    return function.get("name_for_model") or function["name"]


# Each TOOL_DESC field, from the first key a function dict has (Qwen plugin form first, then OpenAI form).
_TOOL_DESC_FIELDS = {
    "name_for_model": ("name_for_model", "name"),
    "name_for_human": ("name_for_human", "name_for_model", "name"),
    "description_for_model": ("description_for_model", "description"),
}
# OpenAI lets a function omit `parameters` (it takes none); the prompt still shows a schema.
_NO_PARAMETERS = {"type": "object", "properties": {}}


def describe_tool(function: Mapping) -> str:
    fields = {
        field: next((function[key] for key in keys if function.get(key) is not None), "")
        for field, keys in _TOOL_DESC_FIELDS.items()
    }
    parameters = function.get("parameters", _NO_PARAMETERS)
    return TOOL_DESC.format(**fields, parameters=json.dumps(parameters, ensure_ascii=False))


def react_instruction(functions: list[Mapping]) -> str:
    """The instruction prepended to the newest completed user turn (or the query) when tools are present."""
    return REACT_INSTRUCTION.format(
        tools_text="\n\n".join(describe_tool(f) for f in functions),
        tools_name_text=", ".join(tool_name(f) for f in functions),
    )


def select_tools(functions: list[dict] | None, tool_choice: str | Mapping | None = None) -> list[dict] | None:
    """Apply OpenAI `tool_choice` (or legacy `function_call`); returns the tools to put in the prompt.

    The ReAct prompt cannot force a call (the original API had no tool_choice), so:
      None / "auto"   → all tools;          "none" → no tools: a plain chat prompt;
      "required"      → all tools, like "auto" (the model may still answer directly);
      a named function ({"type": "function", "function": {"name": N}} or legacy {"name": N})
                      → only that function in the prompt, so it is the only one the model can call.
    """
    if tool_choice is None or tool_choice == "auto":
        return functions
    if tool_choice == "none":
        return None
    if not functions:
        raise ReActError("`tool_choice` asks for a tool call but the request has no `tools`")
    if tool_choice == "required":
        return functions
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or tool_choice).get("name")
        chosen = [f for f in functions if tool_name(f) == name or f.get("name") == name]
        if not chosen:
            known = ", ".join(tool_name(f) for f in functions)
            raise ReActError(f"`tool_choice` names function {name!r}, which is not among the tools ({known})")
        return chosen
    raise ReActError(
        f"`tool_choice` must be 'none', 'auto', 'required' or a named function, not {tool_choice!r}"
    )


def stop_words_for(functions: list | None) -> list[str]:
    """Extra stop strings for generation: with tools the model must stop before writing an Observation."""
    return list(STOP_WORDS) if functions else []


# -------------------------------------------------------------------------------------------- messages


class ParsedMessages(NamedTuple):
    query: str | _TextCompletion
    history: list[list[str]]  # [[user, assistant], ...]
    system: str


# Roles a request may use, and the role they play in the prompt.
_ROLES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for system instructions
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",  # result of a tool_calls entry, matched by tool_call_id
    "function": "tool",  # legacy result of a function_call, matched in call order
}


def _clean(text: str) -> str:
    # The original trimmed leading newlines and trailing whitespace of every content.
    return text.lstrip("\n").rstrip()


def _text(content: Any, where: str) -> str:
    """Message content as text: a string, None, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _clean(content)
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (
                isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise ReActError(
                    f"{where}.content: only text content parts are supported by the Qwen chat models"
                )
            texts.append(part["text"])
        return _clean("\n".join(texts))
    raise ReActError(f"{where}.content must be a string or a list of text parts")


@dataclass
class _Call:
    name: str
    arguments: str
    id: str | None
    result: str | None = None


def _calls_of(message: Mapping, where: str) -> list[_Call]:
    """The tool calls of an assistant message: OpenAI v1 `tool_calls` or the legacy `function_call`."""
    raw = [(c.get("function") or {}, c.get("id")) for c in message.get("tool_calls") or []]
    if message.get("function_call"):
        raw.append((message["function_call"], None))
    calls = []
    for function, call_id in raw:
        if not function.get("name"):
            raise ReActError(f"{where}: a tool call needs a function `name`")
        arguments = function.get("arguments", "")
        if not isinstance(arguments, str):  # some clients send the object itself
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(_Call(function["name"], arguments, call_id))
    return calls


def _answer_call(calls: list[_Call], message: Mapping, content: str, where: str) -> None:
    """Record a tool/function message as the result of one of the open calls."""
    waiting = [c for c in calls if c.result is None]
    if not waiting:
        raise ReActError(
            f"{where}: a {message['role']!r} message must follow an assistant message with a tool "
            "call that has no result yet"
        )
    call_id = message.get("tool_call_id")
    if call_id is not None:
        matches = [c for c in waiting if c.id == call_id]
        if not matches:
            raise ReActError(
                f"{where}: tool_call_id {call_id!r} matches no open tool call of the previous "
                f"assistant message (open: {', '.join(str(c.id) for c in waiting)})"
            )
        call = matches[0]
    else:  # legacy `function` message: by name when given, else the first open call
        call = next((c for c in waiting if c.name == message.get("name")), waiting[0])
    call.result = content


def _react_steps(thought: str, calls: list[_Call], where: str) -> str:
    """An assistant tool-call message and its results as ReAct steps (one call per step)."""
    steps = []
    for i, call in enumerate(calls):
        if call.result is None:
            raise ReActError(
                f"{where}: tool call {call.name!r} (id {call.id}) has no tool result message; "
                "send one `tool` message per tool call right after the assistant message"
            )
        step = CALL_TURN.format(thought=thought if i == 0 else "", name=call.name, arguments=call.arguments)
        steps.append(step + OBSERVATION.format(content=call.result))
    return "\n".join(steps)


def parse_messages(messages: Iterable[Mapping], functions: list[Mapping] | None = None) -> ParsedMessages:
    """Fold OpenAI chat messages (+ tools) into Qwen's (query, history, system), as the original API did.

    - system (and developer) messages are merged, in order, into the system prompt ("You are a helpful
      assistant." when there is none);
    - with tools, the ReAct instruction is prepended to the newest completed user turn (the query when there
      is no history), as the original did:
      "{instruction}\\n\\nQuestion: {q}";
      an assistant answer becomes "Thought: I now know the final answer.\\nFinal Answer: {content}";
    - an assistant tool call becomes "Thought: {content}\\nAction: {name}\\nAction Input: {arguments}" and its
      result "\\nObservation: {result}"; steps of one assistant turn are joined with "\\n";
    - when the conversation ends with tool results, the query is TEXT_COMPLETION and the last history turn is
      the open assistant turn ending in "\\nThought:" that the model continues.
    Consecutive user messages are joined with "\\n". Pydantic message models are accepted too.
    Raises ReActError (a ValueError) naming the message at fault.
    """
    messages = [m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else m for m in messages]
    system_parts: list[str] = []
    # [role, texts] with role user/assistant, alternating; a turn's texts are joined once at the end, so a
    # request of many consecutive user messages costs linear, not quadratic, time
    turns: list[tuple[str, list[str]]] = []
    thought = ""  # content of the assistant message whose tool calls are open
    open_calls: list[_Call] = []  # tool calls of the last assistant message, waiting for their results
    open_where = ""

    def add_turn(role: str, text: str) -> None:
        if turns and turns[-1][0] == role:
            turns[-1][1].append(text)
        else:
            turns.append((role, [text]))

    def close_calls() -> None:
        nonlocal open_calls
        if open_calls:
            add_turn("assistant", _react_steps(thought, open_calls, open_where))
            open_calls = []

    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = _ROLES.get(message.get("role"))
        if role is None:
            raise ReActError(
                f"{where}: unknown role {message.get('role')!r}; expected one of {', '.join(_ROLES)}"
            )
        content = _text(message.get("content"), where)
        if role == "tool":
            _answer_call(open_calls, message, content, where)
            continue
        close_calls()
        if role == "system":
            system_parts.append(content)
        elif role == "user":
            add_turn("user", content)
        else:
            if not turns:
                raise ReActError(f"{where}: an assistant message must come after a user message")
            calls = _calls_of(message, where)
            if calls:
                thought, open_calls, open_where = content, calls, where
            else:
                add_turn("assistant", FINAL_ANSWER_TURN.format(content=content) if functions else content)
    last_where = f"messages[{len(messages) - 1}]"
    continues = bool(open_calls)
    close_calls()

    if not any(role == "user" for role, _ in turns):
        raise ReActError("messages: expected at least one user message")
    texts = ["\n".join(parts) for _, parts in turns]
    if turns[-1][0] == "user":
        query = texts.pop()
        turns.pop()
    elif continues:
        query = TEXT_COMPLETION
        texts[-1] += CONTINUE_THOUGHT
    else:
        raise ReActError(
            f"{last_where}: the conversation ends with an assistant message; "
            "end it with a user message (or with the tool results of an assistant tool call)"
        )

    history = [[texts[j], texts[j + 1]] for j in range(0, len(texts), 2)]
    if functions:
        instruction = react_instruction(functions)
        if history:
            # the original put it on the newest completed turn (its `i == len(messages) - 2`), not the first
            history[-1][0] = f"{instruction}\n\nQuestion: {history[-1][0]}"
        else:
            query = f"{instruction}\n\nQuestion: {query}"
    system = "\n".join(system_parts) if system_parts else DEFAULT_SYSTEM
    return ParsedMessages(query, history, system)


# -------------------------------------------------------------------------------------------- response


@dataclass(frozen=True)
class ContentDelta:
    """Answer text to show the user."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A complete tool call; arguments are the model's Action Input as a string (not validated as JSON)."""

    name: str
    arguments: str


StreamEvent = ContentDelta | ToolCallEvent


@dataclass
class ParsedResponse:
    content: str
    function_call: dict | None  # {"name": ..., "arguments": ...}
    finish_reason: str  # "function_call" or "stop"; the server maps it to "tool_calls" / "length" as fits

    def message(self) -> dict:
        """The legacy OpenAI assistant message, as the original API returned it."""
        return {"role": "assistant", "content": self.content, "function_call": self.function_call}


# The model's output is read line by line. A line that starts with a header opens a new section; which headers
# count depends on the current section (a table, not branches):
#   start   - beginning of the text (leading whitespace skipped)
#   plain   - text that did not start with a header: streamed as is; a later Action line still makes a call
#   thought - after "Thought:": held back, since it is the content only if no Final Answer follows
#   action  - after an "Action: NAME" line: the next line must be "Action Input:", else the Action line is
#             just text of the section before it
#   input   - the arguments: every line up to an "Observation:" line or the end
#   answer  - after "Final Answer:": streamed; everything up to an "Observation:" line is the answer
#   end     - after "Observation:" (the stop word): the rest is ignored
# The content of a response is its plain / thought / answer text with surrounding whitespace stripped.
_HEADERS = {
    "start": {"Thought:": "thought", "Action:": "action", "Final Answer:": "answer", "Observation:": "end"},
    "plain": {"Action:": "action", "Observation:": "end"},
    "thought": {"Action:": "action", "Final Answer:": "answer", "Observation:": "end"},
    "action": {"Action Input:": "input"},
    "input": {"Observation:": "end"},
    "answer": {"Observation:": "end"},
    "end": {},
}
_STREAMED = {"plain", "answer"}  # sections whose text is released as soon as it cannot be a header


class ReActStreamParser:
    """Turns streamed model text into ContentDelta / ToolCallEvent events.

    Text is held back while it may still become part of a tool call or a header; the concatenated
    ContentDelta texts equal parse_response(full_text).content however the text is split.

        parser = ReActStreamParser()
        for delta in deltas:
            for event in parser.feed(delta): ...
        for event in parser.finish(): ...

    in_thought=True when the prompt ended in "Thought:" (a query of TEXT_COMPLETION): the text starts inside a
    thought. `done` turns True at an "Observation:" line: the model is past its answer and can be stopped.
    """

    def __init__(self, in_thought: bool = False):
        self.section = "thought" if in_thought else "start"
        self._base = "thought" if in_thought else "plain"  # where the text of a failed Action line goes
        self._buffer = ""  # text not yet consumed; while _in_line is False it starts at a line start
        self._in_line = False  # the current line was classified: the rest of it is section text
        self._started = False  # leading whitespace of the whole text was skipped
        self._thought = ""
        self._action_line = ""  # raw "Action: NAME\n" while its "Action Input:" line is awaited
        self._action_name = ""
        self._arguments = ""
        self._pending_space = ""  # trailing whitespace of released text; released only if more text follows
        self._released = False
        self._finished = False
        self._events: list[StreamEvent] = []

    @property
    def done(self) -> bool:
        return self.section == "end"

    def feed(self, text: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buffer += text
        self._consume(at_end=False)
        return self._take_events()

    def finish(self) -> list[StreamEvent]:
        if not self._finished:
            self._finished = True
            self._consume(at_end=True)
            if self.section == "action":  # an Action line that never got its Action Input
                self._fail_action()
            self._close()
        return self._take_events()

    # -- internals

    def _take_events(self) -> list[StreamEvent]:
        events, self._events = self._events, []
        return events

    def _release(self, text: str) -> None:
        # Content is stripped: drop leading whitespace, hold trailing whitespace until more text follows.
        if not self._released:
            text = text.lstrip()
        body = text.rstrip()
        if body:
            self._events.append(ContentDelta(self._pending_space + body))
            self._pending_space = text[len(body) :]
            self._released = True
        elif self._released:
            self._pending_space += text

    def _section_text(self, text: str) -> None:
        if self.section == "thought":
            self._thought += text
        elif self.section in _STREAMED:
            self._release(text)
        elif self.section == "input":
            self._arguments += text
        # "end": ignored

    def _consume(self, at_end: bool) -> None:
        if not self._started:
            self._buffer = self._buffer.lstrip()
            if not self._buffer and not at_end:
                return
            self._started = True
        while self._buffer and self.section != "end":
            newline = self._buffer.find("\n")
            line = self._buffer if newline < 0 else self._buffer[: newline + 1]
            if self._in_line:  # the rest of a classified line is text of the current section
                self._buffer = self._buffer[len(line) :]
                self._section_text(line)
                self._in_line = newline < 0
                continue
            complete = newline >= 0 or at_end
            headers = _HEADERS[self.section]
            header = next((h for h in headers if line.startswith(h)), None)
            if header is None and not complete and any(h.startswith(line) for h in headers):
                return  # may still become a header
            if header == "Action:":
                if not complete:
                    return  # the name is the rest of the line
                if line[len(header) :].strip():
                    self._buffer = self._buffer[len(line) :]
                    self._open_action(line)
                    continue
                header = None  # "Action:" without a name is no call
            if header is None:
                if self.section == "action":
                    self._fail_action()  # then read this line again in the section it fell back to
                else:
                    self._leave_start()
                    self._in_line = True
                continue
            self._buffer = self._buffer[len(header) :]
            self._enter(headers[header])
        if self.section == "end":
            self._buffer = ""  # past the stop word: nothing more is read

    def _leave_start(self) -> None:
        if self.section == "start":
            self.section = self._base

    def _open_action(self, line: str) -> None:
        self._leave_start()
        self._base = self.section
        self._action_line = line
        self._action_name = line[len("Action:") :].strip()
        self.section = "action"

    def _fail_action(self) -> None:
        self.section = self._base
        line, self._action_line = self._action_line, ""
        self._section_text(line)

    def _enter(self, section: str) -> None:
        if section == "input" and self._base == "thought":
            self._release(self._thought)  # the call is certain now: its thought is the content
        elif section == "end":
            self._close()
        self.section = section
        self._in_line = True  # the rest of the header line belongs to the new section

    def _close(self) -> None:
        """End of the response (Observation line or end of text): emit what the open section held."""
        if self.section == "thought":
            self._release(self._thought)
        elif self.section == "input":
            self._events.append(ToolCallEvent(self._action_name, self._arguments.strip()))
        self._thought = ""
        self._pending_space = ""


def parse_response(text: str, in_thought: bool = False) -> ParsedResponse:
    """Read a complete model output: a tool call (finish_reason "function_call") or an answer ("stop").

    "Thought: T\\nAction: N\\nAction Input: A[\\nObservation:...]" → content T, call N(A) (A kept as text
    even if it is not valid JSON); "...Final Answer: X" → X; other text → itself. See ReActStreamParser.
    """
    parser = ReActStreamParser(in_thought=in_thought)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    if calls:
        call = {"name": calls[0].name, "arguments": calls[0].arguments}
        return ParsedResponse(content, call, "function_call")
    return ParsedResponse(content, None, "stop")
