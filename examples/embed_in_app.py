"""Embed the runtime in a Python application: load a bundle once, serve many prompts, and
stream tokens to a callback (e.g. a websocket, a GUI, a log).

    python examples/embed_in_app.py BUNDLE "First question" "Second question" ...

Only the runtime is needed (numpy, onnxruntime, tokenizers, jinja2): no torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from llama_export.runtime import Model, load_bundle


class Assistant:
    """Application object holding one loaded model; answer() is safe to call many times."""

    def __init__(self, bundle: str, max_new_tokens: int = 64) -> None:
        self.model: Model = load_bundle(bundle)  # the slow part (session, sha256): once
        self.max_new_tokens = max_new_tokens

    def answer(self, question: str, on_token: Callable[[str], None]) -> str:
        """Stream the reply to ``on_token`` piece by piece; return the whole reply."""
        messages = [{"role": "user", "content": question}]
        if not self.model.tokenizer.chat_template:  # plain LMs: continue the text instead
            pieces = self.model.stream(question, max_new_tokens=self.max_new_tokens)
        else:
            pieces = self.model.stream_chat(messages, max_new_tokens=self.max_new_tokens)
        reply = []
        for piece in pieces:
            on_token(piece)
            reply.append(piece)
        return "".join(reply)

    def close(self) -> None:
        self.model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("questions", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    assistant = Assistant(args.bundle, args.max_new_tokens)
    try:
        for q in args.questions:
            print(f"Q: {q}\nA: ", end="", flush=True)
            t0 = time.perf_counter()
            assistant.answer(q, on_token=lambda piece: print(piece, end="", flush=True))
            print()
            print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    finally:
        assistant.close()


if __name__ == "__main__":
    main()
