"""Model FLOPs utilisation, measured against this machine's own matmul throughput.

The peak is robust to a busy machine: each measurement is the best of several short windows, and the
best ever measured on this machine (same host, device, dtype, thread count and torch) is cached in
`$ZOO_CACHE/peak_flops.json`, so a measurement taken while other jobs share the cores cannot lower it.
When the throughput measured now is well below the cached best, the machine is busy: `last_peak()` says
so and a warning is logged. MFU is never reported above 100%: a higher value means the peak was
measured in a busier window than the training ran in; it is clamped to 1 and a warning says so.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
WINDOWS = 5  # short windows per measurement; the best counts (a busy moment lowers some, never raises one)
BUSY_BELOW = 0.7  # throughput now under this fraction of the machine's best: the machine is busy


@dataclass
class PeakMeasurement:
    """One call of measure_matmul_flops: the peak it returned, what it measured now, and whether that was low."""

    peak: float  # FLOP/s: the best of the windows now and of the cache
    measured: float  # FLOP/s: the best window of this call
    cached: float  # FLOP/s: the machine's best before this call (0: none)
    busy: bool  # measured < BUSY_BELOW * cached
    key: str


_LAST: PeakMeasurement | None = None


def peak_cache_path() -> Path:
    """`$ZOO_CACHE/peak_flops.json`, else `~/.cache/zoo/peak_flops.json`."""
    return Path(os.environ.get("ZOO_CACHE", "~/.cache/zoo")).expanduser() / "peak_flops.json"


def machine_key(device: torch.device) -> str:
    """What the peak depends on: host, device (its name on CUDA), dtype of the probe, threads, torch version."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    dtype = "bf16" if device.type == "cuda" else "fp32"
    return f"{platform.node()}|{device.type}:{name}|{dtype}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _window_flops(device: torch.device, seconds: float) -> float:
    """FLOP/s of square matmuls on `device` over one window of about `seconds` (fp32 on CPU, bf16 on CUDA)."""
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


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    """Atomically (temp file + rename): two trainers starting together never leave a torn file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: the peak is still measured, only not remembered
        log.debug("could not cache the matmul peak in %s: %s", path, e)


def measure_matmul_flops(device: torch.device, seconds: float = 0.5, cache: bool = True) -> float:
    """This machine's peak FLOP/s: the best of WINDOWS windows (`seconds` in all) and of the cached best.

    With cache=False only this call's windows count and nothing is read or written.
    """
    global _LAST
    device = torch.device(device)
    measured = max(_window_flops(device, seconds / WINDOWS) for _ in range(WINDOWS))
    key, path = machine_key(device), peak_cache_path()
    data = _read_cache(path) if cache else {}
    cached = data.get(key) if isinstance(data.get(key), (int, float)) else 0.0
    peak = max(measured, cached)
    if cache and measured > cached:
        _write_cache(path, {**_read_cache(path), key: measured})
    busy = bool(cached) and measured < BUSY_BELOW * cached
    _LAST = PeakMeasurement(peak=peak, measured=measured, cached=cached, busy=busy, key=key)
    if busy:
        log.warning("the machine is busy: matmul throughput now is %.0f%% of its best (%.1f GFLOP/s of %.1f, "
                    "cached in %s); MFU uses the best", 100 * measured / cached, measured / 1e9, cached / 1e9, path)
    return peak


def last_peak() -> PeakMeasurement | None:
    """What the last measure_matmul_flops call found (busy or not), or None before the first."""
    return _LAST


def mfu(tokens_per_second: float, forward_flops_per_token: float, peak_flops: float) -> float:
    """Fraction of peak used by training: forward + backward = 3x the forward FLOPs; never above 1.

    Above 1 the peak was measured in a busier window than the training ran in (or on other threads): the
    value is clamped to 1 and a warning gives the unclamped one.
    """
    value = 3 * forward_flops_per_token * tokens_per_second / peak_flops
    if value > 1:
        log.warning("MFU %.1f%% is above 100%%: the matmul peak (%.1f GFLOP/s) was measured while the machine "
                    "was busier than during training; reported as 100%%", 100 * value, peak_flops / 1e9)
        return 1.0
    return value
