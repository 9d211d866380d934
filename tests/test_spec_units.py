"""Speculative decoding's pure parts: prompt lookup, the acceptance rules (greedy and the
rejection-sampling distribution), the adaptive draft length, options, the logits-window modes,
and the TensorRT cache rollback's copy arithmetic (emulated on CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from llama_export.runtime.backends.base import logits_positions, logits_window
from llama_export.runtime.backends.trt import IoPlan
from llama_export.runtime.engines import Limits
from llama_export.runtime.errors import BundleError, InputError
from llama_export.runtime.sampling import SamplingOptions, logits_to_probs, sample
from llama_export.runtime.speculative import (
    AdaptiveDraftLength,
    LookupPlanner,
    SpeculativeOptions,
    VerifyCost,
    lookup_draft,
    verify_row,
)

GREEDY = SamplingOptions()


# ---- prompt lookup ---------------------------------------------------------------------------
def test_lookup_copies_what_followed_the_longest_suffix_match() -> None:
    #        0  1  2  3  4  5  6  7  8  9 10 11
    ctx = [5, 1, 2, 3, 9, 9, 2, 3, 7, 8, 1, 2, 3]
    # suffix [1, 2, 3] matched at 1..3 (length 3) beats [2, 3] at 6..7 (length 2)
    assert lookup_draft(ctx, 4, min_ngram=2) == [9, 9, 2, 3]
    assert lookup_draft(ctx, 2, min_ngram=2) == [9, 9]


def test_lookup_prefers_the_most_recent_of_equal_matches_and_stops_at_the_end() -> None:
    ctx = [4, 6, 1, 4, 6, 2, 4, 6]
    assert lookup_draft(ctx, 3, min_ngram=2) == [2, 4, 6]  # the later [4, 6] (at 3..4)
    assert lookup_draft([1, 2, 1, 2], 5, min_ngram=2) == [1, 2]  # continuation ends at the end
    # a repeating run: the latest match (one step back) has 1 token after it, an earlier one 3
    assert lookup_draft([5, 7, 7, 7, 7, 7], 3, min_ngram=2, max_ngram=2) == [7, 7, 7]


def test_lookup_min_ngram_and_empty_cases() -> None:
    ctx = [1, 2, 3, 4, 9, 3]
    assert lookup_draft(ctx, 3, min_ngram=2) == []  # only a 1-token match ([3])
    assert lookup_draft(ctx, 3, min_ngram=1) == [4, 9, 3]
    assert lookup_draft([1, 2, 3], 3) == []  # no earlier occurrence
    assert lookup_draft([7], 3, min_ngram=1) == []
    assert lookup_draft(ctx, 0, min_ngram=1) == []
    # max_ngram caps the score: both matches score 2, so the most recent wins
    assert lookup_draft([1, 2, 3, 8, 0, 2, 3, 9, 1, 2, 3], 1, max_ngram=2) == [9]


# ---- greedy verification ---------------------------------------------------------------------
def _onehot_logits(targets: list[int], vocab: int = 10) -> np.ndarray:
    logits = np.zeros((len(targets), vocab), dtype=np.float32)
    logits[np.arange(len(targets)), targets] = 5.0
    return logits


def test_greedy_keeps_the_agreeing_prefix_then_the_targets_token() -> None:
    rng = np.random.default_rng(0)
    logits = _onehot_logits([4, 5, 6, 7])  # target's argmax after each prefix
    assert verify_row(logits, [4, 5, 9], GREEDY, rng).tokens == [4, 5, 6]
    assert verify_row(logits, [4, 5, 9], GREEDY, rng).accepted == 2
    v = verify_row(logits, [4, 5, 6], GREEDY, rng)
    assert (v.tokens, v.accepted) == ([4, 5, 6, 7], 3)  # all kept + the bonus token
    v = verify_row(logits, [1, 5, 6], GREEDY, rng)
    assert (v.tokens, v.accepted) == ([4], 0)
    assert verify_row(logits[:1], [], GREEDY, rng).tokens == [4]


def test_greedy_verification_applies_the_repetition_penalty_per_position() -> None:
    """Position j sees the drafts before it as already generated, exactly as plain decoding
    would after emitting them."""
    rng = np.random.default_rng(0)
    opts = SamplingOptions(repetition_penalty=3.0)
    logits = np.tile(np.array([[0.0, 2.0, 1.5, 0.0]], dtype=np.float32), (3, 1))
    seen = np.zeros(4, dtype=bool)
    v = verify_row(logits, [1, 2], opts, rng, seen=seen)
    # plain: token 1 (2.0), then 1 is penalized to 0.67 -> token 2 (1.5), then both -> 0/3 ties
    want, s = [], seen.copy()
    for j in range(3):
        tok = int(sample(logits[j:j + 1], opts, rng, s[None].copy())[0])
        want.append(tok)
        s[tok] = True
    assert v.tokens == want and v.accepted == 2
    assert not seen.any()  # the caller's array is not modified


# ---- the rejection rule keeps the target distribution -----------------------------------------
# Stated test: Pearson chi-square of N draws against the exact probabilities; with df = 5 the
# 0.1% critical value is 20.5. The draws are seeded, so the outcome is fixed (no flakes); a
# broken rule (e.g. accepting with p instead of p / q, or resampling from p) fails by far.
N_DRAWS = 6000
CHI2_DF5_P001 = 20.5


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


@pytest.mark.parametrize("with_q", [False, True])
def test_rejection_rule_emits_the_target_distribution(with_q: bool) -> None:
    rng = np.random.default_rng(1)
    opts = SamplingOptions(temperature=1.0)
    logits = np.log(np.array([[0.30, 0.25, 0.20, 0.12, 0.08, 0.05]] * 2))
    p = logits_to_probs(logits[:1], opts)[0]
    q = np.array([0.05, 0.10, 0.50, 0.05, 0.20, 0.10])  # a draft that is badly wrong
    counts = np.zeros(6)
    accepted = 0
    for _ in range(N_DRAWS):
        x = int(rng.choice(6, p=q)) if with_q else 2  # lookup: always drafts token 2
        v = verify_row(logits, [x], opts, rng, draft_probs=q[None] if with_q else None)
        counts[v.tokens[0]] += 1
        accepted += v.accepted
    assert _chi2(counts, p) < CHI2_DF5_P001
    # acceptance matches theory: sum_x min(p, q) for a draft model, p[2] for a point mass
    expected = np.minimum(p, q).sum() if with_q else p[2]
    assert abs(accepted / N_DRAWS - expected) < 0.03


def test_bonus_token_is_drawn_from_the_last_position() -> None:
    rng = np.random.default_rng(2)
    opts = SamplingOptions(temperature=1.0, top_k=3)
    logits = np.log(np.array([[1e-9, 1.0, 1e-9, 1e-9, 1e-9, 1e-9],
                              [0.5, 0.1, 0.2, 0.1, 0.05, 0.05]]))
    p = logits_to_probs(logits[1:], opts)[0]
    counts = np.zeros(6)
    for _ in range(N_DRAWS):
        v = verify_row(logits, [1], opts, rng)
        assert v.accepted == 1
        counts[v.tokens[1]] += 1
    assert _chi2(counts, p) < CHI2_DF5_P001


# ---- adaptive draft length -----------------------------------------------------------------
def test_adaptive_length_grows_shrinks_and_pauses_on_misses() -> None:
    policy = AdaptiveDraftLength(max_k=10)
    assert policy.budget() == 4
    policy.update(4, 4)
    assert policy.budget() == 6
    policy.update(6, 6)
    policy.update(8, 8)
    assert policy.budget() == 10  # capped
    policy.update(10, 2)
    assert policy.budget() == 3  # one more than were accepted
    policy.update(3, 0)
    assert policy.budget() == 1
    policy.update(1, 0)  # a second outright miss: pause 4 steps
    assert [policy.budget() for _ in range(5)] == [0, 0, 0, 0, 1]
    policy.update(1, 0)
    policy.update(1, 0)  # two more misses: the pause doubles
    assert [policy.budget() for _ in range(9)] == [0] * 8 + [1]
    policy.update(1, 1)  # an acceptance resets the schedule
    policy.update(3, 0)
    policy.update(1, 0)
    assert [policy.budget() for _ in range(5)] == [0, 0, 0, 0, 1]
    fixed = AdaptiveDraftLength(max_k=7, adaptive=False)
    fixed.update(7, 0)
    fixed.update(7, 0)
    assert fixed.budget() == 7


# ---- the lookup planner: cost model, draft length, source ----------------------------------
def test_verify_cost_prior_then_learned_per_batch() -> None:
    cost = VerifyCost()
    assert cost.steps(1) == 1.0
    assert cost.steps(5) == pytest.approx(1 + 4 * VerifyCost.PRIOR_SLOPE)  # nothing measured
    cost.observe(1, 5, 0.020)
    assert cost.steps(5) == pytest.approx(1.6)  # no plain step measured yet: still the prior
    cost.observe(1, 1, 0.010)
    assert cost.steps(5) == pytest.approx(2.0)
    assert cost.steps(3) == pytest.approx(1.5)  # linear between the points measured
    assert cost.steps(7) == pytest.approx(2.0 + 2 * VerifyCost.PRIOR_SLOPE)  # past the last one
    cost.observe(1, 5, 0.030)  # a moving average
    assert cost.steps(5) == pytest.approx((0.8 * 20 + 0.2 * 30) / 10)
    assert cost.steps(5, measured=False) == pytest.approx(1.6)  # sampled text: the prior only
    assert cost.steps(5, batch=2) == pytest.approx(1.6)  # batch 2 has its own points


def _copy_run(planner: LookupPlanner, prompt: list[int], source: list[int],
              steps: int) -> list[int]:
    """Drive the planner over an answer that copies ``source`` verbatim; the draft sizes."""
    out, sizes = [source[0]], []
    while len(sizes) < steps:
        draft = planner.propose(prompt + out, 8)
        truth = source[len(out):len(out) + len(draft) + 1]
        assert draft == truth[:len(draft)]  # copying verbatim: every draft is right
        planner.update(len(draft), len(draft))
        out += truth
        sizes.append(len(draft))
    return sizes


def test_planner_drafts_longer_as_a_copy_keeps_being_accepted() -> None:
    source = list(range(100, 200))
    prompt = [1, 2, *source, 3]
    sizes = _copy_run(LookupPlanner(8, VerifyCost()), prompt, source, 10)
    # a 1-token match first (prior keep rate 0.3; a forward of T tokens costs 1 + 0.15 (T - 1))
    assert sizes[0] == 1
    assert sizes == sorted(sizes) and sizes[-1] == 8
    # where a forward of several tokens costs several steps, the same text drafts later and
    # less (a 1-token match is not worth it); only a copy that keeps being right grows to 8
    steep = VerifyCost()
    for t in range(1, 10):
        steep.observe(1, t, 0.010 * (1 + 0.6 * (t - 1)))
    dear = _copy_run(LookupPlanner(8, steep), prompt, source, 10)
    assert dear[:2] == [0, 0] and sum(dear) < sum(sizes) and dear[-1] == 8
    assert _copy_run(LookupPlanner(8, VerifyCost(), adaptive=False), prompt, source, 2) == [8, 8]


def test_planner_stops_drafting_where_drafts_miss_then_probes_again() -> None:
    planner = LookupPlanner(8, VerifyCost())
    ctx = [5, 6, 7, 5]  # the suffix [5] always finds a draft: [6, 7, 5]
    misses = 0
    while draft := planner.propose(ctx, 8):
        planner.update(len(draft), 0)  # rejected outright
        misses += 1
        assert misses < 20
    assert misses >= 2  # a 1-token match's prior (0.3) survives a miss
    plain = 0
    while not planner.propose(ctx, 8):  # plain steps: the estimate drifts back to the prior
        planner.update(0, 0)
        plain += 1
        assert plain < 60
    assert plain >= 3


def test_planner_continues_its_copy_before_the_most_recent_match() -> None:
    ctx = [50, 51, 52, 53, 7, 60, 54, 7, 61, 55, 7, 62, 50]
    planner = LookupPlanner(8, VerifyCost(), adaptive=False)
    assert planner.propose(ctx, 2) == [51, 52]  # the only match of [50]
    planner.update(2, 2)  # both kept; the row's next token is the target's 99
    ctx += [51, 52, 99]
    assert planner.propose(ctx, 2) == []  # no match of [99]: a plain step, which gives 7
    planner.update(0, 0)
    ctx += [7]
    # three 1-token matches of [7]; the copy went on from 53 (position 3) to position 5
    assert planner.propose(ctx, 2) == [60, 54]
    assert lookup_draft(ctx, 2, min_ngram=1) == [62, 50]  # without a copy: the most recent


# ---- options and modes --------------------------------------------------------------------------
def test_speculative_options_parse_and_errors() -> None:
    assert SpeculativeOptions.parse("lookup", 5) == SpeculativeOptions(max_draft_tokens=5)
    d = SpeculativeOptions.parse("draft:/b/small", 3)
    assert (d.mode, d.draft_bundle, d.draft_variant, d.max_draft_tokens) == ("draft", "/b/small",
                                                                              None, 3)
    d = SpeculativeOptions.parse("draft:/b/small@int4")
    assert (d.draft_bundle, d.draft_variant) == ("/b/small", "int4")
    with pytest.raises(InputError, match="--speculative eagle is unknown: use lookup or draft:BUNDLE"):
        SpeculativeOptions.parse("eagle")
    with pytest.raises(InputError, match="needs a bundle: pass --speculative draft:PATH"):
        SpeculativeOptions.parse("draft")
    with pytest.raises(InputError, match="--draft-tokens must be an integer >= 1, got 0"):
        SpeculativeOptions.parse("lookup", 0)


def test_logits_modes() -> None:
    assert [logits_window(m) for m in ("all", "last", "tail:16")] == [None, 1, 16]
    assert [logits_positions("tail:16", s) for s in (1, 5, 16, 300)] == [1, 5, 16, 16]
    assert logits_positions("all", 7) == 7 and logits_positions("last", 7) == 1
    for bad in ("tail:0", "tail:", "tail:x", "first"):
        with pytest.raises(BundleError, match=r"logits mode .* is unknown"):
            logits_window(bad)


# ---- TensorRT rollback arithmetic, emulated with a numpy cudaMemcpy2D ----------------------
def _memcpy2d(dst: np.ndarray, dpitch: int, src: np.ndarray, spitch: int, width: int,
              height: int) -> None:
    for row in range(height):
        dst[row * dpitch:row * dpitch + width] = src[row * spitch:row * spitch + width]


@pytest.mark.parametrize(("batch", "length", "keep"), [(1, 9, 4), (3, 12, 11), (2, 5, 1)])
def test_trt_truncate_copy_relays_the_kept_prefix(batch: int, length: int, keep: int) -> None:
    plan = IoPlan(past=("p",), present=("q",), kv_heads=2, head_dim=8, kv_itemsize=2, vocab=10,
                  logits_dtype="float16", logits_mode="tail:16", limits=Limits(4, 32, 64))
    kv = np.random.default_rng(0).standard_normal((batch, 2, length, 8)).astype(np.float16)
    src = np.frombuffer(kv.tobytes(), dtype=np.uint8)
    dst = np.zeros_like(src)
    spitch, dpitch, width, height = plan.truncate_copy(batch, length, keep)
    _memcpy2d(dst, dpitch, src, spitch, width, height)
    got = np.frombuffer(dst[:batch * 2 * keep * 8 * 2].tobytes(), dtype=np.float16)
    np.testing.assert_array_equal(got.reshape(batch, 2, keep, 8), kv[:, :, :keep])


def test_trt_layout_of_a_tail_window_graph() -> None:
    plan = IoPlan(past=("p",), present=("q",), kv_heads=2, head_dim=8, kv_itemsize=2, vocab=100,
                  logits_dtype="float16", logits_mode="tail:16", limits=Limits(4, 32, 64))
    assert plan.static_layout()["logits"][1] == 4 * 16 * 100 * 2  # max_prompt 32 capped at 16
    # a 5-token forward returns 5 positions: the last 3 start at position 2
    assert plan.tail_logits_copy(batch=2, seq=5, tail=3) == (2 * 200, 5 * 200, 3 * 200, 2)
    # a 40-token forward returns the last 16: the last 1 starts at position 15
    assert plan.tail_logits_copy(batch=2, seq=40, tail=1) == (15 * 200, 16 * 200, 200, 2)
