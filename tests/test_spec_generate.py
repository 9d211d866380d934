"""Speculative generation on tiny models: greedy text identical to plain decoding (batch 1 and
batched, both graphs, every ending), the sampling distribution unchanged, cache rollback per
backend, draft-model drafting, and the refusals."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama_export.runtime import load_bundle
from llama_export.runtime.bundle import make_options
from llama_export.runtime.errors import InputError
from llama_export.runtime.generate import left_pad, positions_from_mask
from llama_export.runtime.spec_generate import Drafts, SpeculativeGeneration
from llama_export.runtime.speculative import VerifyCost

PROMPTS = ["abcabcabcabc", "the cat sat on the mat; the cat sat on", "x",
           "def f(a):\n    return a + 1\n\ndef g(a):\n    return", "0123456789012345"]


@pytest.fixture(scope="module")
def graphs(tiny_tail_bundle: Path) -> Any:
    with load_bundle(tiny_tail_bundle, graph="ort") as ort, \
            load_bundle(tiny_tail_bundle, graph="standard") as std:
        yield {"ort": ort, "standard": std}


def _random_prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(1, 30))))
            for _ in range(n)]


def _both(model: Any, prompts: list[str], **kw: Any) -> tuple[list[Any], list[Any], Any]:
    plain = model.generate_batch(prompts, **kw)
    spec = model.generate_batch(prompts, speculative="lookup", **kw)
    return plain, spec, model.last_generation


def _same(plain: list[Any], spec: list[Any]) -> None:
    for a, b in zip(plain, spec, strict=True):
        assert (b.tokens, b.text, b.finish_reason) == (a.tokens, a.text, a.finish_reason)


@pytest.mark.parametrize("graph", ["ort", "standard"])
def test_greedy_identity_batch1(graphs: Any, graph: str) -> None:
    model = graphs[graph]
    drafted = accepted = 0
    for prompt in PROMPTS + _random_prompts(12, seed=0):
        plain, spec, gen = _both(model, [prompt], max_new_tokens=48, eos_token_ids=())
        _same(plain, spec)
        assert gen.speculating
        drafted += gen.stats.drafted_tokens
        accepted += gen.stats.accepted_tokens
        assert gen.stats.decode_tokens == len(spec[0].tokens) - 1
    assert drafted > 100 and accepted > 50  # speculation really ran, and was often right


def test_greedy_identity_batched(graphs: Any) -> None:
    """Left-padded rows of different lengths stay aligned; rows finish on their own."""
    prompts = PROMPTS + _random_prompts(3, seed=1)
    std = graphs["standard"]
    plain, spec, gen = _both(std, prompts, max_new_tokens=40, eos_token_ids=())
    _same(plain, spec)
    assert gen.speculating and gen.stats.accepted_tokens > 0
    # per-row EOS ids taken from the plain text: rows end at different steps
    eos = (plain[0].tokens[7], plain[3].tokens[20])
    plain, spec, _ = _both(std, prompts, max_new_tokens=40, eos_token_ids=eos)
    _same(plain, spec)
    assert {c.finish_reason for c in spec} >= {"eos", "length"}
    # the ONNX-Runtime graph steps a batch over a past token by token: speculation steps aside
    ort = graphs["ort"]
    plain, spec, gen = _both(ort, prompts, max_new_tokens=24, eos_token_ids=())
    _same(plain, spec)
    assert not gen.speculating and gen.stats.drafted_tokens == 0


@pytest.mark.parametrize("graph", ["ort", "standard"])
def test_identity_through_stop_strings_eos_and_full_context(graphs: Any, graph: str) -> None:
    model = graphs[graph]
    full = model.generate("the cat sat on the mat; the cat sat on", max_new_tokens=60,
                          eos_token_ids=())
    stop = full.text[25:28]
    plain, spec, _ = _both(model, ["the cat sat on the mat; the cat sat on"], max_new_tokens=60,
                           eos_token_ids=(), stop=[stop])
    _same(plain, spec)
    assert spec[0].finish_reason == "stop"
    plain, spec, _ = _both(model, ["abcabcabcabc"], max_new_tokens=60,
                           eos_token_ids=(full.tokens[30],))
    _same(plain, spec)
    ctx = model.manifest.max_context
    for room in (1, 2, 9, 23):  # the context fills up mid-verification or exactly at its end
        prompt = ("ab" * ctx)[:ctx - room]
        plain, spec, _ = _both(model, [prompt], max_new_tokens=60, eos_token_ids=())
        _same(plain, spec)
        assert spec[0].finish_reason == "context"
        assert spec[0].prompt_tokens + len(spec[0].tokens) == ctx + 1
    streamed = "".join(model.stream("abcabcabcabc", max_new_tokens=30, speculative="lookup"))
    assert streamed == model.generate("abcabcabcabc", max_new_tokens=30).text


def test_drafts_never_exceed_the_logits_window(graphs: Any, clock_free_cost: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = graphs["ort"]
    monkeypatch.setattr(model, "_verify_cost", clock_free_cost)  # load-proof lengths
    gen = model.start([model.encode("ab" * 20)], max_new_tokens=60, eos_token_ids=(),
                      speculative="lookup")
    list(gen)
    assert gen.policy.max_k == 5  # --logits tail:6
    assert gen.stats.tokens_per_forward is not None and 3 < gen.stats.tokens_per_forward <= 6


def test_draft_model_identity_and_self_drafting(graphs: Any, tiny_draft_bundle: Path,
                                                tiny_tail_bundle: Path) -> None:
    for graph in ("ort", "standard"):
        model = graphs[graph]
        prompts = PROMPTS[:3] if graph == "ort" else PROMPTS
        for prompt in prompts if graph == "ort" else [None]:
            batch = [prompt] if prompt else prompts
            plain = model.generate_batch(batch, max_new_tokens=32, eos_token_ids=())
            spec = model.generate_batch(batch, max_new_tokens=32, eos_token_ids=(),
                                        speculative=f"draft:{tiny_draft_bundle}")
            _same(plain, spec)
            assert model.last_generation.stats.drafted_tokens > 0
    # drafting with the target's own weights: nearly every draft is kept
    model = graphs["ort"]
    gen = model.start([model.encode("hello")], max_new_tokens=40, eos_token_ids=(),
                      speculative=f"draft:{tiny_tail_bundle}")
    list(gen)
    assert gen.stats.acceptance_rate is not None and gen.stats.acceptance_rate > 0.9


def test_refusals(tiny_bundle: Path, tiny_draft_bundle: Path, graphs: Any) -> None:
    with load_bundle(tiny_draft_bundle) as last, \
            pytest.raises(InputError, match=r"returns the last one only \(exported with --logits "
                                            r"last\): re-export the bundle with .*--logits tail:16"):
        last.generate("abc", speculative="lookup")  # exported with --logits last
    model = graphs["ort"]
    with load_bundle(tiny_bundle) as other:
        other.manifest.data["model"]["vocab_size"] = 999
        with pytest.raises(InputError, match=r"does not share the target's tokenizer \(vocab sizes "
                                             r"999 vs 320\): draft with a smaller bundle of the same"):
            model.attach_draft(other)
    with pytest.raises(InputError, match="--speculative medusa is unknown"):
        model.generate("abc", speculative="medusa")


# ---- the sampling distribution is the target's ------------------------------------------------
# Stated test: a chi-square test of homogeneity between plain and speculative samples of the
# 2nd..4th generated tokens (top_k=3: at most 27 outcomes; repetition penalty on, so the
# per-position penalty is covered too), N runs each, at the 0.1% level (critical value by
# Wilson-Hilferty). Seeded: the outcome is fixed, so it cannot flake. Replacing the rejection
# rule by "keep every draft the target allows" fails the point-mass case (stat 6x the
# critical value).
N_RUNS = 800


def _chi2_critical(df: int, z: float = 3.09) -> float:
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _homogeneity(a: Counter[Any], b: Counter[Any]) -> tuple[float, int]:
    cells = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for c in cells:
        tot = a[c] + b[c]
        for n, obs in ((na, a[c]), (nb, b[c])):
            exp = tot * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    return stat, len(cells) - 1


class _GreedyPathDrafter:
    """Point-mass drafts (as prompt lookup's): the plain greedy continuation of the context,
    so drafts are often, not always, what sampling picks."""

    plans_length = False

    def __init__(self, model: Any) -> None:
        self.model = model

    def begin(self, batch: int, capacity: int) -> None:
        pass

    def observe(self, drafted: int, accepted: dict[int, int], advanced: int,
                seconds: float) -> None:
        pass

    def propose(self, ids: np.ndarray, mask: np.ndarray, k: int, sampling: Any,
                rng: Any) -> Drafts:
        out = self.model.generate_ids([ids[0].tolist()], max_new_tokens=k, eos_token_ids=())
        return Drafts([out[0].tokens], [None])


SAMPLING = {"max_new_tokens": 4, "eos_token_ids": (), "temperature": 1.0, "top_k": 3,
            "repetition_penalty": 1.3}


@pytest.fixture(scope="module")
def plain_samples(graphs: Any) -> Counter[Any]:
    model = graphs["ort"]
    ids = [model.encode("abcabcabc")]
    return Counter(tuple(model.generate_ids(ids, seed=i, **SAMPLING)[0].tokens[1:])
                   for i in range(N_RUNS))


@pytest.mark.parametrize("mode", ["point", "draft"])
def test_sampling_distribution_is_unchanged(graphs: Any, tiny_draft_bundle: Path, mode: str,
                                            plain_samples: Counter[Any]) -> None:
    model = graphs["ort"]
    ids = [model.encode("abcabcabc")]
    samples: Counter[Any] = Counter()
    drafted = accepted = 0
    for i in range(N_RUNS):
        if mode == "point":
            opts = make_options(seed=10_000 + i, speculative="lookup", **SAMPLING)
            gen = SpeculativeGeneration(model.backend, model.tokenizer, ids, opts,
                                        _GreedyPathDrafter(model), opts.speculative)
        else:
            gen = model.start(ids, seed=10_000 + i, speculative=f"draft:{tiny_draft_bundle}",
                              **SAMPLING)
        list(gen)
        samples[tuple(gen.completions[0].tokens[1:])] += 1
        drafted += gen.stats.drafted_tokens
        accepted += gen.stats.accepted_tokens
    assert drafted > N_RUNS and 0 < accepted < drafted  # drafts were verified: kept and not
    stat, df = _homogeneity(plain_samples, samples)
    assert df >= 5
    assert stat < _chi2_critical(df), (stat, df, samples)


# ---- KV cache rollback --------------------------------------------------------------------------
@pytest.mark.parametrize("graph", ["ort", "standard"])
def test_truncate_then_continue_equals_never_having_run(graphs: Any, graph: str) -> None:
    backend = graphs[graph].backend
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, 9).tolist(), rng.integers(0, 256, 4).tolist()]
    ids, mask = left_pad(prompts, 258)
    extra, other = rng.integers(0, 256, (2, 5)), rng.integers(0, 256, (2, 3))
    rolled, fresh = backend.new_cache(2, 32), backend.new_cache(2, 32)
    for cache in (rolled, fresh):
        backend.forward(ids, positions_from_mask(mask, 9), mask, cache)
    m5 = np.concatenate([mask, np.ones((2, 5), np.int64)], axis=1)
    backend.forward(extra, positions_from_mask(m5, 5), m5, rolled)  # rejected drafts
    backend.truncate(rolled, 11)  # keep 2 of the 5
    m2 = np.concatenate([mask, np.ones((2, 2), np.int64)], axis=1)
    backend.forward(extra[:, :2], positions_from_mask(m2, 2), m2, fresh)
    m3 = np.concatenate([m2, np.ones((2, 3), np.int64)], axis=1)
    want = backend.forward_tail(other, positions_from_mask(m3, 3), m3, fresh, 3)
    got = backend.forward_tail(other, positions_from_mask(m3, 3), m3, rolled, 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert rolled.length == fresh.length == 14
    backend.truncate(rolled, 0)  # back to empty: the next forward is a fresh prefill
    again = backend.forward(ids, positions_from_mask(mask, 9), mask, rolled)
    np.testing.assert_allclose(again, backend.forward(ids, positions_from_mask(mask, 9), mask,
                                                      backend.new_cache(2, 32)), atol=1e-6)
    with pytest.raises(InputError, match="cannot truncate a cache of 9 positions to 10"):
        backend.truncate(rolled, 10)


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_generate_and_bench_with_speculation(tiny_tail_bundle: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from llama_export.runtime.cli import main

    args = ["generate", str(tiny_tail_bundle), "--prompt", "abcabcabc", "--max-new-tokens", "24"]
    main(args)
    plain = capsys.readouterr().out
    main([*args, "--speculative", "lookup", "--draft-tokens", "3"])
    assert capsys.readouterr().out == plain
    main(["bench", str(tiny_tail_bundle), "--prompt-len", "16", "--gen-len", "24", "--runs", "1",
          "--speculative", "lookup"])
    out = capsys.readouterr()
    header, plain_row, spec_row = out.out.splitlines()[:3]
    assert "accept" in header and "tok/fwd" in header
    assert plain_row.split()[0] == "ours:ort" and plain_row.split()[5:7] == ["-", "-"]
    assert spec_row.split()[0] == "ours:ort+lookup" and spec_row.split()[5].endswith("%")
    assert "acceptance" in out.err and "tokens/forward" in out.err
    cost_line = out.out.splitlines()[-1]  # what the planner learned: T=1 is the unit
    assert cost_line.startswith("verification cost here, in plain steps") and "T=1 1.00" in cost_line
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(tiny_tail_bundle), "--tasks", "grounded", "--speculative", "lookup"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task code-rename (") and "exceeds the bundle's context 128" in err
    assert err.count("\n") == 1


# ---- the --logits tail:N export mode -------------------------------------------------------------
def test_tail_window_export_and_chunked_calibration_logits(tiny_tail_bundle: Path,
                                                           tiny_bundle: Path) -> None:
    """A tail:6 bundle records its mode, returns min(seq, 6) positions, and calibration's
    accuracy pass (chunks of 6 over the graph's own cache) gets the same logits as one prefill
    of a logits=all bundle of the same weights (tolerance 1e-4 max-abs, fp32)."""
    import onnx

    from llama_export.calibration.accuracy import segment_logits
    from llama_export.runtime.manifest import Manifest

    m = Manifest.load(tiny_tail_bundle)
    assert m.variant("fp32")["logits"] == "tail:6"
    assert m.outputs("fp32")[0].dims == ("batch", "tail", m.vocab_size)
    with load_bundle(tiny_tail_bundle) as model:
        cache = model.backend.new_cache(1, 64)
        assert model.backend.tail_limit(20) == 6
        out = model.backend.forward_tail(np.arange(20)[None], np.arange(20)[None], None, cache, 6)
        assert out.shape == (1, 6, m.vocab_size)
    segments = np.random.default_rng(0).integers(0, 256, (2, 17))
    got = segment_logits(onnx.load(str(tiny_tail_bundle / "model.onnx")), m, segments)
    want = segment_logits(onnx.load(str(tiny_bundle / "model.onnx")), Manifest.load(tiny_bundle),
                          segments)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (17, m.vocab_size)
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_seeded_sampling_with_lookup_does_not_depend_on_measured_costs(graphs: Any) -> None:
    """Sampled text plans drafts with the prior cost only: timings a greedy generation taught
    the model (here: a machine where a long verification is dear, which does change how a
    greedy generation drafts) leave a seeded sampled text as it was."""
    model = graphs["ort"]
    ids = [model.encode("abcab" * 6)]
    sampled = {**SAMPLING, "max_new_tokens": 40, "speculative": "lookup", "seed": 7}
    greedy = {"max_new_tokens": 40, "eos_token_ids": (), "speculative": "lookup"}
    saved = model._verify_cost
    try:
        model._verify_cost = VerifyCost()
        before = model.generate_ids(ids, **sampled)[0].tokens
        model._verify_cost = VerifyCost()
        model.generate_ids(ids, **greedy)
        drafted = model.last_generation.stats.drafted_tokens
        for t in range(1, 17):
            model._verify_cost.observe(1, t, 0.001 * t * t)
        model.generate_ids(ids, **greedy)
        assert model.last_generation.stats.drafted_tokens < drafted
        assert model.generate_ids(ids, **sampled)[0].tokens == before
    finally:
        model._verify_cost = saved
