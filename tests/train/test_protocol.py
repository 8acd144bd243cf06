"""train/protocol.py: the t interval of paired differences against scipy and hand-computed cases, the
learning rate chosen on the selection split, the held-out halves, and resuming from the ledger."""

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from train import protocol as P

# Student t quantiles from printed tables (two-sided 95%: q = 0.975)
TABLE = [(1, 12.706204736), (2, 4.302652730), (4, 2.776445105), (9, 2.262157163), (30, 2.042272456)]


@pytest.mark.parametrize("df,expected", TABLE)
def test_t_quantile_matches_the_printed_table(df, expected):
    assert P.t_quantile(0.975, df) == pytest.approx(expected, rel=1e-8)
    assert P.t_quantile(0.025, df) == pytest.approx(-expected, rel=1e-8)


def test_t_quantile_tends_to_the_normal_one():
    assert P.t_quantile(0.975, 10**7) == pytest.approx(1.959963985, rel=1e-6)


def test_t_cdf_and_quantile_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 19, 50, 2.5):
        for t in (-8.0, -2.1, -0.3, 0.0, 0.7, 1.5, 3.9, 40.0):
            assert P.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-9, abs=1e-13)
        for q in (0.6, 0.9, 0.95, 0.975, 0.995):
            assert P.t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9)


def test_paired_difference_on_a_hand_computed_case():
    # d = 1..5: mean 3, sd sqrt(2.5), se sqrt(0.5), half-width t(0.975, 4) * sqrt(0.5)
    r = P.paired_difference([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    half = 2.776445105 * math.sqrt(0.5)
    assert (r["n"], r["mean"], r["sd"]) == (5, 3.0, pytest.approx(math.sqrt(2.5)))
    assert (r["low"], r["high"]) == (pytest.approx(3 - half), pytest.approx(3 + half))
    # p: two-sided, t = 3 / sqrt(0.5) = 4.2426 with 4 df
    assert r["p"] == pytest.approx(2 * (1 - P.t_cdf(3 / math.sqrt(0.5), 4)))
    assert P.verdict(r) == "worse"  # a is higher: a loss that is higher is worse


def test_paired_difference_matches_scipys_paired_t_test():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 5, 8):
        a, b = rng.normal(size=n), rng.normal(size=n) + 0.3
        r = P.paired_difference(list(a), list(b), confidence=0.9)
        test = stats.ttest_rel(a, b)
        low, high = stats.t.interval(0.9, n - 1, loc=np.mean(a - b), scale=stats.sem(a - b))
        assert r["p"] == pytest.approx(test.pvalue, rel=1e-8)
        assert (r["low"], r["high"]) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))


def test_the_95_percent_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = random.Random(1)
    covered = sum(_covers(rng) for _ in range(4000))
    assert 0.935 <= covered / 4000 <= 0.965, covered


def _covers(rng) -> bool:
    r = P.paired_difference([rng.gauss(0.2, 1) for _ in range(5)], [0.0] * 5)
    return r["low"] <= 0.2 <= r["high"]


def test_degenerate_samples():
    one = P.paired_difference([1.0], [0.5])
    assert one["mean"] == 0.5 and one["low"] == -math.inf and P.verdict(one) == "no resolved difference"
    flat = P.paired_difference([1.0, 2.0], [0.5, 1.5])
    assert (flat["low"], flat["high"], flat["p"]) == (0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="equally long"):
        P.paired_difference([1.0], [1.0, 2.0])


def test_held_out_halves_alternate_and_cover_the_validation_blocks():
    data = SimpleNamespace(val_index=np.arange(3, 103, 5))
    select, report = P.HeldOut(data, 0).index, P.HeldOut(data, 1).index
    assert sorted([*select, *report]) == list(data.val_index) and not set(select) & set(report)
    assert list(select) == list(data.val_index[::2])
    few = P.HeldOut(data, 1, max_blocks=3).index
    assert list(few) == [report[0], report[4], report[9]]  # 10 report blocks: positions 0, 4.5 -> 4, 9


class FakeRunner:
    """Scripted runs: select and report losses are functions of (model, lr, seed); counts its calls."""

    def __init__(self, select, report, fail_at: int | None = None):
        self.select, self.report, self.fail_at, self.calls = select, report, fail_at, []

    def __call__(self, spec, work, keep):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("stopped")
        self.calls.append((spec.model, spec.lr, spec.seed))
        return {"spec": {"model": spec.model, "lr": spec.lr, "seed": spec.seed}, "tokens_per_s": 1.0,
                "select_loss": self.select(spec), "report_loss": self.report(spec)}


def protocol(tmp_path, runner, **kw):
    return P.Protocol(ledger=P.Ledger(tmp_path / "runs.json"), work=tmp_path, seeds=(0, 1, 2), lrs=(1e-3, 3e-3, 1e-2),
                      steps=5, progress=lambda s: None, runner=runner, **kw)


