"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights, on numpy arrays.

For a group of projections reading ``X`` (``…, K``) with weights ``W_j`` (``K, N_j``)::

    s_k = max|X_k|**alpha / max_j max|W_j[k, :]|**(1 - alpha)
    X W_j = (X / s) (s W_j)          # exact in real arithmetic

``1/s`` is folded into whatever produces ``X`` (the RMSNorm weight, or the columns and bias of
``up_proj`` for ``down_proj``'s input) and ``s`` into the rows of every ``W_j``, so the float
graph computes the same function while ``X / s`` has far smaller per-channel outliers.
``alpha`` is searched per group ("auto") by the W8A8 output error on calibration rows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .collect import TensorStats
from .graph import GraphIndex, Group, fresh_name, set_initializer
from .quant import Method, activation_amax, matmul_error

AUTO_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
SEARCH_ROWS = 512
_TINY = 1e-5

Slot = tuple[str, int]  # (node name, input index): where an edited constant is consumed


class Tensors:
    """Edited copies of the constants consumed at given node inputs; originals untouched."""

    def __init__(self, model: onnx.ModelProto, source: GraphIndex | None = None,
                 lent: frozenset[str] = frozenset(), base_dir: Path | None = None) -> None:
        self.idx = GraphIndex(model, base_dir)  # base_dir: external data read from there
        self.edits: dict[Slot, np.ndarray] = {}
        self.source, self.lent = source, lent  # initializers held (with data) only by source

    def get(self, slot: Slot) -> np.ndarray:
        if slot in self.edits:
            return self.edits[slot]
        name = self.idx.const_name(self.idx.nodes[slot[0]].input[slot[1]])
        assert name is not None, slot  # slots come from graph.py, which checked constness
        if name in self.lent and self.source is not None:
            return self.source.array(name)
        return self.idx.array(name)

    def set(self, slot: Slot, value: np.ndarray) -> None:
        self.edits[slot] = value.astype(np.float32)

    def apply(self, model: onnx.ModelProto, suffix: str = ".smoothed") -> None:
        """Write every edit as a fresh initializer wired to its slot only (shared ones stay)."""
        for slot in list(self.edits):
            (node_name, i), arr = slot, self.edits.pop(slot)  # freed as soon as it is written
            node = self.idx.nodes[node_name]
            base = self.idx.const_name(node.input[i]) or node.input[i]
            name = fresh_name(model, base + suffix)
            set_initializer(model, name, arr)
            node.input[i] = name
            del arr


@dataclass
class GroupPlan:
    group: Group
    alpha: float | None   # None: not smoothed
    act_amax: float       # per-tensor range of the (smoothed) input
    error: float          # relative W8A8 output error on calibration rows
    abs_error: float      # its RMS absolute size: the sensitivity ranking (what the residual sees)
    smooth: np.ndarray | None = None  # the factors s (the quantized input is X / s)
    clip_ratio: float = 1.0  # unseen-text max |X / s| over act_amax (> 1: would be clipped)


def weight_slot(node: str) -> Slot:
    return (node, 1)


def fold_slots(idx: GraphIndex, group: Group) -> tuple[Slot, Slot | None]:
    """Where ``1/s`` goes: the norm weight input of the Mul, or the producer weight (+bias)."""
    f = group.fold
    assert f is not None
    node = idx.nodes[f.node]
    if f.kind == "norm":
        i = 0 if idx.const_name(node.input[0]) == f.tensor and idx.is_float_const(
            node.input[0], 1) else 1
        return (f.node, i), None
    bias: Slot | None = None
    if f.bias_node is not None:
        b = idx.nodes[f.bias_node]
        bias = (f.bias_node, 0 if idx.const_name(b.input[0]) == f.bias else 1)
    return (f.node, 1), bias


def weight_channel_amax(weights: list[np.ndarray]) -> np.ndarray:
    """max |W| per input channel (row K) over the group's weights."""
    out: np.ndarray = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    return out


def smoothing_factors(act_cmax: np.ndarray, weights: list[np.ndarray], alpha: float,
                      w_cmax: np.ndarray | None = None) -> np.ndarray:
    """``w_cmax``: :func:`weight_channel_amax` of ``weights`` when already known."""
    if w_cmax is None:
        w_cmax = weight_channel_amax(weights)
    s = np.power(np.maximum(act_cmax, _TINY), alpha) / np.power(np.maximum(w_cmax, _TINY),
                                                                 1 - alpha)
    out: np.ndarray = np.clip(s, _TINY, None).astype(np.float32)
    return out


def plan_smoothing(model: onnx.ModelProto, groups: list[Group], stats: dict[str, TensorStats],
                   *, method: Method, alpha: float | str | None,
                   percentile: float = 99.99, release_rows: bool = False,
                   base_dir: Path | None = None) -> tuple[list[GroupPlan], Tensors]:
    """Choose alpha per group, fold the factors into ``Tensors`` edits; return the plans.

    ``alpha``: a float in [0, 1], "auto" (search :data:`AUTO_ALPHAS` and no smoothing), or None.
    Groups whose input comes from a producer projection (down_proj) go first: their fold edits
    ``up_proj``'s weight, which the gate/up group then reads. ``release_rows``: drop each
    group's row sample once planned (the edits grow while the samples shrink; Qwen2.5-1.5B's
    samples are 3.1 GB). ``base_dir``: ``model``'s external data is read from there.
    """
    t = Tensors(model, base_dir=base_dir)
    order = sorted(groups, key=lambda g: 0 if g.fold and g.fold.kind == "matmul" else 1)
    plans: dict[str, GroupPlan] = {}
    for n, g in enumerate(order):
        plans[g.input] = _plan_group(t, g, stats[g.input], method, alpha, percentile)
        if release_rows:
            stats[g.input].rows = None
        if (n + 1) % 20 == 0:
            print(f"[calibrate] smoothing: {n + 1}/{len(order)} groups", file=sys.stderr,
                  flush=True)
    return [plans[g.input] for g in groups], t


def _plan_group(t: Tensors, g: Group, st: TensorStats, method: Method,
                alpha: float | str | None, percentile: float) -> GroupPlan:
    assert st.rows is not None
    assert st.channel_amax is not None
    ws = [t.get(weight_slot(p.node)) for p in g.projections]
    sub = st.rows[:: max(1, len(st.rows) // SEARCH_ROWS)]
    if g.fold is None or alpha is None:
        cands: tuple[float | None, ...] = (None,)
    elif alpha == "auto":
        cands = (None, *AUTO_ALPHAS)
    else:
        cands = (float(alpha),)
    best: tuple[float, float, float | None] = (np.inf, np.inf, None)
    w_cmax = weight_channel_amax(ws)  # the same for every candidate
    for a in cands:
        s = np.ones_like(st.channel_amax) if a is None else smoothing_factors(
            st.channel_amax, ws, a, w_cmax)
        xs = sub / s
        rel, ab = matmul_error(xs, [w * s[:, None] for w in ws],
                               activation_amax(xs, method, percentile))
        if rel < best[0]:
            best = (rel, ab, a)
    err, abs_err, a = best
    if a is None:
        return GroupPlan(g, None, activation_amax(st.rows, method, percentile), err, abs_err)
    s = smoothing_factors(st.channel_amax, ws, a, w_cmax)
    for p, w in zip(g.projections, ws, strict=True):
        t.set(weight_slot(p.node), w * s[:, None])
    fold, bias = fold_slots(t.idx, g)
    prod = t.get(fold)
    t.set(fold, prod / s if prod.ndim == 1 else prod / s[None, :])
    if bias is not None:
        t.set(bias, t.get(bias) / s)
    return GroupPlan(g, a, activation_amax(st.rows / s, method, percentile), err, abs_err, s)
