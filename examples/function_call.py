"""Function calling through openai_api.py: the model asks for a tool, we run it, the model answers with its result.

The server turns `tools` into the ReAct prompt the Qwen chat models were trained on and the model's
"Action: / Action Input:" back into OpenAI `tool_calls` (streamed too). Use a Qwen-Chat checkpoint
(`python openai_api.py -c Qwen/Qwen-7B-Chat`); the tiny offline demo model does not know the format, and when no
tool is called the script says so and exits with status 1.

    python examples/function_call.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY] [--stream]
"""

import argparse
import json
import os
import sys

from openai import OpenAI

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location.",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    }
]


def get_current_weather(location: str, unit: str = "celsius") -> dict:
    """A stand-in for a real weather service."""
    return {"location": location, "temperature": "22", "unit": unit, "description": "Sunny"}


FUNCTIONS = {"get_current_weather": get_current_weather}


def ask(client: OpenAI, model: str, messages: list, stream: bool):
    """One assistant turn as a message dict (content and tool_calls), streamed or not."""
    if not stream:
        message = client.chat.completions.create(model=model, messages=messages, tools=TOOLS).choices[0].message
        return message.model_dump(exclude_none=True)
    content, calls = "", {}
    for chunk in client.chat.completions.create(model=model, messages=messages, tools=TOOLS, stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta and delta.content:
            content += delta.content
            print(delta.content, end="", flush=True)
        for call in (delta.tool_calls or []) if delta else []:
            entry = calls.setdefault(call.index, {"id": call.id, "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            entry["function"]["name"] += call.function.name or ""
            entry["function"]["arguments"] += call.function.arguments or ""
    print()
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--stream", action="store_true", help="stream the answers (tool calls included)")
    parser.add_argument("--question", default="What's the weather like in Boston?")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": args.question}]
    for _ in range(5):  # a few tool rounds at most
        message = ask(client, model, messages, args.stream)
        messages.append(message)
        if not message.get("tool_calls"):
            if len(messages) == 2:  # the first answer, and no tool was called: say so, never pass it off as one
                print(f"The model made no tool call; its answer did not come from a tool: {message.get('content')}")
                print("(The offline demo model cannot call tools: serve a Qwen-Chat checkpoint, e.g. "
                      "python openai_api.py -c Qwen/Qwen-7B-Chat.)", file=sys.stderr)
                raise SystemExit(1)
            print("Answer:", message.get("content"))
            return
        for call in message["tool_calls"]:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            try:
                result = FUNCTIONS[name](**json.loads(arguments))
            except (KeyError, TypeError, ValueError) as exc:  # unknown tool or bad arguments: tell the model
                result = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"Tool call: {name}({arguments}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})
    print("Stopped after 5 tool rounds.")


if __name__ == "__main__":
    main()
