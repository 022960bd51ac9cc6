"""LangChain's ChatOpenAI against openai_api.py (pip install langchain-openai; optional, not needed elsewhere).

    python examples/langchain_client.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]
"""

import argparse
import os

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    args = parser.parse_args()

    model = args.model or OpenAI(base_url=args.base_url, api_key=args.api_key).models.list().data[0].id
    llm = ChatOpenAI(base_url=args.base_url, api_key=args.api_key, model=model, temperature=0, max_tokens=64)
    reply = llm.invoke([SystemMessage("You are a helpful assistant."), HumanMessage("What is the capital of Italy?")])
    print(reply.content)
    for chunk in llm.stream("Name three colours."):
        print(chunk.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
