"""Accuracy gates per genre of held-out text (issue #10, item 3).

A W8A8 graph measured top-1 0.956 on one genre and 0.890 on another: the built-in held-out text
is now four genres (prose, dialogue, code, technical), each gated on its own and recorded; the
built-in calibration text mixes the same genres and is sampled over its whole length.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from llama_export.calibration.accuracy import Accuracy, Gate, GenreAccuracy
from llama_export.calibration.data import HELDOUT_GENRES, builtin_text, token_segments
from llama_export.calibration.pipeline import (
    CalibrateOptions,
    EvalOptions,
    QuantizeOptions,
    calibrate,
    quantize,
)
from llama_export.runtime.errors import CalibrationError
from llama_export.runtime.tokenizer import Tokenizer

LOOSE = Gate(max_ppl_increase=1.0, min_top1=0.0)


def test_each_genre_is_gated_on_its_own() -> None:
    good = Accuracy(10.0, 10.1, 0.95, 0.01, 500)
    bad = Accuracy(10.0, 10.2, 0.89, 0.02, 500)
    acc = GenreAccuracy({"prose": good, "code": bad})
    assert acc.pooled.top1_agreement == pytest.approx(0.92)  # would pass a pooled gate
    assert acc.pooled.ppl == pytest.approx(np.sqrt(10.1 * 10.2))
    assert Gate().failures(acc) == ["code: top-1 agreement 89.0% is below 90.0%"]
    d = acc.to_dict()
    assert d["genres"]["code"]["top1_agreement"] == 0.89 and d["tokens"] == 1000
    assert "code +2.00% / 89.0%" in acc.line()


def test_segments_cover_the_whole_mixed_text(tiny_bundle: Path) -> None:
    from llama_export.runtime.manifest import Manifest

    tok = Tokenizer.from_bundle(tiny_bundle, Manifest.load(tiny_bundle).tokenizer)
    text = builtin_text()
    ids = tok.encode(text.text, add_special_tokens=False)
    segs = token_segments(text, tok, samples=4, seq_len=64)
    assert segs.shape == (4, 64)
    assert list(segs[0]) == ids[:64]
    last = (len(ids) // 64 - 1) * 64
    assert list(segs[-1]) == ids[last:last + 64]  # the code / how-to end of the text is in
    for genre_marker in ("User:", "def ", "Assistant:"):
        assert genre_marker in text.text


@pytest.fixture(scope="module")
def genre_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("genres") / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def test_calibrate_and_quantize_record_every_genre(genre_bundle: Path) -> None:
    ev = EvalOptions(samples=2, seq_len=32, gate=LOOSE)
    int8 = calibrate(genre_bundle, CalibrateOptions(samples=4, seq_len=32, decode_steps=4,
                                                    keep_float=0, eval=ev))
    int4 = quantize(genre_bundle, QuantizeOptions(bits=4, eval=ev))
    for acc in (int8["accuracy"], int8["ort_graph"]["accuracy"], int4["accuracy"],
                int4["ort_graph"]["accuracy"]):
        assert set(acc["genres"]) == set(HELDOUT_GENRES)
        assert all(g["tokens"] == 2 * 31 for g in acc["genres"].values())
        assert acc["tokens"] == 4 * 2 * 31


def test_gate_refusal_names_the_genre(genre_bundle: Path) -> None:
    """A gate no genre can pass: the refusal lists each genre, and nothing is written."""
    before = sorted(p.name for p in genre_bundle.iterdir())
    ev = EvalOptions(samples=2, seq_len=32, gate=Gate(max_ppl_increase=1.0, min_top1=1.01))
    with pytest.raises(CalibrationError) as e:
        quantize(genre_bundle, QuantizeOptions(bits=4, eval=ev))
    msg = str(e.value)
    assert "\n" not in msg
    for genre in HELDOUT_GENRES:
        assert f"{genre}: top-1 agreement" in msg
    assert sorted(p.name for p in genre_bundle.iterdir()) == before
