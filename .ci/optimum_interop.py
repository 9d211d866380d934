"""Optimum interop (issue #10): Hugging Face Optimum runs our bundle and agrees with us.

    python .ci/optimum_interop.py BUNDLE [--variant-file model.onnx]

Run in an environment with optimum-onnx (it pins transformers < 4.58, so never the main
.venv): ``ORTModelForCausalLM.from_pretrained(BUNDLE, file_name="model.onnx")`` must generate,
greedy, exactly the text ``llama-export generate BUNDLE`` prints, for each prompt. Prints one
line per prompt and exits non-zero on the first disagreement.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot")
NEW_TOKENS = 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--file-name", default="model.onnx")
    a = ap.parse_args()
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    model = ORTModelForCausalLM.from_pretrained(a.bundle, file_name=a.file_name, use_cache=True)
    tok = AutoTokenizer.from_pretrained(a.bundle)
    cli = [sys.executable, "-m", "llama_export.runtime.cli"]  # this environment's install
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt", return_token_type_ids=False)
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
        theirs = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        ours = subprocess.run([*cli, "generate", a.bundle, "--prompt", prompt, "--graph",
                               "standard", "--max-new-tokens", str(NEW_TOKENS)],
                              capture_output=True, text=True, check=True).stdout.removesuffix("\n")
        same = ours == theirs
        print(f"optimum interop {'OK  ' if same else 'DIFF'} {prompt!r}: optimum {theirs!r}"
              + ("" if same else f" / llama-export {ours!r}"), flush=True)
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
