"""Which GPU is here (thin): CUDA via cuda-python first, ``nvidia-smi`` second, else None.

The builder does not need cuda-python (TensorRT manages its own CUDA context), so a machine with
the driver and ``tensorrt`` but without cuda-python still builds; ``nvidia-smi`` names the GPU.
"""

from __future__ import annotations

import shutil
import subprocess

from llama_export.runtime.backends.trt import cuda_gpu
from llama_export.runtime.engines import GpuInfo, parse_compute_capability


def detect_gpu(device: int = 0) -> GpuInfo | None:
    return cuda_gpu(device) or nvidia_smi_gpu(device)


def nvidia_smi_gpu(device: int = 0) -> GpuInfo | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--id={device}", "--query-gpu=name,compute_cap,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> GpuInfo | None:
    """``NVIDIA GeForce RTX 4090, 8.9, 24564`` (MiB) → GpuInfo; None for anything else."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    parts = [p.strip() for p in line.rsplit(",", 2)]
    if len(parts) != 3:
        return None
    try:
        cc = parse_compute_capability(parts[1])
        memory = int(float(parts[2])) * 2**20
    except ValueError:  # "[N/A]" on some Jetson / MIG setups
        return None
    return GpuInfo(parts[0], cc, memory)
