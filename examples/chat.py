"""Interactive streaming chat with a bundle (history kept across turns).

    python examples/chat.py BUNDLE [--system "You are terse."] [--temperature 0.7]

Type a message and press Enter; the reply streams as it is generated. /reset clears the
history, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys

from llama_export.runtime import load_bundle
from llama_export.runtime.errors import LlamaExportError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--system", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()

    interactive = sys.stdin.isatty()
    with load_bundle(args.bundle) as model:
        history: list[dict[str, str]] = []
        if args.system:
            history.append({"role": "system", "content": args.system})
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return 0
            if line.strip() == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line.rstrip("\n")})
            print("assistant> ", end="", flush=True)
            reply = []
            try:
                for piece in model.stream_chat(history, max_new_tokens=args.max_new_tokens,
                                               temperature=args.temperature, seed=args.seed):
                    print(piece, end="", flush=True)
                    reply.append(piece)
            except LlamaExportError as e:  # e.g. the conversation outgrew the context
                print(f"\nerror: {e}", file=sys.stderr)
                history.pop()
                continue
            print()
            history.append({"role": "assistant", "content": "".join(reply)})


if __name__ == "__main__":
    sys.exit(main())