def test_the_learning_rate_is_chosen_on_the_selection_split_not_the_report_split(tmp_path):
    # selection prefers 3e-3, the report split would prefer 1e-2
    runner = FakeRunner(select=lambda s: {1e-3: 2.0, 3e-3: 1.0, 1e-2: 1.5}[s.lr],
                        report=lambda s: {1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.0}[s.lr] + s.seed / 10)
    result = protocol(tmp_path, runner).model("m")
    assert result["lr"] == 3e-3
    assert [(r["spec"]["lr"], r["spec"]["seed"]) for r in result["runs"]] == [(3e-3, 0), (3e-3, 1), (3e-3, 2)]
    assert len(runner.calls) == 3 + 2  # the sweep at seed 0, then the other seeds at the chosen rate


def test_a_rerun_skips_finished_runs_and_an_interrupted_one_resumes(tmp_path):
    select = report = lambda s: s.lr + s.seed
    first = FakeRunner(select, report, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        protocol(tmp_path, first).model("m")
    assert len(json.loads((tmp_path / "runs.json").read_text())["runs"]) == 4
    second = FakeRunner(select, report)
    p = protocol(tmp_path, second)
    result = p.model("m")
    assert second.calls == [("m", 1e-3, 2)] and (p.done, p.skipped) == (1, 4)
    third = FakeRunner(select, report)
    assert protocol(tmp_path, third).model("m") == result and third.calls == []


def test_another_setting_is_another_run(tmp_path):
    runner = FakeRunner(lambda s: 1.0, lambda s: 1.0)
    protocol(tmp_path, runner).model("m")
    runner2 = FakeRunner(lambda s: 1.0, lambda s: 1.0)
    p = protocol(tmp_path, runner2)
    p.steps = 6
    p.model("m")
    assert len(runner2.calls) == 5


def test_compare_pairs_each_model_with_the_baseline_by_seed(tmp_path):
    runner = FakeRunner(lambda s: 1.0, lambda s: {"base": 2.0, "m": 1.9}[s.model] + s.seed * 0.01 * (s.model == "m"))
    p = protocol(tmp_path, runner)
    results = {"base": p.model("base"), "m": p.model("m")}
    c = P.compare(results, "base")["m"]
    d = [-0.1, -0.09, -0.08]
    assert c["seeds"] == [0, 1, 2] and c["mean"] == pytest.approx(sum(d) / 3)
    assert c["verdict"] == "better" and c["high"] < 0


def test_a_ledger_key_names_bundled_data_relative_to_the_checkout(tmp_path):
    from train.frontier import MIXED_CORPUS

    here = P.RunSpec(model="m", lr=1e-3, seed=0, steps=5, batch_size=2, seq_len=8, data=(str(MIXED_CORPUS),))
    assert "<zoo>/train/corpus/mixed.jsonl.gz" in here.key() and str(MIXED_CORPUS.parent) not in here.key()
    outside = tmp_path / "corpus.txt"
    other = P.RunSpec(model="m", lr=1e-3, seed=0, steps=5, batch_size=2, seq_len=8, data=(str(outside),))
    assert str(outside) in other.key()  # data outside the checkout keeps its path
    assert here.key() != other.key()


def test_next_rate_walks_the_one_three_ten_ladder():
    assert [P.next_rate(x, up=True) for x in (1e-3, 3e-3, 1e-2, 3e-4)] == [3e-3, 1e-2, 3e-2, 1e-3]
    assert [P.next_rate(x, up=False) for x in (1e-3, 3e-3, 1e-2)] == [3e-4, 1e-3, 3e-3]


def test_a_best_rate_at_an_edge_extends_the_sweep_beyond_it_until_it_is_inside(tmp_path):
    # the selection loss falls until 3e-2 and rises after it: the grid's largest rate 1e-2 is an edge
    loss = {1e-3: 3.0, 3e-3: 2.0, 1e-2: 1.5, 3e-2: 1.2, 1e-1: 1.4, 3e-1: 9.0}
    runner = FakeRunner(select=lambda s: loss[s.lr], report=lambda s: 1.0)
    result = protocol(tmp_path, runner, extend=3).model("m")
    assert result["lr"] == 3e-2 and not result["at_edge"]
    assert [c[1] for c in runner.calls[:5]] == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]  # stopped once 3e-2 was inside
    assert sorted(float(x) for x in result["sweep"]) == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    assert [(c[1], c[2]) for c in runner.calls[5:]] == [(3e-2, 1), (3e-2, 2)]


def test_the_extension_stops_at_its_limit_and_says_the_rate_is_still_at_the_edge(tmp_path):
    runner = FakeRunner(select=lambda s: s.lr, report=lambda s: 1.0)  # the smaller the better, without end
    result = protocol(tmp_path, runner, extend=1).model("m")
    assert result["lr"] == 3e-4 and result["at_edge"]
    assert [c[1] for c in runner.calls[:4]] == [1e-3, 3e-3, 1e-2, 3e-4]
    inside = FakeRunner(select=lambda s: abs(s.lr - 3e-3), report=lambda s: 1.0)
    assert protocol(tmp_path / "b", inside, extend=2).model("m")["at_edge"] is False
    assert len(inside.calls) == 3 + 2  # no extension when the best rate is inside the grid
