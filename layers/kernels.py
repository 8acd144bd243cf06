"""The one place that decides which fast kernel runs.

Every fast path (flash-attn, megablocks) has a pure-PyTorch reference with the same semantics.
Set ZOO_FORCE_REFERENCE=1 to run the reference everywhere (parity tests, debugging).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import cache

import torch

FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)


def force_reference() -> bool:
    """True when ZOO_FORCE_REFERENCE asks for the pure-PyTorch path everywhere."""
    return os.environ.get("ZOO_FORCE_REFERENCE", "").lower() in ("1", "true", "yes")


@cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def flash_attn_installed() -> bool:
    """True when the flash-attn package can be imported."""
    return _installed("flash_attn")


def megablocks_installed() -> bool:
    """True when megablocks and grouped_gemm (which its dropless MoE needs) can be imported."""
    return _installed("megablocks") and _installed("grouped_gemm")


def can_use_flash_attn(q: torch.Tensor, *, dropout: float = 0.0) -> bool:
    """Can flash-attn run on this (batch, heads, seq, head_dim) query?"""
    return (
        not force_reference()
        and q.is_cuda
        and q.dtype in FLASH_ATTN_DTYPES
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
        and dropout == 0.0
        and flash_attn_installed()
    )


def can_use_megablocks(x: torch.Tensor) -> bool:
    """Can megablocks' kernels run on this tensor?"""
    return not force_reference() and x.is_cuda and megablocks_installed()


HAS_GROUPED_MM = hasattr(torch.nn.functional, "grouped_mm")
MOE_IMPLS = ("auto", "padded", "tiered", "grouped", "fused", "megablocks")
# Below this many routed rows (decoding: batch x k), "auto" on CPU takes grouped_mm: tiered's per-tier weight
# copies cost more than the matmuls there (dense_vs_llama.py profile: 19.6 vs 10.5 ms/token at batch 8).
CPU_GROUPED_MAX_ROWS = 256


def can_use_grouped_mm(x: torch.Tensor, *row_widths: int) -> bool:
    """Can torch's grouped_mm run on rows of x with these widths (16-byte aligned; on CUDA bf16 on sm80+)?"""
    ok = HAS_GROUPED_MM and all(n * x.element_size() % 16 == 0 for n in row_widths)
    if x.is_cuda:
        ok = ok and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return ok


def moe_experts_layout(x: torch.Tensor, impl: str, d_model: int, width: int, capacity: int | None,
                       rows: int | None = None) -> str:
    """How the routed experts run on x: "megablocks", or a dispatch layout "padded", "tiered" or "grouped".

    `impl` "auto" takes megablocks' kernels on CUDA half precision when installed (and dropless), torch's
    grouped_mm on other CUDA tensors it supports and on CPU for few routed `rows` (decoding), "fused" (one
    expert at a time, its rows kept in cache from the gather to the weighted sum; layers/moe/experts.py) on
    CPU at training sizes, where it beats tiered bmm and grouped_mm (BENCHMARKS.md, issue 18), else "tiered".
    An explicit impl that cannot run here is a RuntimeError.
    """
    if impl not in MOE_IMPLS:
        raise ValueError(f"unknown experts impl {impl!r}; known: {MOE_IMPLS}")
    grouped_ok = can_use_grouped_mm(x, d_model, width)
    if impl == "grouped" and not grouped_ok or impl == "megablocks" and not x.is_cuda:
        raise RuntimeError(f"impl={impl!r} cannot run here: grouped needs torch.nn.functional.grouped_mm "
                           f"and 16-byte-aligned rows; megablocks needs CUDA")
    if impl != "auto":
        return impl
    if capacity is None and x.dtype in (torch.bfloat16, torch.float16) and can_use_megablocks(x):
        return "megablocks"
    if grouped_ok and (x.is_cuda or (rows is not None and rows <= CPU_GROUPED_MAX_ROWS and capacity is None)):
        return "grouped"
    return "tiered" if x.is_cuda else "fused"


# Below this many rows per busy expert the fused CPU MoE path runs its experts on one thread with every op
# multi-threaded: tiny ops on two Python threads queue for the GIL. At (64, 8, 256), forward only: 8 rows per
# expert (64 tokens) took 18 ms split against 14 ms not; at 32 (256 tokens) the two were even (31 / 30 ms); at 64
# (512 tokens) the split was faster (31 against 38 ms).
CPU_SPLIT_MIN_ROWS = 32


