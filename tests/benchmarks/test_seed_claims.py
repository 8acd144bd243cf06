"""benchmarks/seed_claims.py on a scripted frontier ledger: the right runs are paired, the learning rate is the
frontier's choice (selection split), verdicts follow the interval, and the frontier's ledger is never written."""

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from train import protocol as P
from train.frontier import FAMILIES

ROOT = Path(__file__).resolve().parents[2]


def _claims():
    spec = importlib.util.spec_from_file_location("seed_claims", ROOT / "benchmarks" / "seed_claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# report losses per (family, seed) at the chosen lr 3e-3; the other rates are chosen against by their select loss
REPORT = {"dense": [2.00, 2.10, 1.90, 2.05, 1.95],
          "moe": [1.95, 2.06, 1.84, 2.01, 1.90],          # dense - 0.04..0.06 at every seed: better
          "moe-fine": [2.10, 2.00, 2.00, 2.10, 1.90],     # mixed signs: no resolved difference
          "local": [2.01, 2.11, 1.91, 2.06, 1.96],
          "performer": [2.30, 2.40, 2.20, 2.35, 2.25],
          "scatterbrain": [2.02, 2.12, 1.92, 2.07, 1.97],  # 0.01 behind local at every seed: worse
          "monarch": [1.90, 2.00, 1.80, 1.95, 1.85]}


def _ledger(folder: Path) -> Path:
    def runner(spec, work, keep):
        family = next(f for f, name in FAMILIES.items() if name.format(size="tiny") == spec.model)
        best = spec.lr == 3e-3
        report = REPORT[family][spec.seed] if best else 0.5  # a low report loss at a rate the selection rejects
        return {"spec": asdict(spec), "select_loss": 1.0 if best else 3.0, "report_loss": report,
                "tokens_per_s": 1.0, "total_params": 1, "final": None, "active_flops_per_token": 1.0}

    proto = P.Protocol(ledger=P.Ledger(folder / "runs.json"), work=folder, seeds=(0, 1, 2, 3, 4),
                       lrs=(1e-3, 3e-3, 1e-2), steps=7, batch_size=2, seq_len=16, warmup_steps=1, eval_blocks=4,
                       progress=lambda s: None, runner=runner)
    for family in REPORT:
        proto.model(FAMILIES[family].format(size="tiny"), {"n_layers": 1})
    return folder / "runs.json"


def test_claims_pair_by_seed_at_the_chosen_rate_and_leave_the_frontier_ledger_alone(tmp_path):
    frontier = tmp_path / "frontier"
    before = _ledger(frontier).read_bytes()
    assert _claims().main(["--frontier", str(frontier), "--out", str(tmp_path / "claims"), "--no-train"]) == 0
    assert (frontier / "runs.json").read_bytes() == before
    report = json.loads((tmp_path / "claims" / "claims.json").read_text())
    rows = {r["claim"]: r for r in report["claims"]}

    moe = rows["moe-tiny (top-2 of 8) beats dense at equal active FLOPs"]
    diffs = [m - d for m, d in zip(REPORT["moe"], REPORT["dense"], strict=True)]
    assert moe["mean"] == pytest.approx(sum(diffs) / 5)  # the rejected rates' 0.5 losses would show here
    assert moe["high"] < 0 and moe["verdict"] == "better" and moe["outcome"] == "confirmed"
    assert moe["seeds"] == [0, 1, 2, 3, 4]

    fine = rows["moe-fine-tiny (top-8 of 64 + shared) beats dense at equal active FLOPs"]
    assert fine["low"] < 0 < fine["high"] and fine["outcome"] == "not resolved"
    local = rows["local attention is as good as dense in training"]  # an equivalence claim is never "confirmed"
    assert local["verdict"] == "worse" and local["outcome"] == "contradicted"  # 0.01 behind at every seed

    vs_local = next(r for c, r in rows.items() if c.startswith("scatterbrain") and "beats local" in c)
    assert vs_local["mean"] == pytest.approx(0.01) and vs_local["verdict"] == "worse"
    assert vs_local["outcome"] == "contradicted"
    vs_performer = next(r for c, r in rows.items() if c.startswith("scatterbrain") and "beats performer" in c)
    assert vs_performer["verdict"] == "better" and vs_performer["outcome"] == "confirmed"

    # families the ledger lacks are named, not guessed; nothing was trained (--no-train)
    assert set(report["missing"]) == {"moe-topp", "lsh", "pixelfly"}
    assert not any("pixelfly" in c or "lsh" in c for c in rows)
    assert report["equal_params_dense"] is None and not (tmp_path / "claims" / "lm").exists()
    md = (tmp_path / "claims" / "claims.md").read_text()
    assert "**contradicted**" in md and "Not measured" in md


def test_an_empty_frontier_is_a_clear_error(tmp_path):
    (tmp_path / "f").mkdir()
    with pytest.raises(SystemExit, match="zoo frontier"):
        _claims().main(["--frontier", str(tmp_path / "f"), "--out", str(tmp_path / "c"), "--no-train"])


def test_sae_regime_claims_join_the_table_with_their_interval_and_ratio(tmp_path):
    claims = _claims()
    record = {"claim": "HierarchicalTopK at k=8 vs TopK trained at k=8", "earlier": "issue 7", "n": 5,
              "diff": {"n": 5, "mean": 0.023, "low": 0.0218, "high": 0.0241, "p": 1e-6}, "verdict": "worse",
              "ratio_mean": 1.2266, "ratio_low": 1.2137, "ratio_high": 1.2396}
    unresolved = {**record, "claim": "at k=16", "diff": {"n": 3, "mean": -0.001, "low": -0.004, "high": 0.002,
                                                          "p": 0.4}, "verdict": "no resolved difference"}
    path = tmp_path / "sae_regime.json"
    path.write_text(json.dumps({"claims": [record, unresolved, {"claim": "no numbers"}]}))
    rows = claims.sae_rows(path)
    assert [r["claim"] for r in rows] == [record["claim"], "at k=16"]
    assert (rows[0]["mean"], rows[0]["low"], rows[0]["high"], rows[0]["n"]) == (0.023, 0.0218, 0.0241, 5)
    assert rows[0]["outcome"] == "first worse: FVU ratio 1.227 [1.214, 1.240]"
    assert rows[1]["outcome"].startswith("not resolved") and rows[1]["n"] == 3
    table = claims.markdown(rows, {"steps": 1, "batch_size": 1, "seq_len": 1, "lrs": [1e-3], "seeds": [0]}, [])
    assert "+0.0230 [+0.0218, +0.0241] FVU" in table


def test_a_family_whose_sweep_went_past_the_grid_edge_is_read_at_its_extended_rate(tmp_path):
    # monarch's selection loss keeps falling past the grid's largest rate 1e-2: the frontier tried 3e-2 (and 1e-1)
    select = {1e-3: 3.0, 3e-3: 2.0, 1e-2: 1.5, 3e-2: 1.0, 1e-1: 1.2}

    def runner(spec, work, keep):
        family = next(f for f, name in FAMILIES.items() if name.format(size="tiny") == spec.model)
        best = 3e-2 if family == "monarch" else 3e-3
        loss = select[spec.lr] if family == "monarch" else (1.0 if spec.lr == best else 3.0)
        report = 1.5 + spec.seed / 10 - (family == "monarch") * 0.2 if spec.lr == best else 0.5
        return {"spec": asdict(spec), "select_loss": loss, "report_loss": report, "tokens_per_s": 1.0,
                "total_params": 1, "final": None, "active_flops_per_token": 1.0}

    frontier = tmp_path / "frontier"
    proto = P.Protocol(ledger=P.Ledger(frontier / "runs.json"), work=frontier, seeds=(0, 1, 2), extend=2,
                       lrs=(1e-3, 3e-3, 1e-2), steps=7, batch_size=2, seq_len=16, warmup_steps=1, eval_blocks=4,
                       progress=lambda s: None, runner=runner)
    for family in ("dense", "monarch"):
        proto.model(FAMILIES[family].format(size="tiny"), {})
    claims = _claims()
    settings = claims.frontier_settings(P.Ledger(frontier / "runs.json"))  # no frontier.json: from the ledger
    assert settings["lrs"] == (1e-3, 3e-3, 1e-2) and settings["extend_edges"] == 2
    assert claims.main(["--frontier", str(frontier), "--out", str(tmp_path / "claims"), "--no-train"]) == 0
    rows = {r["claim"]: r for r in json.loads((tmp_path / "claims" / "claims.json").read_text())["claims"]}
    monarch = rows["monarch beats lm-dense-tiny (3.3M params) at equal steps"]
    assert monarch["mean"] == pytest.approx(-0.2) and monarch["seeds"] == [0, 1, 2]  # 3e-2's runs, not 1e-2's
