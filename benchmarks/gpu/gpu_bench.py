"""The GPU check of issue 13, ready for the day a CUDA machine is lent: one run, four parts, one report.

Parts (`--part`, run one by one by benchmarks/gpu/run.sh, each under its own timeout):
  env    the device, torch / CUDA / transformers versions, which Python dependencies are missing,
         which fast kernels could run (layers.kernels), whether SDPA's flash backend runs here.
  tests  the CUDA parity tests: `pytest -m gpu` over the test files that carry the gpu marker;
         per test: passed / skipped (with the reason, e.g. flash-attn or megablocks not installed) / failed.
  train  training tokens/s of lm-dense-small, moe-small and lm-local-small (zoo.load, random tokens):
         forward + backward + gradient clipping + fused AdamW step, after warm-up steps, timed between
         torch.cuda.synchronize() calls, median of rounds. Two precisions: "amp-bf16" (fp32 weights,
         bf16 autocast: what train/trainer.py does on CUDA) and "bf16" (bf16 weights and optimizer state).
         SDPA is restricted to its flash backend (it falls back, and says so, if flash refuses the inputs).
         The MoE expert path each model took (layers/moe/experts.py `last_impl`: grouped / tiered /
         megablocks) is recorded. MFU = 3 x model.cost(seq_len)["flops_per_token"] x tokens/s / peak,
         with peak = 989 TFLOP/s (the H100/H200 SXM bf16 dense spec, no 2:4 sparsity) on an H100/H200,
         else (and with --smoke) the measured matmul throughput (train.mfu.measure_matmul_flops);
         MFU against the measured bf16 matmul throughput is reported beside it. MFU above 100% is an error.
  moe    our MoE layer against transformers' MixtralSparseMoeBlock (experts implementation grouped_mm,
         and eager) at the sizes of moe-small's layer and moe-fine-small's routed experts: the block is
         benchmarks/moe_speed.py's make_block, our layer gets its weights and routing through
         zoo.convert.moe_from_transformers (outputs compared); forward + backward in bf16, interleaved
         rounds (the order rotates), median tokens/s and the paired per-round ratio
         zoo-auto / transformers-grouped_mm.
  report merges the parts into one JSON and a markdown table (device, torch, every measurement, the
         command); a part that failed or timed out is listed as such, with what it had saved.

    python benchmarks/gpu/gpu_bench.py                     # every part, then the report (on a CUDA machine)
    python benchmarks/gpu/gpu_bench.py --part train        # one part (run.sh does this per part)
    python benchmarks/gpu/gpu_bench.py --smoke             # every part at toy sizes on the CPU, fp32, seconds

Output: --json PATH (default $OUT/gpu_results.json when $OUT is set, else benchmarks/gpu/results.json;
with --smoke benchmarks/gpu/results_smoke.json), the markdown table beside it (.md) and each part's raw
JSON in PATH's stem + "_parts/".
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, REPO / "benchmarks"):  # the zoo packages, and benchmarks/moe_speed.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

PARTS = ("env", "tests", "train", "moe")
TRAIN_MODELS = ("lm-dense-small", "moe-small", "lm-local-small")
MOE_MODELS = ("moe-small", "moe-fine-small")  # the layer shapes compared with Mixtral's block
MOE_IMPLS = ("transformers-grouped_mm", "transformers-eager", "zoo-auto")
MOE_BASELINE, MOE_OURS = "transformers-grouped_mm", "zoo-auto"
DEPENDENCIES = ("transformers", "safetensors", "huggingface_hub", "yaml", "tqdm", "numpy", "pytest")
# NVIDIA's bf16 dense tensor-core peak of the H100 SXM and H200 (the same GH100 chip and clocks),
# without 2:4 structured sparsity (which doubles the datasheet figure).
H100_H200_BF16_DENSE_FLOPS = 989e12
# Toy sizes for --smoke: the same catalog entries, shrunk by config overrides.
SMOKE_OVERRIDES = {"n_layers": 1, "d_model": 64, "n_heads": 2, "d_ff": 128, "max_seq_len": 64}


@dataclass
class Settings:
    """Sizes and counts of one run (the defaults are the GPU run's; --smoke shrinks them)."""

    device: str
    smoke: bool
    train_models: list[str]
    train_modes: list[str]
    batch_size: int
    seq_len: int
    warmup: int
    steps: int
    rounds: int
    moe_models: list[str]
    moe_impls: list[str]
    moe_tokens: int
    moe_rounds: int
    moe_iters: int
    peak_tflops: float | None
    tests_timeout: int
    overrides: dict = field(default_factory=dict)

    @property
    def moe_dtype(self) -> torch.dtype:
        return torch.float32 if self.smoke else torch.bfloat16


# ---- small helpers -----------------------------------------------------------------------------
def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def error_text(err: BaseException) -> str:
    """One line naming the error, and the innermost frames of its traceback."""
    frames = traceback.format_exception(type(err), err, err.__traceback__)
    return f"{type(err).__name__}: {str(err).strip()[:600]}\n" + "".join(frames[-3:])[-1500:]


def finite_or_none(value):
    """JSON has no NaN / inf: such a number becomes null (and the part says what went wrong)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Atomic write (temp file + rename): a part killed by its timeout leaves the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite_or_none(data), indent=2, allow_nan=False))
    os.replace(tmp, path)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Give the last model's GPU memory back before the next one is built."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def module_version(name: str) -> str | None:
    """The module's __version__ ("?" if it has none), or None when it cannot be imported."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return str(getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:  # noqa: BLE001  (a broken install is reported, not raised)
        return None if isinstance(err, ImportError) else f"import fails: {type(err).__name__}: {err}"[:200]


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    else:
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return info


def peak_flops(settings: Settings, device: torch.device, measured: float) -> tuple[float, str]:
    """The peak MFU is computed against, and where that number comes from."""
    if settings.peak_tflops:
        return settings.peak_tflops * 1e12, f"--peak-tflops {settings.peak_tflops:g}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if any(chip in name for chip in ("H100", "H200")):
            return H100_H200_BF16_DENSE_FLOPS, f"{name}: bf16 dense tensor-core spec, 989 TFLOP/s (no 2:4 sparsity)"
    return measured, "measured matmul throughput (train.mfu.measure_matmul_flops)"


# ---- part env ----------------------------------------------------------------------------------
def sdpa_flash_check(device: torch.device) -> str:
    """'ok', or why SDPA's flash backend does not run a small causal bf16 (fp32 on CPU) attention here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 4, 128, 64, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return "ok"
    except RuntimeError as err:
        return f"refused: {str(err).strip().splitlines()[0][:300]}"


def nvidia_smi() -> str | None:
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def part_env(settings: Settings, save) -> dict:
    device = torch.device(settings.device)
    deps = {name: module_version(name) for name in DEPENDENCIES}
    result = {**device_info(device), "nvidia_smi": nvidia_smi(), "dependencies": deps,
              "missing": [name for name, version in deps.items() if version is None],
              "grouped_mm": hasattr(torch.nn.functional, "grouped_mm"),
              "sdpa_flash": sdpa_flash_check(device), "git_commit": os.environ.get("ZOO_GIT_COMMIT") or git_commit()}
    try:
        from layers import kernels

        result["kernels"] = kernels.describe()
    except Exception as err:  # noqa: BLE001
        result["kernels_error"] = error_text(err)
    from train.mfu import measure_matmul_flops

    result["matmul_flops"] = measure_matmul_flops(device, seconds=0.2 if settings.smoke else 1.0)
    result["matmul_dtype"] = "bfloat16, 4096^3" if device.type == "cuda" else "float32, 1024^3"
    return result


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ---- part tests --------------------------------------------------------------------------------
def gpu_test_files() -> list[str]:
    """The test files that carry the gpu marker (they skip without CUDA)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8"))


def junit_results(path: Path) -> list[dict]:
    """[{test, outcome, message}] from pytest's JUnit XML."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("skipped", "failure", "error"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (child.get("message") or child.text or "")[:500]
                break
        tests.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "message": message, "seconds": float(case.get("time", 0.0))})
    return tests


def part_tests(settings: Settings, save, parts_dir: Path) -> dict:
    files = gpu_test_files()
    result = {"files": files}
    if importlib.util.find_spec("pytest") is None:
        raise RuntimeError("pytest is not installed: the CUDA parity tests cannot run "
                           "(install it, e.g. from benchmarks/gpu/wheelhouse, see run.sh)")
    xml = parts_dir / "tests_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rA",
           f"--junitxml={xml}", *files]
    env = {k: v for k, v in os.environ.items() if k != "ZOO_FORCE_REFERENCE"}  # the fast paths under test
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=settings.tests_timeout)
    result.update(command=" ".join(["python", *cmd[1:]]), returncode=proc.returncode,
                  seconds=time.perf_counter() - start, output_tail=(proc.stdout + proc.stderr)[-4000:])
    if not xml.exists():
        raise RuntimeError(f"pytest wrote no report (rc {proc.returncode}):\n{result['output_tail'][-1500:]}")
    tests = junit_results(xml)
    result["tests"] = tests
    result["collected"] = len(tests)
    for outcome, key in (("passed", "passed"), ("skipped", "skipped"), ("failed", "failed"), ("error", "errors")):
        result[key] = sum(t["outcome"] == outcome for t in tests)
    if proc.returncode not in (0, 5) or result["failed"] or result["errors"]:  # 5: nothing selected
        result["error"] = f"{result['failed']} failed, {result['errors']} errors (pytest rc {proc.returncode})"
    return result


# ---- part train --------------------------------------------------------------------------------
class CountSDPA(torch.overrides.TorchFunctionMode):
    """Counts calls of scaled_dot_product_attention (local attention, for one, does not use it)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def expert_paths(model: torch.nn.Module) -> list[str]:
    """The expert-execution paths the MoE layers took in the last forward (empty for a dense model)."""
    return sorted({m.last_impl for m in model.modules() if isinstance(getattr(m, "last_impl", None), str)})


def train_speed(name: str, mode: str, settings: Settings, peak: float, measured: float) -> dict:
    """Tokens/s and MFU of training steps of catalog model `name` in precision `mode`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import zoo
    from train.tasks import lm_loss

    device = torch.device(settings.device)
    dtype = {"bf16": torch.bfloat16, "amp-bf16": torch.float32, "fp32": torch.float32}[mode]
    amp = mode == "amp-bf16"
    torch.manual_seed(0)
    model = zoo.load(name, **settings.overrides)
    b, s = settings.batch_size, settings.seq_len
    cost = model.cost(seq_len=s)
    model = model.to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (b, s + 1), generator=generator).to(device) for _ in range(4)]
    losses = []

    def step(batch):  # what train/trainer.py's Trainer.step does, without its logging
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = lm_loss(model, batch)
            loss = out.loss + sum(out.aux.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_optimizer_step(out.stats, len(losses) + 1)  # the step hook (router bias, redraws)
        losses.append(loss.detach())

    result = {"model": name, "mode": mode, "batch_size": b, "seq_len": s, "tokens_per_step": b * s,
              "params": cost["total_params"], "active_params": cost["active_params"],
              "fwd_flops_per_token": cost["flops_per_token"]}
    # SDPA's flash backend only; if it refuses these inputs, SDPA's own choice, and the reason is kept.
    def backend():
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])

    result["sdpa_backend"] = "flash only"
    counter = CountSDPA()
    try:
        with backend(), counter:
            step(batches[0])
    except RuntimeError as err:
        if "kernel" not in str(err).lower():
            raise
        optimizer.zero_grad(set_to_none=True)
        backend = contextlib.nullcontext
        result["sdpa_backend"] = f"default (flash refused: {str(err).strip().splitlines()[0][:200]})"
        with counter:
            step(batches[0])
    result["sdpa_calls_per_step"] = counter.calls
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with backend():
        for i in range(1, settings.warmup):
            step(batches[i % len(batches)])
        for _ in range(settings.rounds):
            synchronize(device)
            start = time.perf_counter()
            for i in range(settings.steps):
                step(batches[i % len(batches)])
            synchronize(device)
            times.append((time.perf_counter() - start) / settings.steps)
    step_s = statistics.median(times)
    tokens_per_s = b * s / step_s
    mfu = 3 * cost["flops_per_token"] * tokens_per_s / peak
    last_loss = float(losses[-1])
    result.update(step_seconds=times, step_ms_median=1e3 * step_s, tokens_per_s=tokens_per_s,
                  model_tflops_per_s=3 * cost["flops_per_token"] * tokens_per_s / 1e12, mfu=mfu,
                  mfu_vs_measured_matmul=3 * cost["flops_per_token"] * tokens_per_s / measured,
                  last_loss=last_loss, expert_paths=expert_paths(model))
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if not math.isfinite(last_loss):
        result["error"] = f"the loss is {last_loss}"
    elif not 0 < mfu <= 1:
        result["error"] = f"MFU {mfu:.1%} is outside (0, 100%]: the FLOP count or the timing is wrong"
    return result


def part_train(settings: Settings, save) -> dict:
    from train.mfu import measure_matmul_flops

    device = torch.device(settings.device)
    measured = measure_matmul_flops(device, seconds=0.2 if settings.smoke else 1.0)
    peak, source = peak_flops(settings, device, measured)
    result = {"peak_flops": peak, "peak_source": source, "measured_matmul_flops": measured,
              "warmup_steps": settings.warmup, "steps_per_round": settings.steps, "rounds": settings.rounds,
              "optimizer": "torch.optim.AdamW (fused on CUDA), lr 1e-4, weight decay 0.1; grad clip 1.0",
              "data": "uniform random token ids", "runs": []}
    for name in settings.train_models:
        for mode in settings.train_modes:
            print(f"[train] {name} {mode} ...", file=sys.stderr, flush=True)
            try:
                run = train_speed(name, mode, settings, peak, measured)
            except Exception as err:  # noqa: BLE001  (one model failing must not lose the others)
                run = {"model": name, "mode": mode, "error": error_text(err)}
            result["runs"].append(run)
            save(result)  # after every model: a timeout keeps what was measured
            free_memory(device)
    failed = [f"{r['model']} {r['mode']} ({r['error'].splitlines()[0][:120]})" for r in result["runs"] if "error" in r]
    if failed:
        result["error"] = f"{len(failed)} of {len(result['runs'])} runs: " + "; ".join(failed)
    return result


# ---- part moe ----------------------------------------------------------------------------------
def moe_shape(name: str, overrides: dict) -> dict:
    """(hidden, experts, k, expert width) of the first MoE layer of catalog model `name` (built on meta)."""
    import zoo

    with torch.device("meta"):
        mlp = zoo.load(name, **overrides).blocks[0].mlp
    experts, width, hidden = mlp.experts.w_gate.shape  # (E, width, d): see layers/moe/experts.py
    return {"hidden": hidden, "num_experts": experts, "k": mlp.router.num_experts_per_tok, "width": width,
            "shared_expert_left_out": getattr(mlp, "shared", None) is not None}


def output_of(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output tensor of a MoE block (ours returns (output, LayerReport))."""
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def mixtral_pair(shape: dict, settings: Settings) -> dict:
    """{name: (module, run(x) = forward + backward)}: one Mixtral block, and our layer holding its weights.

    The block is benchmarks/moe_speed.py's (normal(0, 0.02) weights); our layers are converted from it by
    zoo.convert.moe_from_transformers (same weights, same routing). Router losses are left out of the
    backward on both sides (Mixtral computes its balance loss outside the block).
    """
    import moe_speed

    from zoo.convert import moe_from_transformers

    saved = moe_speed.HIDDEN
    moe_speed.HIDDEN = shape["hidden"]  # make_block builds its MixtralConfig at moe_speed.HIDDEN
    try:
        block = moe_speed.make_block(shape["num_experts"], shape["k"], shape["width"])
    finally:
        moe_speed.HIDDEN = saved
    block = block.to(device=settings.device, dtype=settings.moe_dtype)
    runners = {}
    for name in settings.moe_impls:
        family, impl = name.split("-", 1)
        if family == "transformers":
            def run(x, impl=impl):
                block.experts.config._experts_implementation = impl
                output_of(block, x).sum().backward()
            runners[name] = (block, run)
        else:
            layer = moe_from_transformers(block)
            layer.experts.impl = impl
            runners[name] = (layer, lambda x, layer=layer: output_of(layer, x).sum().backward())
    return runners


def moe_compare(name: str, settings: Settings) -> dict:
    from moe_speed import clear_grads

    device = torch.device(settings.device)
    shape = moe_shape(name, settings.overrides)
    result = {"model": name, **shape, "tokens": settings.moe_tokens, "dtype": str(settings.moe_dtype),
              "rounds": settings.moe_rounds, "iters_per_round": settings.moe_iters}
    runners = mixtral_pair(shape, settings)
    x = torch.randn(1, settings.moe_tokens, shape["hidden"], device=device, dtype=settings.moe_dtype,
                    requires_grad=True)
    ours = runners[MOE_OURS][0] if MOE_OURS in runners else None
    block = next(module for impl, (module, _) in runners.items() if impl.startswith("transformers"))
    if ours is not None:
        with torch.no_grad():
            block.experts.config._experts_implementation = "grouped_mm"
            ref = output_of(block, x)
            result["max_abs_diff_vs_transformers"] = (output_of(ours, x) - ref).abs().max().item()
            result["ref_max_abs"] = ref.abs().max().item()
    errors, live = {}, {}
    for impl, (module, run) in runners.items():  # warm-up; an implementation that cannot run is reported
        try:
            for _ in range(settings.warmup):
                run(x)
                clear_grads(module, x)
            live[impl] = (module, run)
        except Exception as err:  # noqa: BLE001
            errors[impl] = error_text(err)
            clear_grads(module, x)
    times = {impl: [] for impl in live}
    for r in range(settings.moe_rounds):
        order = list(live)[r % len(live):] + list(live)[: r % len(live)]
        for impl in order:
            module, run = live[impl]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(settings.moe_iters):
                run(x)
                clear_grads(module, x)
            synchronize(device)
            times[impl].append((time.perf_counter() - start) / settings.moe_iters)
    result["seconds"] = times
    result["tokens_per_s"] = {impl: settings.moe_tokens / statistics.median(ts) for impl, ts in times.items()}
    if ours is not None:
        result["fwd_flops_per_token"] = ours.flops_per_token()
        result["zoo_path"] = getattr(ours.experts, "last_impl", None)
        result["tflops_per_s"] = {impl: 3 * result["fwd_flops_per_token"] * tps / 1e12
                                  for impl, tps in result["tokens_per_s"].items()}
    if MOE_OURS in times and MOE_BASELINE in times:
        ratios = sorted(b / o for o, b in zip(times[MOE_OURS], times[MOE_BASELINE], strict=True))
        result["ratio"] = {"of": f"{MOE_OURS} tokens/s / {MOE_BASELINE} tokens/s, paired per round",
                           "median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}
    if errors:
        result["errors"] = errors
        result["error"] = "could not run: " + ", ".join(errors)
    return result


def part_moe(settings: Settings, save) -> dict:
    device = torch.device(settings.device)
    result = {"baseline": MOE_BASELINE, "ours": MOE_OURS, "sizes": []}
    for name in settings.moe_models:
        print(f"[moe] {name} ...", file=sys.stderr, flush=True)
        try:
            size = moe_compare(name, settings)
        except Exception as err:  # noqa: BLE001
            size = {"model": name, "error": error_text(err)}
        result["sizes"].append(size)
        save(result)
        free_memory(device)
    failed = [f"{s['model']} ({s['error'].splitlines()[0][:120]})" for s in result["sizes"] if "error" in s]
    if failed:
        result["error"] = f"{len(failed)} of {len(result['sizes'])} sizes: " + "; ".join(failed)
    return result


# ---- report ------------------------------------------------------------------------------------
def part_status(data: dict | None, rc: str | None) -> str:
    """ok / failed / timed out / not run, from the part's JSON and the exit status run.sh recorded."""
    if rc == "skipped":
        return "skipped: run.sh's time budget was spent"
    if rc in ("124", "137"):
        return "timed out" + ("; what it measured before is kept" if data else "")
    if data is None:
        return "not run" if rc is None else f"no result (exit status {rc})"
    if not data.get("complete"):
        return f"interrupted (exit status {rc}); what it measured before is kept"
    if "error" in data:
        return "failed: " + data["error"].splitlines()[0][:200]
    return "ok"


def fmt(value, spec: str = ",.0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown(results: dict) -> str:
    env, parts = results.get("env") or {}, results["parts"]
    lines = ["# GPU check (issue 13)", "",
             f"- device: {results['device_name']}; torch {results['torch']} (CUDA {results.get('torch_cuda')}); "
             f"transformers {(env.get('dependencies') or {}).get('transformers')}; Python {env.get('python')}",
             f"- nvidia-smi: {env.get('nvidia_smi')}",
             f"- date: {results['date']}; commit: {env.get('git_commit')}",
             f"- command: `{results['command']}`",
             f"- missing Python modules: {', '.join(env.get('missing', [])) or 'none'}; "
             f"kernels: {env.get('kernels')}; SDPA flash: {env.get('sdpa_flash')}",
             "", "| part | status | seconds |", "|---|---|---:|"]
    for name in PARTS:
        part = parts.get(name) or {}
        lines.append(f"| {name} | {results['status'][name]} | {fmt(part.get('part_seconds'), '.1f')} |")

    tests = parts.get("tests") or {}
    lines += ["", "## (a) CUDA parity tests", ""]
    if tests.get("tests") is not None:
        lines += [f"`{tests['command']}`: {tests['collected']} selected, {tests['passed']} passed, "
                  f"{tests['skipped']} skipped, {tests['failed']} failed, {tests['errors']} errors "
                  f"({tests['seconds']:.1f} s)", "", "| test | outcome | message |", "|---|---|---|"]
        lines += [f"| `{t['test']}` | {t['outcome']} | {t['message'].splitlines()[0] if t['message'] else ''} |"
                  for t in tests["tests"]]
    elif tests.get("error"):
        lines.append(f"not run: {tests['error'].splitlines()[0]}")

    train = parts.get("train") or {}
    lines += ["", "## (b) Training tokens/s and MFU", ""]
    if train.get("runs"):
        lines += [f"MFU = 3 x forward FLOPs/token (model.cost) x tokens/s / {train['peak_flops'] / 1e12:.4g} TFLOP/s "
                  f"({train['peak_source']}); beside it, against the measured matmul throughput "
                  f"{train['measured_matmul_flops'] / 1e12:.4g} TFLOP/s. Warm-up steps: {train['warmup_steps']}, "
                  f"then the median of {train['rounds']} rounds of {train['steps_per_round']} steps; "
                  f"{train['optimizer']}; {train['data']}.", "",
                  "| model | precision | batch x seq | tokens/s | step (ms) | model TFLOP/s | MFU "
                  "| MFU (measured peak) | peak memory (GiB) | MoE path | SDPA |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in train["runs"]:
            if "tokens_per_s" not in r:
                lines.append(f"| {r['model']} | {r['mode']} | error: {r['error'].splitlines()[0][:200]} "
                             "| | | | | | | | |")
                continue
            sdpa = r["sdpa_backend"] if r["sdpa_calls_per_step"] else "not called"
            note = f" (error: {r['error']})" if "error" in r else ""
            lines.append(f"| {r['model']} | {r['mode']} | {r['batch_size']} x {r['seq_len']} "
                         f"| {r['tokens_per_s']:,.0f} | {r['step_ms_median']:.1f} | {r['model_tflops_per_s']:.4g} "
                         f"| {r['mfu']:.1%}{note} "
                         f"| {r['mfu_vs_measured_matmul']:.1%} | {fmt(r.get('peak_memory_gib'), '.1f')} "
                         f"| {', '.join(r['expert_paths']) or '-'} | {sdpa} |")

    moe = parts.get("moe") or {}
    lines += ["", "## (c) MoE layer vs transformers' MixtralSparseMoeBlock (forward + backward)", ""]
    for s in moe.get("sizes", []):
        if "tokens_per_s" not in s:
            lines.append(f"**{s['model']}**: error: {s['error'].splitlines()[0][:300]}\n")
            continue
        shared = "; its shared expert left out (Mixtral has none)" if s["shared_expert_left_out"] else ""
        lines += [f"**{s['model']}'s layer**: hidden {s['hidden']}, {s['num_experts']} experts of width {s['width']}, "
                  f"top-{s['k']}{shared}; {s['tokens']} tokens, {s['dtype']}; our path: {s.get('zoo_path')}; "
                  f"max |ours - transformers| {fmt(s.get('max_abs_diff_vs_transformers'), '.2e')} "
                  f"(outputs up to {fmt(s.get('ref_max_abs'), '.2e')}); median of {s['rounds']} interleaved rounds "
                  f"of {s['iters_per_round']} calls", "",
                  "| implementation | tokens/s | TFLOP/s | vs transformers-grouped_mm |", "|---|---:|---:|---:|"]
        base = s["tokens_per_s"].get(MOE_BASELINE)
        for impl, tps in s["tokens_per_s"].items():
            rel = f"{tps / base:.2f}x" if base else "-"
            lines.append(f"| {impl} | {tps:,.0f} | {fmt((s.get('tflops_per_s') or {}).get(impl), '.4g')} | {rel} |")
        for impl, err in (s.get("errors") or {}).items():
            lines.append(f"| {impl} | error: {err.splitlines()[0][:200]} | | |")
        if "ratio" in s:
            r = s["ratio"]
            lines.append(f"\n{r['of']}: median **{r['median']:.2f}x** (min {r['min']:.2f}x, max {r['max']:.2f}x)")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def part_report(settings: Settings, paths: dict) -> dict:
    parts, status = {}, {}
    for name in PARTS:
        file, rc_file = paths["parts"] / f"{name}.json", paths["parts"] / f"{name}.rc"
        data = json.loads(file.read_text()) if file.exists() else None
        rc = rc_file.read_text().strip() if rc_file.exists() else None
        parts[name], status[name] = data, part_status(data, rc)
    env = parts["env"] or device_info(torch.device(settings.device))
    results = {"command": os.environ.get("ZOO_GPU_COMMAND") or " ".join(["python", *sys.argv]),
               "date": now(), "device_name": env.get("device_name"), "torch": env.get("torch"),
               "torch_cuda": env.get("torch_cuda"), "settings": asdict(settings), "status": status,
               "env": parts["env"], "parts": parts}
    write_json(paths["json"], results)
    paths["md"].write_text(markdown(results))
    print(f"wrote {paths['json']} and {paths['md']}", file=sys.stderr)
    return results


# ---- driver ------------------------------------------------------------------------------------
def run_part(name: str, settings: Settings, paths: dict) -> bool:
    """Run one part, saving its JSON (also while it runs); True when it completed without an error."""
    out = paths["parts"] / f"{name}.json"
    start = time.perf_counter()
    header = {"part": name, "started": now(), "command": " ".join(["python", *sys.argv]), "complete": False}

    def save(data: dict) -> None:
        write_json(out, {**header, **data, "part_seconds": time.perf_counter() - start})

    save({})
    try:
        if name == "env":
            data = part_env(settings, save)
        elif name == "tests":
            data = part_tests(settings, save, paths["parts"])
        elif name == "train":
            data = part_train(settings, save)
        else:
            data = part_moe(settings, save)
    except Exception as err:  # noqa: BLE001  (reported in the part's JSON and the table)
        data = {"error": error_text(err)}
    header["complete"] = True
    save(data)
    if "error" in data:
        print(f"[{name}] {data['error']}", file=sys.stderr)
    return "error" not in data


def output_paths(json_path: str | None, smoke: bool) -> dict:
    if json_path is None:
        default = "results_smoke.json" if smoke else "results.json"
        json_path = os.path.join(os.environ["OUT"], "gpu_results.json") if os.environ.get("OUT") and not smoke \
            else str(REPO / "benchmarks" / "gpu" / default)
    path = Path(json_path)
    return {"json": path, "md": path.with_suffix(".md"), "parts": path.with_name(path.stem + "_parts")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=[*PARTS, "report", "all"], default="all",
                   help="one part, the report of the saved parts, or all parts then the report (default)")
    p.add_argument("--smoke", action="store_true",
                   help="toy sizes on the CPU in float32 (seconds): checks this script's logic without a GPU")
    p.add_argument("--json", default=None, help="results file (default: see above); the .md goes beside it")
    p.add_argument("--models", nargs="+", default=list(TRAIN_MODELS), help="catalog models to train")
    p.add_argument("--train-modes", nargs="+", choices=["amp-bf16", "bf16", "fp32"], default=None,
                   help="precisions (default amp-bf16 bf16; fp32 with --smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16; 2 with --smoke)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024; 32 with --smoke)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up training steps, and warm-up calls of each MoE implementation (default 5)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per round (default 10)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds, median reported (default 3)")
    p.add_argument("--moe-models", nargs="+", default=list(MOE_MODELS),
                   help="catalog models whose first MoE layer's shape is compared with Mixtral's block")
    p.add_argument("--moe-impls", nargs="+", default=list(MOE_IMPLS),
                   help="implementations (benchmarks/moe_speed.py names: transformers-IMPL, zoo-IMPL)")
    p.add_argument("--moe-tokens", type=int, default=None, help="tokens per MoE call (default 16384)")
    p.add_argument("--moe-rounds", type=int, default=None, help="interleaved MoE rounds (default 7)")
    p.add_argument("--moe-iters", type=int, default=None, help="calls per implementation per round (default 5)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default: 989 on an H100/H200, else the measured matmul throughput)")
    p.add_argument("--tests-timeout", type=int, default=300, help="seconds the pytest subprocess may take")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    smoke = args.smoke

    def pick(value, gpu, cpu):
        return value if value is not None else (cpu if smoke else gpu)

    if not smoke and not torch.cuda.is_available() and args.part not in ("report", "env"):
        raise SystemExit("no CUDA device here: run with --smoke for the CPU check of this script")
    return Settings(
        device="cpu" if smoke else ("cuda" if torch.cuda.is_available() else "cpu"), smoke=smoke,
        train_models=args.models, train_modes=args.train_modes or (["fp32"] if smoke else ["amp-bf16", "bf16"]),
        batch_size=pick(args.batch_size, 16, 2), seq_len=pick(args.seq_len, 1024, 32),
        warmup=pick(args.warmup, 5, 1), steps=pick(args.steps, 10, 1), rounds=pick(args.rounds, 3, 2),
        moe_models=args.moe_models, moe_impls=args.moe_impls, moe_tokens=pick(args.moe_tokens, 16384, 128),
        moe_rounds=pick(args.moe_rounds, 7, 2), moe_iters=pick(args.moe_iters, 5, 1),
        peak_tflops=args.peak_tflops, tests_timeout=args.tests_timeout,
        overrides=dict(SMOKE_OVERRIDES) if smoke else {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    paths = output_paths(args.json, args.smoke)
    paths["parts"].mkdir(parents=True, exist_ok=True)
    if args.smoke:  # toy ops: one thread is fastest, and safe from other processes' load
        torch.set_num_threads(1)
    if args.part == "report":
        part_report(settings, paths)
        return 0
    names = PARTS if args.part == "all" else (args.part,)
    if args.part == "all":
        for name in PARTS:  # run.sh writes exit statuses; a run of every part in this process has none
            (paths["parts"] / f"{name}.rc").unlink(missing_ok=True)
    ok = [run_part(name, settings, paths) for name in names]
    if args.part == "all":
        part_report(settings, paths)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
