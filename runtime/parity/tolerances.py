"""Pass/fail limits per precision, and ``--tolerance KEY=VALUE`` overrides.

Keys (one row fails when any limit is broken; ``None`` = reported, not gated):

    max_abs   max |our logit - the original's| over the original's top-k ids, every position
    mean_abs  mean of the same
    top1      share of positions where our argmax is the original's argmax (at least)
    kl        mean KL(original || ours) over the original's top-k ids, both renormalized to
              those k tokens (a truncated KL: it ignores the tail outside the top-k)
    ppl       held-out perplexity increase over the original's, relative (0.03 = +3 %)
    greedy    for every prompt, the share of the original's greedy continuation the runtime
              reproduces before it first picks another token (at least)
    tie       a divergence where the original's top-2 logits are closer than this is a near-tie
              either engine may break either way: it counts as a full match for ``greedy``
              (default 2 x max_abs: errors within max_abs can flip exactly such ties)

Defaults come from SmolLM2-135M figures measured on ONNX Runtime CPU (README, "Check a
deployment"), with margin: fp32 tight (its error is float reassociation), fp16 looser,
int8/int4 from the accuracy gates their calibration already applies (perplexity +3 % / +8 %,
top-1 >= 90 % for int8) — their greedy continuations legitimately drift, so ``greedy`` is
reported for them but not gated unless asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llama_export.runtime.errors import InputError


@dataclass(frozen=True)
class Tolerance:
    max_abs: float | None
    mean_abs: float | None
    top1: float | None
    kl: float | None
    ppl: float | None
    greedy: float | None
    tie: float = 0.0


KEYS = tuple(f.name for f in dataclasses.fields(Tolerance))

# SmolLM2 measured (ONNX Runtime CPU, worst of the two graphs): fp32 max 1.1e-4, mean 1.0e-5,
# KL 1.2e-11, ppl +0.001 %; fp16 max 0.092, mean 0.012, top-1 99.8 %, KL 1.3e-5, ppl -0.02 %
# (one prompt diverges after 17 tokens at a 0.016-logit near-tie); int8 mean 0.54, top-1 93.3 %,
# KL 0.019, ppl -0.9 %; int4 mean 0.19, top-1 96.8 %, KL 3.2e-3, ppl +1.0 %.
DEFAULTS: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=2e-3, mean_abs=2e-4, top1=0.995, kl=1e-8, ppl=0.001, greedy=1.0,
                      tie=4e-3),
    "fp16": Tolerance(max_abs=0.25, mean_abs=0.04, top1=0.97, kl=2e-4, ppl=0.01, greedy=1.0,
                      tie=0.5),
    "int8": Tolerance(max_abs=None, mean_abs=1.0, top1=0.90, kl=0.05, ppl=0.03, greedy=None),
    "int4": Tolerance(max_abs=None, mean_abs=0.75, top1=0.85, kl=0.05, ppl=0.08, greedy=None),
}
# Variants named by what they hold: weight-only int8 is gated like int8.
ALIASES = {"int8wo": "int8"}


def precision_key(precision: str) -> str:
    """The defaults a variant of ``precision`` is judged by (unknown ones: the loosest)."""
    p = ALIASES.get(precision, precision)
    return p if p in DEFAULTS else "int4"


def parse_overrides(items: Sequence[str]) -> dict[str | None, dict[str, float | None]]:
    """``["kl=0.01", "int8.top1=0.95", "int4.greedy=off"]`` → ``{None: {...}, "int8": {...}}``
    (``None``: every precision)."""
    out: dict[str | None, dict[str, float | None]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        scope, _, name = key.strip().rpartition(".")
        if not sep or name not in KEYS:
            raise InputError(f"--tolerance {item!r}: use KEY=VALUE or PRECISION.KEY=VALUE with "
                             f"KEY one of {', '.join(KEYS)}")
        if scope and scope not in DEFAULTS and scope not in ALIASES:
            raise InputError(f"--tolerance {item!r}: unknown precision {scope!r}, use one of "
                             f"{', '.join(DEFAULTS)}")
        out.setdefault(ALIASES.get(scope, scope) or None, {})[name] = _value(item, name, value)
    return out


def _value(item: str, name: str, text: str) -> float | None:
    text = text.strip()
    if text.lower() in ("off", "none") and name != "tie":
        return None
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"--tolerance {item!r}: {text!r} is not a number (or 'off')") from None
    if v < 0 or (name in ("top1", "greedy") and v > 1):
        raise InputError(f"--tolerance {item!r}: out of range ({name} takes "
                         f"{'0..1' if name in ('top1', 'greedy') else '>= 0'})")
    return v


def tolerance_for(precision: str,
                  overrides: Mapping[str | None, Mapping[str, float | None]] | None = None
                  ) -> Tolerance:
    """Defaults for ``precision``, then overrides for every precision, then its own."""
    key = precision_key(precision)
    tol = DEFAULTS[key]
    for scope in (None, key):
        changes = (overrides or {}).get(scope)
        if changes:
            tol = dataclasses.replace(tol, **changes)  # type: ignore[arg-type]
    return tol
