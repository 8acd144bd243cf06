"""benchmarks/dense_vs_llama.py: one --smoke run (toy sizes) in a subprocess; its JSON holds every measurement.

Nothing here asserts on wall time: only that every measurement ran on both sides with a finite positive
tokens/s, that both sides computed the same function (logits, first loss, greedy ids) and that the report
names the machine and the command.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "dense_vs_llama.py"
PAIRS = {"lm-dense-tiny": "LlamaForCausalLM", "moe-tiny": "MixtralForCausalLM"}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(results JSON, stdout) of one --smoke run."""
    path = tmp_path_factory.mktemp("dense-vs-llama") / "results.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--quiet", "--json", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(path.read_text()), proc.stdout


def test_help_explains_the_measurements():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("--quick", "--smoke", "--json", "--threads", "--profile", "generate", "AdamW"):
        assert word in proc.stdout


def test_every_measurement_ran_on_both_sides(smoke):
    results, _ = smoke
    settings = results["settings"]
    assert settings["overrides"] == {"n_layers": 1} and settings["rounds"] == 1
    expected = {f"{kind}/{t}t" for t in settings["threads"]
                for kind in ["train", *(f"generate_b{b}" for b in settings["gen_batches"])]}
    assert {p["zoo"]: p["transformers"] for p in results["pairs"]} == PAIRS
    for pair in results["pairs"]:
        assert set(pair["measurements"]) == expected
        for key, entry in pair["measurements"].items():
            for side in ("zoo", "transformers"):
                assert positive(entry[side]["tokens_per_s"]), (pair["zoo"], key, side)
                assert len(entry[side]["tokens_per_s_rounds"]) == settings["rounds"]
                assert all(positive(v) for v in entry[side]["tokens_per_s_rounds"])
                assert all(positive(v) for v in entry[side]["cpu_seconds"])
            for stat in ("median", "min", "max", "of_best", "cpu_time"):
                assert positive(entry["ratio"][stat]), (pair["zoo"], key, stat)
            assert entry["ratio"]["min"] <= entry["ratio"]["median"] <= entry["ratio"]["max"]
            assert (entry["target"] is not None) == (pair["zoo"] == "lm-dense-tiny")


def test_both_sides_compute_the_same_function(smoke):
    results, _ = smoke
    length = results["settings"]["prompt_len"] + results["settings"]["new_tokens"]
    for pair in results["pairs"]:
        check = pair["check"]
        assert 0 <= check["logits_max_abs_diff"] < 1e-4, pair["zoo"]
        assert check["first_train_ce"]["abs_diff"] < 1e-4, pair["zoo"]
        for key, entry in pair["measurements"].items():
            if entry["kind"] == "generate":  # greedy decoding with equal weights: equal ids
                assert entry["generated_ids_equal"], (pair["zoo"], key, entry["first_difference"])
                assert len(entry["zoo_ids_row0"]) == length
    moe = next(p for p in results["pairs"] if p["zoo"] == "moe-tiny")
    assert moe["experts_implementation"] and moe["attn_implementation"] == "sdpa"


def test_markdown_table_names_the_machine_and_the_command(smoke):
    results, out = smoke
    md = results["markdown"]
    assert md in out
    assert results["machine"]["torch"] in md and results["machine"]["transformers"] in md
    assert results["machine"]["cpu"] in md and "--smoke" in results["command"] and results["command"] in md
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(p["measurements"]) for p in results["pairs"])
    for name, cls in PAIRS.items():
        assert f"`{name}`" in md and f"`{cls}`" in md
