"""train/mfu.py: MFU is never above 100%, the peak is the best of several windows and of this machine's
cached best, and a measurement well below that best says the machine is busy."""

import json
import logging

import pytest
import torch

from train import mfu as m


@pytest.fixture
def windows(monkeypatch, tmp_path):
    """Replace the matmul windows by a scripted sequence of FLOP/s; the cache in a temp folder."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    script: list[float] = []
    monkeypatch.setattr(m, "_window_flops", lambda device, seconds: script.pop(0))
    return script


def test_the_peak_is_the_best_window_and_is_cached_for_this_machine(windows, tmp_path):
    windows += [50.0, 80.0, 20.0, 79.0, 10.0]
    assert m.measure_matmul_flops(torch.device("cpu")) == 80.0
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    assert cache == {m.machine_key(torch.device("cpu")): 80.0}
    assert not m.last_peak().busy


def test_a_busy_measurement_keeps_the_cached_best_and_says_the_machine_is_busy(windows, caplog):
    windows += [100.0] * m.WINDOWS + [30.0] * m.WINDOWS
    m.measure_matmul_flops(torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="train.mfu"):
        peak = m.measure_matmul_flops(torch.device("cpu"))
    assert peak == 100.0
    last = m.last_peak()
    assert (last.measured, last.cached, last.busy) == (30.0, 100.0, True)
    assert "busy" in caplog.text and "30%" in caplog.text


def test_a_faster_measurement_raises_the_cached_best(windows, tmp_path):
    windows += [100.0] * m.WINDOWS + [120.0] * m.WINDOWS
    m.measure_matmul_flops(torch.device("cpu"))
    assert m.measure_matmul_flops(torch.device("cpu")) == 120.0
    assert list(json.loads((tmp_path / "peak_flops.json").read_text()).values()) == [120.0]


def test_the_cache_is_per_thread_count(windows, monkeypatch):
    windows += [100.0] * m.WINDOWS
    m.measure_matmul_flops(torch.device("cpu"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 977)
    windows += [40.0] * m.WINDOWS
    assert m.measure_matmul_flops(torch.device("cpu")) == 40.0  # another key: the 100 does not apply


def test_cache_false_reads_and_writes_nothing(windows, tmp_path):
    (tmp_path / "peak_flops.json").write_text(json.dumps({m.machine_key(torch.device("cpu")): 1e30}))
    windows += [7.0] * m.WINDOWS
    assert m.measure_matmul_flops(torch.device("cpu"), cache=False) == 7.0


def test_a_corrupt_cache_is_ignored_and_rewritten(windows, tmp_path):
    (tmp_path / "peak_flops.json").write_text("{not json")
    windows += [9.0] * m.WINDOWS
    assert m.measure_matmul_flops(torch.device("cpu")) == 9.0
    assert json.loads((tmp_path / "peak_flops.json").read_text()) == {m.machine_key(torch.device("cpu")): 9.0}


def test_mfu_is_3x_forward_flops_over_peak_and_never_above_one(caplog):
    assert m.mfu(1000.0, 1e6, 1e10) == pytest.approx(3 * 1e6 * 1000 / 1e10)
    with caplog.at_level(logging.WARNING, logger="train.mfu"):
        assert m.mfu(1000.0, 1e6, 1e9 * 2) == 1.0  # 150% unclamped
    assert "150.0%" in caplog.text


def test_a_real_measurement_is_positive_and_at_least_each_window(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    peak = m.measure_matmul_flops(torch.device("cpu"), seconds=0.05)
    assert peak > 0 and peak >= m.last_peak().measured
