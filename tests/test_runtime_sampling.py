"""Sampling (pure numpy): filters never leak outside their allowed set; seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest

from llama_export.runtime.errors import InputError
from llama_export.runtime.sampling import (
    SamplingOptions,
    apply_repetition_penalty,
    logits_to_probs,
    sample,
)

VOCAB = 200


def _logits(seed: int, batch: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, size=(batch, VOCAB)).astype(np.float32)


def _draw(logits: np.ndarray, opts: SamplingOptions, n: int = 300) -> np.ndarray:
    """``n`` draws per row: shape [n, batch]."""
    rng = np.random.default_rng(123)
    return np.stack([sample(logits, opts, rng) for _ in range(n)])


@pytest.mark.parametrize("k", [1, 5, 17])
def test_top_k_never_samples_outside_the_k_most_likely(k: int) -> None:
    logits = _logits(0)
    draws = _draw(logits, SamplingOptions(temperature=1.5, top_k=k))
    for row in range(logits.shape[0]):
        allowed = set(np.argsort(-logits[row])[:k].tolist())
        got = set(draws[:, row].tolist())
        assert got <= allowed
        if k > 1:
            assert len(got) > 1  # it really samples, not argmax in disguise


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_top_p_never_samples_outside_the_nucleus(p: float) -> None:
    logits = _logits(1)
    opts = SamplingOptions(temperature=1.0, top_p=p)
    draws = _draw(logits, opts)
    for row in range(logits.shape[0]):
        probs = np.exp(logits[row] - logits[row].max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        # smallest prefix of the sorted tokens whose mass reaches p
        n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
        allowed = set(order[:n].tolist())
        assert set(draws[:, row].tolist()) <= allowed


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_never_samples_below_the_floor(min_p: float) -> None:
    logits = _logits(2)
    draws = _draw(logits, SamplingOptions(temperature=1.0, min_p=min_p))
    for row in range(logits.shape[0]):
        probs = np.exp(logits[row] - logits[row].max())  # relative to the max: max is 1
        allowed = set(np.flatnonzero(probs >= min_p).tolist())
        assert set(draws[:, row].tolist()) <= allowed


def test_filters_combine_and_probabilities_normalise() -> None:
    logits = _logits(3)
    probs = logits_to_probs(logits, SamplingOptions(temperature=0.8, top_k=20, top_p=0.8,
                                                    min_p=0.01))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-12)
    assert ((probs > 0).sum(axis=-1) <= 20).all()


def test_same_seed_reproduces_and_other_seed_differs() -> None:
    logits = _logits(4)
    opts = SamplingOptions(temperature=1.0, seed=7)
    a = [sample(logits, opts, r).tolist() for r in [opts.rng()] for _ in range(50)]
    b = [sample(logits, opts, r).tolist() for r in [opts.rng()] for _ in range(50)]
    other = SamplingOptions(temperature=1.0, seed=8)
    c = [sample(logits, other, r).tolist() for r in [other.rng()] for _ in range(50)]
    assert a == b
    assert a != c


def test_temperature_to_zero_equals_greedy() -> None:
    logits = _logits(5, batch=8)
    greedy = sample(logits, SamplingOptions(temperature=0.0), np.random.default_rng(0))
    assert greedy.tolist() == np.argmax(logits, axis=-1).tolist()
    cold = _draw(logits, SamplingOptions(temperature=1e-4), n=50)
    assert (cold == greedy).all()


def test_repetition_penalty_makes_seen_tokens_less_likely() -> None:
    logits = np.array([[2.0, -1.0, 1.5, 0.5]])
    seen = np.array([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(out, [[1.0, -2.0, 1.5, 0.5]])  # transformers' CTRL rule
    greedy = SamplingOptions(repetition_penalty=2.0)
    assert sample(logits, greedy, np.random.default_rng(0), seen).tolist() == [2]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -0.1}, "temperature must be >= 0, got -0.1: use 0 for greedy"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5: use 1.0 to disable"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_k": -1}, "top_k must be an integer >= 0, got -1"),
    ({"min_p": 2.0}, "min_p must be in [0, 1], got 2.0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
])
def test_invalid_values_are_one_line_errors_naming_the_fix(kwargs: dict[str, float],
                                                           message: str) -> None:
    with pytest.raises(InputError) as err:
        SamplingOptions(**kwargs)  # type: ignore[arg-type]
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
