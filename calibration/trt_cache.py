"""Legacy TensorRT-10 INT8 calibration cache (text format), for implicit-INT8 builds on JetPack 6.

Format (what ``IInt8EntropyCalibrator2`` writes and ``readCalibrationCache`` accepts)::

    TRT-<NV_TENSORRT_VERSION>-EntropyCalibration2
    <tensor name>: <scale as big-endian IEEE float32, 8 hex digits>

with ``scale = amax / 127``. Names are the ONNX graph's tensor names. TensorRT 11 dropped
implicit INT8: the Q/DQ variant (``model.int8.onnx``) is the way forward; this is a bridge.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

from llama_export.runtime.errors import CalibrationError

DEFAULT_TRT_VERSION = 100300  # TensorRT 10.3 (JetPack 6.1/6.2): MAJOR*10000 + MINOR*100 + PATCH
ALGORITHM = "EntropyCalibration2"


def scale_to_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    return float(struct.unpack(">f", bytes.fromhex(text))[0])


def format_cache(amax: Mapping[str, float], trt_version: int = DEFAULT_TRT_VERSION) -> str:
    lines = [f"TRT-{trt_version}-{ALGORITHM}"]
    lines += [f"{name}: {scale_to_hex(a / 127.0)}" for name, a in amax.items()]
    return "\n".join(lines) + "\n"


def parse_cache(text: str) -> tuple[int, dict[str, float]]:
    """``(trt_version, {tensor: scale})``; raises CalibrationError on a malformed cache."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = lines[0].split("-") if lines else []
    if len(head) != 3 or head[0] != "TRT" or not head[1].isdigit():
        raise CalibrationError("not a TensorRT calibration cache (no 'TRT-<version>-<algo>' "
                               "header): regenerate it with `llama-export calibrate`")
    scales: dict[str, float] = {}
    for n, ln in enumerate(lines[1:], 2):
        name, sep, value = ln.rpartition(": ")
        try:
            scales[name] = hex_to_scale(value.strip())
        except (ValueError, struct.error):
            raise CalibrationError(f"calibration cache line {n} is malformed ({ln!r}): "
                                   "regenerate it with `llama-export calibrate`") from None
        if not sep:
            raise CalibrationError(f"calibration cache line {n} has no 'name: hex' pair")
    return int(head[1]), scales


def read_cache(path: Path) -> tuple[int, dict[str, float]]:
    return parse_cache(path.read_text(encoding="utf-8"))
