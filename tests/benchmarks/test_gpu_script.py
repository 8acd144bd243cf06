"""benchmarks/gpu: the GPU check's logic, run at toy sizes on the CPU (its numbers need a GPU; its code does not).

One `gpu_bench.py --smoke` subprocess runs every part (parity tests, training speed, MoE vs Mixtral, report);
the tests below read what it wrote. Nothing here asserts on wall time.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "benchmarks" / "gpu"


def _load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", GPU / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


gpu_bench = _load_gpu_bench()


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(results JSON, markdown) of one --smoke run of every part."""
    path = tmp_path_factory.mktemp("gpu-smoke") / "results.json"
    proc = subprocess.run([sys.executable, str(GPU / "gpu_bench.py"), "--smoke", "--json", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_run_sh_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(GPU / "run.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_part_ran_and_the_report_names_the_machine(smoke):
    results, _ = smoke
    assert results["status"] == {part: "ok" for part in gpu_bench.PARTS}
    assert results["device_name"] and results["torch"] and results["command"]
    env = results["parts"]["env"]
    assert env["complete"] and positive(env["matmul_flops"]) and env["missing"] == []
    for part in gpu_bench.PARTS:
        assert positive(results["parts"][part]["part_seconds"])


def test_parity_tests_part_selects_every_gpu_test(smoke):
    tests = smoke[0]["parts"]["tests"]
    assert tests["files"] == gpu_bench.gpu_test_files() and len(tests["files"]) >= 3
    assert positive(tests["collected"]) and positive(tests["seconds"])
    assert tests["collected"] == tests["passed"] + tests["skipped"] + tests["failed"] + tests["errors"]
    assert tests["failed"] == tests["errors"] == 0  # on the CPU every one of them skips, with its reason
    assert all(t["message"] for t in tests["tests"] if t["outcome"] == "skipped")


def test_training_part_measures_every_model(smoke):
    train = smoke[0]["parts"]["train"]
    assert positive(train["peak_flops"]) and positive(train["measured_matmul_flops"])
    runs = {r["model"]: r for r in train["runs"]}
    assert sorted(runs) == sorted(gpu_bench.TRAIN_MODELS)
    for run in runs.values():
        assert "error" not in run, run.get("error")
        for key in ("tokens_per_s", "step_ms_median", "model_tflops_per_s", "fwd_flops_per_token", "params",
                    "mfu", "mfu_vs_measured_matmul"):
            assert positive(run[key]), (run["model"], key, run[key])
        assert run["mfu"] <= 1 and math.isfinite(run["last_loss"])
    assert runs["moe-small"]["expert_paths"] and not runs["lm-dense-small"]["expert_paths"]
    assert runs["lm-dense-small"]["sdpa_calls_per_step"] > 0  # dense attention goes through SDPA
    # local attention runs SDPA on its query blocks without flash-attn (layers/kernels.local_attention_path)
    assert runs["lm-local-small"]["sdpa_calls_per_step"] > 0


def test_moe_part_compares_with_mixtral_on_the_same_weights(smoke):
    moe = smoke[0]["parts"]["moe"]
    sizes = {s["model"]: s for s in moe["sizes"]}
    assert sorted(sizes) == sorted(gpu_bench.MOE_MODELS)
    for size in sizes.values():
        assert "error" not in size, size.get("error")
        assert sorted(size["tokens_per_s"]) == sorted(gpu_bench.MOE_IMPLS)
        assert all(positive(v) for v in size["tokens_per_s"].values())
        assert all(positive(v) for v in size["tflops_per_s"].values())
        assert all(positive(size["ratio"][key]) for key in ("median", "min", "max"))
        # fp32 on the CPU: the converted layer computes the block's function
        assert size["max_abs_diff_vs_transformers"] <= 1e-5 * max(1.0, size["ref_max_abs"])
    assert sizes["moe-fine-small"]["num_experts"] == 64 and sizes["moe-fine-small"]["shared_expert_left_out"]


def test_markdown_table_has_every_measurement(smoke):
    results, md = smoke
    assert results["device_name"] in md and results["torch"] in md and results["command"] in md
    for heading in ("## (a) CUDA parity tests", "## (b) Training tokens/s and MFU", "## (c) MoE layer"):
        assert heading in md
    assert "| model | precision | batch x seq | tokens/s |" in md
    for name in (*gpu_bench.TRAIN_MODELS, *gpu_bench.MOE_MODELS, gpu_bench.MOE_BASELINE, gpu_bench.MOE_OURS):
        assert name in md


@pytest.mark.parametrize(("data", "rc", "status"), [
    (None, None, "not run"),
    (None, "124", "timed out"),
    ({"complete": False}, "137", "timed out; what it measured before is kept"),
    ({"complete": False}, "1", "interrupted (exit status 1); what it measured before is kept"),
    ({"complete": True, "error": "ImportError: No module named 'transformers'\n..."}, "1",
     "failed: ImportError: No module named 'transformers'"),
    (None, "skipped", "skipped: run.sh's time budget was spent"),
    ({"complete": True}, "0", "ok"),
])
def test_a_part_that_failed_or_timed_out_is_reported_as_such(data, rc, status):
    assert gpu_bench.part_status(data, rc) == status
