"""Talk to openai_api.py with the official `openai` client (>= 1.0): a plain answer, then a streamed one.

    python openai_api.py &                      # the server (offline demo model unless -c is given)
    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]
"""

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"),
                        help="the server's --api-key, if it has one (default: $OPENAI_API_KEY)")
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id

    response = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0,
        max_tokens=64,
    )
    print(response.choices[0].message.content)
    print(f"[{response.usage.prompt_tokens} prompt + {response.usage.completion_tokens} completion tokens, "
          f"finish_reason={response.choices[0].finish_reason}]")

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a short story about a lighthouse."}],
        max_tokens=128,
        stop=["The End"],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.usage.completion_tokens} tokens streamed]")


if __name__ == "__main__":
    main()
