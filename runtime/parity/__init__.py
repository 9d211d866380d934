"""Parity on the target, without torch (DESIGN.md §6c).

    export (torch) ──► BUNDLE/references.npz: token ids, the original's top-k logits per
                       position, its greedy continuations, held-out log-probs (sha256 in manifest)
    target (no torch) ──► any Backend (ORT cpu/cuda/tensorrt, TensorRT engine) fed the same ids
                       ──► metrics per (variant, graph/engine, backend) row ──► pass/fail, report

:mod:`.references` is the file format, :mod:`.compare` runs one backend over the references
and scores it, :mod:`.tolerances` holds the per-precision defaults, :mod:`.run` picks variants
and backends, :mod:`.report` writes report.md and plots, :mod:`.commands` is the CLI.
"""
