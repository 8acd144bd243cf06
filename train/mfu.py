"""Model FLOPs utilisation, measured against this machine's own matmul throughput."""

from __future__ import annotations

import time

import torch


def measure_matmul_flops(device: torch.device, seconds: float = 0.5) -> float:
    """Sustained FLOP/s of square matmuls on `device` (fp32 on CPU, bf16 on CUDA)."""
    n, dtype = (4096, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n**3 * done / (time.perf_counter() - start)


def mfu(tokens_per_second: float, forward_flops_per_token: float, peak_flops: float) -> float:
    """Fraction of peak used by training: forward + backward = 3x the forward FLOPs."""
    return 3 * forward_flops_per_token * tokens_per_second / peak_flops
