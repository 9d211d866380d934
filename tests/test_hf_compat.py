"""transformers 4.57 .. 5.x through exporter/hf_compat.py (issue #10).

The suite runs under the newest transformers; `.ci/transformers-matrix` runs the export and
verification under 4.57 in a separate environment.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from llama_export.runtime.errors import MissingDependencyError


def test_too_old_transformers_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                     tiny_source: Path, tmp_path: Path) -> None:
    import transformers

    from llama_export.exporter.export import export_bundle

    monkeypatch.setattr(transformers, "__version__", "4.45.2")
    with pytest.raises(MissingDependencyError) as e:
        export_bundle(tiny_source, tmp_path / "b", progress=lambda _: None)
    assert str(e.value) == ("transformers 4.45.2 is too old (llama-export supports 4.57 and "
                            "newer) needs the 'export' extra: pip install 'llama-export[export]'")
    assert not (tmp_path / "b").exists()


def test_forward_cached_continues_the_cache(tiny_source: Path) -> None:
    """Greedy steps through one DynamicCache equal full recomputation, with no deprecated
    keyword (transformers 5 warns about ``past_key_values=``, removed in 5.40)."""
    import torch

    from llama_export.exporter.hf_compat import forward_cached, new_cache
    from llama_export.exporter.reference import load_reference

    ref = load_reference(tiny_source)
    seq = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        cache = new_cache(ref)
        logits = forward_cached(ref, seq, cache)
        for _ in range(3):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = forward_cached(ref, nxt, cache)
            full = ref(input_ids=seq, use_cache=False).logits
            torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    assert not [str(w.message) for w in caught if "deprecated" in str(w.message)]


def test_bench_torch_baseline_uses_no_deprecated_api(tiny_bundle: Path) -> None:
    from llama_export.runtime import load_bundle
    from llama_export.runtime.bench import (
        BenchOptions,
        reference_source,
        synthetic_prompt,
        torch_runner,
    )

    with load_bundle(tiny_bundle, verify=False) as m:
        prompt, source = synthetic_prompt(m, 8), reference_source(m)
    run = torch_runner(source, prompt, BenchOptions(prompt_len=8, gen_len=4, runs=1), threads=1,
                       progress=lambda _: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    assert not [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0
