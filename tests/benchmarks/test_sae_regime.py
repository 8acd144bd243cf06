"""benchmarks/sae_regime.py: the corpus halves are disjoint and complete, an activation store of steps x batch rows
is read once with no row repeated, the claims are paired by seed, and a rerun trains nothing (the ledger).
Nothing here trains a model: the two runners are replaced by fakes that count their calls."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import sae_regime  # noqa: E402


def _corpus(path: Path, n: int = 11) -> list[str]:
    texts = [f"document {i}: " + "x" * i for i in range(n)]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "domain": "d", "source": "s"}) + "\n")
    return texts


def test_corpus_halves_are_disjoint_and_cover_every_document(tmp_path):
    texts = _corpus(tmp_path / "c.jsonl.gz")
    meta = sae_regime.split_corpus(tmp_path / "c.jsonl.gz", tmp_path / "halves")
    lm, sae = sae_regime.corpus_texts(meta["lm_file"]), sae_regime.corpus_texts(meta["sae_file"])
    assert not set(lm) & set(sae)
    assert sorted(lm + sae) == sorted(texts)
    assert (len(lm), len(sae)) == (6, 5) and meta["counts"]["sae"]["documents"] == 5
    again = sae_regime.split_corpus(tmp_path / "c.jsonl.gz", tmp_path / "halves")  # kept, not rewritten
    assert again == meta


def test_a_store_of_steps_x_batch_rows_is_read_once_without_repeats(tmp_path):
    """What "fresh, no epochs" rests on: the SAE task harvests steps x batch rows and the store serves each once."""
    from train.activations import DATA_FILE, META_FILE, ActivationStore

    steps, batch, d = 12, 8, 3
    rows = np.arange(steps * batch, dtype=np.float32)[:, None].repeat(d, 1)  # row i holds the number i
    np.save(tmp_path / DATA_FILE, rows)
    (tmp_path / META_FILE).write_text(json.dumps({"rows": len(rows), "d": d, "mean_sq_norm": 1.0}))
    store = ActivationStore(tmp_path)
    for seed in (0, 1):
        seen = np.concatenate([store.batch(s, batch, seed=seed)[:, 0].numpy() for s in range(steps)])
        assert sorted(seen.tolist()) == list(range(steps * batch))  # every row once: no repeats, nothing skipped
    # one step more starts a second pass: what the script's "passes_over_store" would show above 1
    extra = store.batch(steps, batch, seed=0)[:, 0].numpy()
    assert set(extra.tolist()) <= set(range(steps * batch))


def _fake_runs(calls):
    def train_run(spec, work, keep_final=True):
        calls.append(("lm", spec.steps))
        return {"report_loss": 2.0, "select_loss": 2.1, "tokens": 100, "tokens_per_s": 10.0, "wall_seconds": 1.0,
                "threads": 1, "total_params": 1e6, "final": str(work / "final")}

    def train_sae(args, item, seed, source, hook, d_in, sae_file, work):
        calls.append((item["name"], seed))
        base = 0.5 - 0.01 * seed  # the seed moves every SAE alike: a paired difference removes it
        shift = {"hier-mean": -0.02, "hier-log_area": -0.01, "matryoshka": 0.03}.get(item["name"], 0.0)
        l0 = 3.6 if args.sae_steps != 7 else 5.6  # the Matryoshka prefixes' L0 differ between the two settings
        evals = {sae_regime._budget_key(b): {"fvu": base + shift + 0.001 * len(b), "l0": l0, "dead_frac": 0.1}
                 for b in item["eval"]}
        return {"name": item["name"], "seed": seed, "sets": item["sets"], "evals": evals, "acts_per_s": 1.0,
                "cpu_seconds": 1.0, "wall_seconds": 1.0, "loadavg": 1.0, "finished": f"t{len(calls)}",
                "fresh": {"passes_over_store": 1.0, "val_rows": 64}}
    return train_run, train_sae


def test_claims_pair_seeds_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
    import train.protocol

    calls: list = []
    fake_lm, fake_sae = _fake_runs(calls)
    monkeypatch.setattr(train.protocol, "train_run", fake_lm)
    monkeypatch.setattr(sae_regime, "train_sae", fake_sae)
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))  # main sets it; restored after the test
    _corpus(tmp_path / "c.jsonl.gz")
    argv = ["--out", str(tmp_path / "out"), "--corpus", str(tmp_path / "c.jsonl.gz"), "--d-model", "8",
            "--seeds", "3", "--ks", "2", "4", "--expansion", "16", "--json", str(tmp_path / "r.json"),
            "--md", str(tmp_path / "r.md")]
    assert sae_regime.main(argv) == 0
    per_seed = len(sae_regime.sae_plan(sae_regime.build_parser().parse_args(argv), 8))
    assert calls[0] == ("lm", 400) and len(calls) == 1 + 3 * per_seed
    # the TopK comparators of the Matryoshka prefixes take k from the prefix's measured L0 (3.6 -> 4)
    ledger = json.loads((tmp_path / "out" / "runs.json").read_text())["runs"]
    assert {r["sets"]["k"] for r in ledger.values() if r.get("name", "").startswith("topk-w")} == {4}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete_seeds"] == [0, 1, 2]
    claims = {c["claim"]: c for c in report["claims"]}
    hier = claims["HierarchicalTopK (mean loss, one SAE k=1..4) at k=2 vs TopK trained at k=2"]
    assert hier["n"] == 3 and hier["diff"]["mean"] == pytest.approx(-0.02 + 0.001)
    assert hier["verdict"] == "better" and hier["diff"]["high"] - hier["diff"]["low"] < 1e-9  # same shift each seed
    assert claims["log-area loss vs the paper's mean loss (HierarchicalTopK) at k=4"]["verdict"] == "worse"
    assert "| HierarchicalTopK (mean loss" in (tmp_path / "r.md").read_text()

    calls.clear()
    assert sae_regime.main(argv) == 0  # everything is in the ledger
    assert calls == []
    # one more seed: only its runs are trained
    assert sae_regime.main([*argv[:7], "4", *argv[8:]]) == 0
    assert [c[1] for c in calls] == [3] * per_seed
    # another setting (other SAE steps) in the same ledger: trained anew, and neither report mixes in the other's runs
    calls.clear()
    assert sae_regime.main([*argv, "--sae-steps", "7"]) == 0
    assert len(calls) == 3 * per_seed
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["runs"]) == 3 * per_seed and report["settings"]["sae_steps"] == 7
    # its TopK comparators take k from its own Matryoshka runs (5.6 -> 6), not from the other setting's (4)
    assert {r["sets"]["k"] for r in report["runs"].values() if r["name"].startswith("topk-w")} == {6}
    assert sae_regime.main([*argv, "--report-only"]) == 0
    assert len(json.loads((tmp_path / "r.json").read_text())["runs"]) == 4 * per_seed
