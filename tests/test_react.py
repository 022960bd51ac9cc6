"""qwen.react: ReAct prompt folding and parsing of model output, against the original's golden data."""

import copy
import json
import random
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, load_reference

from qwen.react import (
    REACT_INSTRUCTION,
    TEXT_COMPLETION,
    TOOL_DESC,
    ContentDelta,
    ReActError,
    ReActStreamParser,
    ToolCallEvent,
    normalize_tools,
    parse_messages,
    parse_response,
    select_tools,
    stop_words_for,
)

GOLDEN = load_reference("react_golden.json")
GOLDEN_TEXT_COMPLETION = "<TEXT_COMPLETION: continue the last assistant message>"
WEATHER = next(c for c in GOLDEN["parse_messages"] if c["name"] == "functions, first turn")["functions"][0]


def golden_query(case):
    return TEXT_COMPLETION if case["query"] == GOLDEN_TEXT_COMPLETION else case["query"]


# ------------------------------------------------------------------------------------------ the prompt


def test_template_strings_are_the_originals():
    assert TOOL_DESC == GOLDEN["TOOL_DESC"]
    assert REACT_INSTRUCTION == GOLDEN["REACT_INSTRUCTION"]


def _source_files(pattern: str) -> list[Path]:
    """The repository's files matching `pattern`, git-ignored ones left out (a build/ or a venv holds copies of
    qwen/ that are not the repository's); every match where this is not a git checkout."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", pattern],
                            cwd=REPO, capture_output=True)  # fmt: skip
    if listed.returncode != 0:
        return [path for path in REPO.rglob(pattern) if ".venv" not in path.parts]
    return [REPO / name for name in listed.stdout.decode().split("\0") if name and (REPO / name).is_file()]


def test_template_strings_have_one_copy_in_the_repo():
    # taken from the golden file so that this test holds no copy either
    phrases = (
        GOLDEN["TOOL_DESC"].split("{name_for_human}")[0][-36:],
        GOLDEN["REACT_INSTRUCTION"].split("\n")[0],
    )
    copies = [
        path.relative_to(REPO)
        for path in _source_files("*.py")
        if path != REPO / "qwen" / "react.py"
        and any(p in path.read_text(encoding="utf-8", errors="ignore") for p in phrases)
    ]
    assert copies == [], f"ReAct prompt text copied outside qwen/react.py: {copies}"


@pytest.mark.parametrize("case", GOLDEN["parse_messages"], ids=lambda c: c["name"])
def test_parse_messages_matches_golden(case):
    query, history, system = parse_messages(case["messages"], normalize_tools(functions=case["functions"]))
    assert query == golden_query(case)
    assert history == case["history"]
    assert system == case["system"]


def to_openai_v1(case):
    """The same request in OpenAI v1 form: tools, assistant tool_calls, tool messages with tool_call_id."""
    tools = [{"type": "function", "function": f} for f in case["functions"]] if case["functions"] else None
    messages = []
    for i, m in enumerate(copy.deepcopy(case["messages"])):
        if m.get("function_call"):
            m["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": m.pop("function_call")}]
        if m["role"] == "function":
            m = {"role": "tool", "tool_call_id": f"call_{i - 1}", "content": m["content"]}
        messages.append(m)
    return tools, messages


@pytest.mark.parametrize("case", GOLDEN["parse_messages"], ids=lambda c: c["name"])
def test_openai_v1_tools_give_the_legacy_prompt(case):
    tools, messages = to_openai_v1(case)
    assert parse_messages(messages, normalize_tools(tools=tools)) == (
        golden_query(case),
        case["history"],
        case["system"],
    )


@pytest.mark.parametrize("case", GOLDEN["parse_messages"], ids=lambda c: c["name"])
def test_text_content_parts_read_like_strings(case):
    messages = copy.deepcopy(case["messages"])
    for m in messages:
        if m.get("content"):
            m["content"] = [{"type": "text", "text": m["content"]}]
    assert parse_messages(messages, case["functions"]) == (
        golden_query(case),
        case["history"],
        case["system"],
    )


def weather_call(call_id, city):
    args = json.dumps({"location": city})
    return {"id": call_id, "type": "function", "function": {"name": "get_current_weather", "arguments": args}}


def test_several_tool_calls_become_steps_in_call_order():
    messages = [
        {"role": "user", "content": "Weather in Boston and Paris?"},
        {
            "role": "assistant",
            "content": "Two lookups.",
            "tool_calls": [weather_call("a", "Boston"), weather_call("b", "Paris")],
        },
        {"role": "tool", "tool_call_id": "b", "content": "rainy"},  # results may come in any order
        {"role": "tool", "tool_call_id": "a", "content": "sunny\n"},
    ]
    query, history, _ = parse_messages(messages, [WEATHER])
    assert query is TEXT_COMPLETION
    assert history[-1][1] == (
        'Thought: Two lookups.\nAction: get_current_weather\nAction Input: {"location": "Boston"}'
        "\nObservation: sunny"
        '\nThought: \nAction: get_current_weather\nAction Input: {"location": "Paris"}'
        "\nObservation: rainy\nThought:"
    )


def test_a_finished_tool_conversation_is_one_react_trace():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Boston?"},
        {"role": "assistant", "content": None, "tool_calls": [weather_call("a", "Boston")]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    query, history, system = parse_messages(messages, [WEATHER])
    assert query == "And tomorrow?" and system == "Be brief."
    assert history[0][0].endswith("\n\nQuestion: Boston?")
    assert history[0][1] == (
        'Thought: \nAction: get_current_weather\nAction Input: {"location": "Boston"}\nObservation: sunny'
        "\nThought: I now know the final answer.\nFinal Answer: It is sunny."
    )


def test_the_instruction_goes_to_the_newest_completed_turn_only():
    # The original (openai_api.py, `i == len(messages) - 2`) put it on the newest completed turn.
    messages = [{"role": "user", "content": q} for q in ("one", "two", "three")]
    messages[1:1] = [{"role": "assistant", "content": "1"}]
    messages[3:3] = [{"role": "assistant", "content": "2"}]
    query, history, _ = parse_messages(messages, [WEATHER])
    instruction = REACT_INSTRUCTION.split("{tools_text}")[0]
    assert history[1][0].startswith(instruction) and history[1][0].endswith("\n\nQuestion: two")
    assert history[0][0] == "one" and query == "three"


def test_system_messages_merge_and_default():
    messages = [
        {"role": "system", "content": "A."},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": "B.\n"},
    ]
    assert parse_messages(messages).system == "A.\nB."
    assert parse_messages([{"role": "user", "content": "hi"}]).system == "You are a helpful assistant."


def test_plugin_and_openai_tool_forms_describe_the_same_tool():
    plugin = {
        "name_for_model": WEATHER["name"],
        "name_for_human": WEATHER["name"],
        "description_for_model": WEATHER["description"],
        "parameters": WEATHER["parameters"],
    }
    ask = [{"role": "user", "content": "Boston?"}]
    assert parse_messages(ask, [plugin]) == parse_messages(ask, [WEATHER])


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([{"role": "tool", "tool_call_id": "x", "content": "r"}], "messages[0]"),
        (
            [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "x", "content": "r"}],
            "tool call",
        ),
        ([{"role": "user", "content": "q"}, {"role": "function", "name": "f", "content": "r"}], "tool call"),
        ([{"role": "robot", "content": "q"}], "unknown role 'robot'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "ends with an assistant"),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "after a user message"),
        ([{"role": "system", "content": "s"}], "at least one user message"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [weather_call("a", "X")]},
                {"role": "tool", "tool_call_id": "zzz", "content": "r"},
            ],
            "'zzz'",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [weather_call("a", "X")]},
                {"role": "user", "content": "q2"},
            ],
            "no tool result",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [weather_call("a", "X")]}],
            "no tool result",
        ),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}], "text content"),
    ],
)
def test_invalid_conversations_raise_a_clear_value_error(messages, problem):
    with pytest.raises(ReActError, match=problem.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_messages(messages, [WEATHER])
    assert issubclass(ReActError, ValueError)


def test_normalize_tools_and_tool_choice():
    tools = [
        {"type": "function", "function": WEATHER},
        {"type": "function", "function": {"name": "now", "description": "Current time."}},
    ]
    functions = normalize_tools(tools=tools)
    assert [f["name"] for f in functions] == ["get_current_weather", "now"]
    assert normalize_tools(functions=[WEATHER]) == [WEATHER]
    assert normalize_tools() is None and normalize_tools(tools=[]) is None
    assert select_tools(functions, "auto") == functions == select_tools(functions, None)
    assert select_tools(functions, "required") == functions
    assert select_tools(functions, "none") is None
    assert select_tools(functions, {"type": "function", "function": {"name": "now"}}) == [functions[1]]
    assert select_tools(functions, {"name": "now"}) == [functions[1]]  # legacy function_call
    for bad, problem in [
        ({"type": "function", "function": {"name": "nope"}}, "'nope'"),
        ("sometimes", "tool_choice"),
    ]:
        with pytest.raises(ReActError, match=problem):
            select_tools(functions, bad)
    with pytest.raises(ReActError, match="no `tools`"):
        select_tools(None, "required")
    with pytest.raises(ReActError, match="not both"):
        normalize_tools(tools=tools, functions=[WEATHER])
    with pytest.raises(ReActError, match="name"):
        normalize_tools(functions=[{"description": "nameless"}])
    # a function without parameters still gets a schema in the prompt
    assert (
        'Parameters: {"type": "object", "properties": {}}'
        in parse_messages([{"role": "user", "content": "time?"}], [functions[1]]).query
    )


def test_stop_words():
    assert stop_words_for([WEATHER]) == ["Observation:", "Observation:\n"]
    assert stop_words_for(None) == [] and stop_words_for([]) == []


# ---------------------------------------------------------------------------------------- the response


@pytest.mark.parametrize("case", GOLDEN["parse_response"], ids=lambda c: c["model_output"][:40])
def test_parse_response_matches_golden(case):
    parsed = parse_response(case["model_output"])
    assert parsed.message() == case["message"]
    assert parsed.finish_reason == case["finish_reason"]


def react_text(thought, name=None, args=None, answer=None, observation=False):
    text = f"Thought: {thought}"
    if name is not None:
        text += f"\nAction: {name}\nAction Input: {args}"
        if observation:
            text += "\nObservation: made up"
    if answer is not None:
        text += f"\nFinal Answer: {answer}"
    return text


def test_parse_response_reads_generated_react_texts():
    rng = random.Random(0)
    words = [
        "sunny",
        "I",
        "need",
        "the",
        "weather",
        "。",
        "天气",
        "{",
        "}",
        ":",
        '"x"',
        "\n",
        "  ",
        "Action",
        "Final",
    ]
    for _ in range(200):
        thought = " ".join(rng.choice(words[:7]) for _ in range(rng.randint(0, 6))).strip()
        args = "".join(rng.choice(words) for _ in range(rng.randint(0, 8))).strip()
        if rng.random() < 0.5:
            parsed = parse_response(
                react_text(thought, "f_" + str(rng.randint(0, 9)), args, observation=rng.random() < 0.5)
            )
            assert parsed.function_call["arguments"] == args and parsed.content == thought
            assert parsed.finish_reason == "function_call"
        else:
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))).strip()
            parsed = parse_response(react_text(thought, answer=answer))
            assert parsed.content == answer and parsed.function_call is None


def test_parse_response_edge_cases():
    call = parse_response('Action: get_current_weather\nAction Input: {"location": Boston')  # no Thought
    assert call.function_call == {
        "name": "get_current_weather",
        "arguments": '{"location": Boston',
    }  # not JSON
    assert call.content == "" and call.finish_reason == "function_call"
    assert parse_response("Let me check.\nAction: f\nAction Input: {}").function_call["name"] == "f"
    no_input = parse_response("Thought: hm\nAction: f\nsomething else")
    assert no_input.function_call is None and no_input.content == "hm\nAction: f\nsomething else"
    assert parse_response("Final Answer: 42\nObservation: junk").content == "42"
    assert parse_response("Thought: just thinking").content == "just thinking"
    # a prompt ending in "Thought:" (TEXT_COMPLETION): the text starts inside a thought
    assert (
        parse_response(" I now know the final answer.\nFinal Answer: Sunny.", in_thought=True).content
        == "Sunny."
    )
    assert parse_response(" Need more.\nAction: f\nAction Input: {}", in_thought=True).content == "Need more."


def stream(text, cuts, in_thought=False):
    parser = ReActStreamParser(in_thought=in_thought)
    events = []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        events += parser.feed(text[a:b])
    return events + parser.finish()


def assert_stream_matches(text, cuts, in_thought=False):
    events = stream(text, cuts, in_thought)
    parsed = parse_response(text, in_thought)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == parsed.content, (text, cuts)
    calls = [{"name": e.name, "arguments": e.arguments} for e in events if isinstance(e, ToolCallEvent)]
    assert calls == ([parsed.function_call] if parsed.function_call else []), (text, cuts)
    assert all(e.text for e in events if isinstance(e, ContentDelta))


EXTRA_OUTPUTS = [
    " I now know the final answer.\nFinal Answer: It is sunny.\n",
    'Thought: 我需要查天气。\nAction: get_current_weather\nAction Input: {"location": "北京"}'
    "\nObservation:\n",
    "Final Answer:\n\n  line one\n  line two  \n\n",
    'Hello!\nHow can I help?\nActually\nAction: f\nAction Input: {\n  "a": 1\n}\n',
    "Thought: x\nAction: f\nAction: g\nAction Input: [1]",
    "Thought: x\nAction:\nAction Input: {}",
    "Observation: at once",
    "Act now.\nFinal Answer: not an answer header in plain text",
    "   \n\n  ",
    "Thought",
]


@pytest.mark.parametrize("text", [c["model_output"] for c in GOLDEN["parse_response"]] + EXTRA_OUTPUTS)
@pytest.mark.parametrize("in_thought", [False, True])
def test_stream_equals_parse_response_for_every_split(text, in_thought):
    for cut in range(len(text) + 1):
        assert_stream_matches(text, [cut], in_thought)
    assert_stream_matches(text, list(range(1, len(text))), in_thought)  # one character at a time
    rng = random.Random(len(text))
    for _ in range(20):
        assert_stream_matches(
            text, sorted(rng.sample(range(1, len(text) + 1), min(len(text), 4))), in_thought
        )


def test_stream_equals_parse_response_on_random_texts():
    rng = random.Random(1234)
    pieces = [
        "Thought:",
        "Action:",
        "Action Input:",
        "Final Answer:",
        "Observation:",
        "Act",
        "Final",
        "Obs",
        "\n",
        " ",
        "  ",
        "x",
        "f",
        "{}",
        "你好",
        "Thought",
        ":",
    ]
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        cuts = sorted(rng.sample(range(1, len(text) + 1), rng.randint(0, len(text)))) if text else []
        assert_stream_matches(text, cuts, in_thought=rng.random() < 0.3)


def test_stream_holds_text_that_may_become_a_call_and_streams_answers_early():
    parser = ReActStreamParser()
    assert parser.feed("Thought: I need the weather.") == []  # may still become a call's thought
    assert parser.feed("\nAction: get_current_weather\nAction Input: {") == [
        ContentDelta("I need the weather.")
    ]
    assert parser.feed('"location": "Boston"}') == []
    assert parser.feed("\nObservation:") == [ToolCallEvent("get_current_weather", '{"location": "Boston"}')]
    assert parser.done and parser.finish() == []

    parser = ReActStreamParser()
    assert parser.feed("Thought: I know it.\nFinal Ans") == []
    assert parser.feed("wer: It is sun") == [ContentDelta("It is sun")]  # the answer streams before the end
    assert parser.feed("ny.") == [ContentDelta("ny.")] and parser.finish() == []

    parser = ReActStreamParser()
    assert parser.feed("Th") == []  # may be "Thought:"
    assert parser.feed("e weather") == [ContentDelta("The weather")]  # plain text: released