def cpu_expert_workers(x: torch.Tensor, busy_experts: int, rows: int) -> int:
    """Threads the fused CPU MoE path splits its experts over: torch's intra-op threads (at most one per expert
    with rows), each thread then running its experts' GEMMs and elementwise passes on one core.

    At (64, 8, 256) on 2 cores this cut a forward + backward's CPU time by 13-18% and its wall time by 7-13%
    against every op using both threads (OpenMP's fork / join and spinning around ~30 small ops per expert):
    BENCHMARKS.md, issue 18 item 4. 1 (no split) off CPU, with one thread, or below CPU_SPLIT_MIN_ROWS rows
    per busy expert.
    """
    if x.device.type != "cpu" or busy_experts == 0 or rows < CPU_SPLIT_MIN_ROWS * busy_experts:
        return 1
    return min(torch.get_num_threads(), busy_experts)


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid that made it, workers, pool): a fork gets a fresh one
_POOL_LOCK = threading.Lock()
_SPLIT_LOCK = threading.Lock()  # set_num_threads also sets the count new threads start with: one split at a time


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
            _POOL = (os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zoo-experts"))
        return _POOL[2]


def run_split(work: Callable[[object], None], parts: Sequence[object]) -> None:
    """work(part) for every part at the same time, each on its own thread with one intra-op thread.

    The calling thread runs parts[0]. The helper threads get its grad and inference modes (not autocast or
    dispatch modes: the fused MoE path calls this with autocast off). torch's intra-op thread count is 1 for
    the duration, on every thread, and the caller's count is restored after. Every part finishes before the
    first exception, if any, is raised (a Ctrl-C while waiting too: the helpers write into shared buffers).
    Not reentrant: `work` must not call run_split (cpu_expert_workers is 1 inside a split, so the MoE path
    never does).
    """
    if len(parts) <= 1:
        for part in parts:
            work(part)
        return
    pool = _pool(len(parts) - 1)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def task(part):
        torch.set_num_threads(1)  # this thread's own OpenMP / MKL count: a thread keeps the count it first used
        with torch.inference_mode() if inference else contextlib.nullcontext(), torch.set_grad_enabled(grad):
            work(part)

    errors: list[BaseException] = []
    futures: list[Future] = []
    with _SPLIT_LOCK:
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            futures.extend(pool.submit(task, part) for part in parts[1:])
            try:
                work(parts[0])
            except BaseException as e:  # noqa: BLE001  (re-raised below, once the helpers are done)
                errors.append(e)
            while True:
                try:
                    wait(futures)
                    break
                except BaseException as e:  # noqa: BLE001  (e.g. Ctrl-C: still wait for the helpers)
                    errors.append(e)
            errors.extend(e for e in (f.exception() for f in futures) if e is not None)
        finally:
            torch.set_num_threads(threads)
    if errors:
        raise errors[0]


def local_attention_path(q: torch.Tensor, key_padding_mask: torch.Tensor | None) -> str:
    """How `local` attention runs without flash-attn: "sdpa-blocks" (torch's fused SDPA on each query block and
    its key window, one shared mask; 1.5-2x faster than the reference on CPU and no scores in memory,
    BENCHMARKS.md issue 18) unless there is a key padding mask or ZOO_FORCE_REFERENCE, then "reference"."""
    return "reference" if force_reference() or key_padding_mask is not None else "sdpa-blocks"


# Query block of the sdpa-blocks path: smaller blocks compute fewer masked scores (span = block + window - 1),
# larger ones make fewer, larger products. At window 256 on CPU (one thread) 32 was fastest without autograd
# and 128 with it (the backward of the overlapping key windows favours fewer blocks): benchmarks/local_vs_flex.py.
LOCAL_SDPA_BLOCK = {"inference": 32, "training": 128}


def local_attention_block(window: int, training: bool = False) -> int:
    """The query block of `local` attention for this window, with or without autograd."""
    return min(window, LOCAL_SDPA_BLOCK["training" if training else "inference"])


def describe() -> dict[str, bool]:
    """Which fast kernels this process could use (for `zoo info` and logs)."""
    return {
        "cuda": torch.cuda.is_available(),
        "flash_attn_installed": flash_attn_installed(),
        "megablocks_installed": megablocks_installed(),
        "force_reference": force_reference(),
    }
