"""`zoo frontier` end to end on a smoke configuration (tiny models, a few steps, 2 seeds, few families):
frontier.json / frontier.md / plots written, equal tokens, costs from model.cost, the training-free and
SAE frontiers, an independent check (local attention whose window covers the sequence is dense), and a
rerun that trains nothing."""

import json

import pytest

from train.data import BUNDLED_CORPUS
from zoo import load
from zoo.cli import main as zoo_main

SMOKE = ["--families", "dense", "moe", "moe-topp", "local", "--seeds", "2", "--lrs", "3e-3", "1e-2",
         "--extend-edges", "0", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--set", "d_model=32",
         "--set", "n_layers=1",
         "--set", "n_heads=2", "--eval-blocks", "4", "--sae-steps", "2", "--sae-width", "64",
         "--data", str(BUNDLED_CORPUS), "--no-plots"]


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        zoo_main(["frontier", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--seeds", "--families", "--out", "--lrs", "resumes"):
        assert flag in text


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    assert zoo_main(["frontier", *SMOKE, "--out", str(out)]) == 0
    return out, json.loads((out / "frontier.json").read_text())


def test_every_family_ran_every_seed_on_equal_tokens_with_its_own_cost(smoke):
    out, report = smoke
    fams = {r["family"]: r for r in report["families"]}
    assert list(fams) == ["dense", "moe", "moe-topp", "local"]
    ledger = json.loads((out / "runs.json").read_text())["runs"]
    runs = [r for r in ledger.values() if "spec" in r]
    assert len(runs) == 4 * (2 + 1) and {r["tokens"] for r in runs} == {3 * 2 * 32}
    for r in runs:
        assert r["select_loss"] > 0 and r["report_loss"] > 0 and r["tokens_per_s"] > 0
    for fam in ("dense", "moe", "local"):
        expected = load(fams[fam]["model"], d_model=32, n_layers=1, n_heads=2).cost(32)
        assert fams[fam]["flops_per_token"] == expected["flops_per_token"]
        assert fams[fam]["total_params"] == expected["total_params"]
    worst = load("moe-topp-tiny", d_model=32, n_layers=1, n_heads=2).cost(32)["flops_per_token"]
    assert fams["moe-topp"]["flops_per_token"] <= worst  # the mean k measured, at most the largest k
    for fam in ("moe", "moe-topp", "local"):
        v = fams[fam]["vs_dense"]
        assert v["n"] == 2 and v["low"] <= v["mean"] <= v["high"]
    assert (out / "frontier.md").read_text().startswith("Frontier at `tiny`")


def test_local_attention_whose_window_covers_the_sequence_is_dense(smoke):
    _, report = smoke
    fams = {r["family"]: r for r in report["families"]}
    # lm-local-tiny's window is 64 >= seq_len 32: the same model as dense, same seeds and batches
    assert fams["local"]["lr"] == fams["dense"]["lr"]
    assert fams["local"]["report_losses"] == pytest.approx(fams["dense"]["report_losses"], abs=1e-4)


def test_the_training_free_and_sae_frontiers(smoke):
    _, report = smoke
    knobs = {}
    for r in report["training_free"]:
        knobs.setdefault(r["knob"], []).append(r)
    assert [r["setting"] for r in knobs["MoE k"]] == [f"k={k}" for k in range(1, 9)]
    flops = [r["flops_per_token"] for r in knobs["MoE k"]]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    for kind in ("local", "lsh", "performer", "scatterbrain"):
        assert len(knobs[f"attention {kind}"]) == 3
    assert [r["setting"] for r in knobs["low-rank projection"]] == ["rank=4", "rank=8", "rank=16"]
    assert knobs["monarch projection"] and len(knobs["MoE top-p"]) == 5
    dense = knobs["dense"][0]["report_loss"]
    assert knobs["attention local"][-1]["report_loss"] == pytest.approx(dense, abs=1e-4)  # window 128 >= 32
    assert set(report["sae"]) == {"sae-relu-tiny", "sae-topk-tiny", "sae-batchtopk-tiny", "sae-hier-topk-tiny",
                                  "sae-matryoshka-tiny"}
    for points in report["sae"].values():
        assert points and all(p["fvu"] >= 0 and p["l0"] >= 0 for p in points)


def test_a_rerun_trains_nothing_and_gives_the_same_numbers(smoke, capsys):
    out, report = smoke
    assert zoo_main(["frontier", *SMOKE, "--out", str(out)]) == 0
    again = json.loads((out / "frontier.json").read_text())
    assert again["timing"]["trained"] == 0 and again["timing"]["skipped"] == 4 * 3
    assert again["families"] == report["families"]
    assert again["training_free"] == report["training_free"] and again["sae"] == report["sae"]


def test_report_only_trains_nothing_and_names_what_is_missing(smoke, tmp_path):
    out, report = smoke
    partial = tmp_path / "partial"
    partial.mkdir()
    runs = json.loads((out / "runs.json").read_text())["runs"]
    # keep every run of dense and moe, drop one of local's seeds and every non-training record
    kept = {k: v for k, v in runs.items() if "spec" in v and not (
        json.loads(k)["model"] == "lm-local-tiny" and json.loads(k)["seed"] == 1)}
    (partial / "runs.json").write_text(json.dumps({"runs": kept}))
    before = (partial / "runs.json").read_text()
    assert zoo_main(["frontier", *SMOKE, "--out", str(partial), "--report-only"]) == 0
    assert (partial / "runs.json").read_text() == before  # nothing was run or recorded
    again = json.loads((partial / "frontier.json").read_text())
    assert again["timing"]["trained"] == 0
    assert [r["family"] for r in again["families"]] == ["dense", "moe", "moe-topp"]
    by_family = {r["family"]: r for r in report["families"]}
    for r in again["families"]:  # the same numbers as the complete report
        assert r == by_family[r["family"]]
    assert again["training_free"] == [] and again["sae"] == {}
    assert any("local" in m for m in again["missing"]) and "the SAE frontier" in again["missing"]
    assert "Not in the ledger yet" in (partial / "frontier.md").read_text()
