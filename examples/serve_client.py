"""Talk to `llama-export serve` (or any OpenAI-compatible server) with the official client:
one streamed chat answer, then a few questions sent concurrently (the server batches them).

    llama-export serve build/smollm2 &            # or: make serve
    python examples/serve_client.py http://127.0.0.1:8000/v1 "What is the capital of France?"

Needs only `pip install openai` on the client side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import openai


def stream_answer(client: openai.OpenAI, model: str, question: str, max_tokens: int) -> str:
    """Print the answer as it streams; return it."""
    parts = []
    stream = client.chat.completions.create(model=model, stream=True, max_tokens=max_tokens,
                                            temperature=0,  # greedy: the same answer every run
                                            messages=[{"role": "user", "content": question}])
    for chunk in stream:
        piece = chunk.choices[0].delta.content or "" if chunk.choices else ""
        print(piece, end="", flush=True)
        parts.append(piece)
    print()
    return "".join(parts)


async def ask_concurrently(url: str, key: str, model: str, questions: list[str],
                           max_tokens: int) -> list[str]:
    """Send every question at once; the server decodes them in one batch."""
    async with openai.AsyncOpenAI(base_url=url, api_key=key) as client:
        replies = await asyncio.gather(*(client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0,
            messages=[{"role": "user", "content": q}]) for q in questions))
    return [r.choices[0].message.content or "" for r in replies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server's /v1 base URL")
    parser.add_argument("question")
    parser.add_argument("--also", nargs="*", default=["Name a primary color.", "What is 2 + 2?"],
                        help="questions sent concurrently after the first")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    key = os.environ.get("OPENAI_API_KEY", "none")  # the server's --api-key, if it has one
    client = openai.OpenAI(base_url=args.url, api_key=key)
    model = client.models.list().data[0].id
    print(f"Q: {args.question}\nA: ", end="")
    stream_answer(client, model, args.question, args.max_tokens)
    t0 = time.perf_counter()
    answers = asyncio.run(ask_concurrently(args.url, key, model, args.also, args.max_tokens))
    for q, a in zip(args.also, answers, strict=True):
        print(f"Q: {q}\nA: {a}")
    print(f"[{len(answers)} concurrent answers in {time.perf_counter() - t0:.2f} s]")


if __name__ == "__main__":
    main()
