"""layers.kernels.run_split: parts at once on one intra-op thread each, modes carried, errors after all parts."""

import threading
import time

import pytest
import torch

from layers import kernels


def test_every_part_runs_once_on_its_own_thread_with_one_intra_op_thread(two_threads):
    seen = {}
    lock = threading.Lock()
    together = threading.Barrier(3, timeout=10)  # broken unless the three parts run at the same time

    def work(part):
        together.wait()
        with lock:
            seen[part] = (threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled())

    with torch.no_grad():
        kernels.run_split(work, ["a", "b", "c"])
    assert sorted(seen) == ["a", "b", "c"]
    assert seen["a"][0] == threading.get_ident() and len({v[0] for v in seen.values()}) == 3
    assert all(v[1] == 1 and v[2] is False for v in seen.values())  # one thread each, no_grad carried over
    assert torch.get_num_threads() == 2 and torch.is_grad_enabled()


def test_inference_mode_is_carried_into_the_helper_threads(two_threads):
    out = torch.empty(2, 3)
    with torch.inference_mode():
        buf = torch.zeros(2, 3)  # an inference tensor: writable only under inference mode

        def work(i):
            buf[i].fill_(i + 1)

        kernels.run_split(work, [0, 1])
        out.copy_(buf)
    assert out.tolist() == [[1, 1, 1], [2, 2, 2]]


def test_an_error_in_a_helper_is_raised_after_every_part_finished_and_threads_restored(two_threads):
    finished = []

    def work(part):
        if part == "bad":
            raise ValueError("part failed")
        time.sleep(0.05)
        finished.append(part)

    with pytest.raises(ValueError, match="part failed"):
        kernels.run_split(work, ["slow", "bad", "slow2"])
    assert sorted(finished) == ["slow", "slow2"] and torch.get_num_threads() == 2


def test_workers_are_one_off_cpu_below_the_row_threshold_and_at_most_the_busy_experts(two_threads):
    x = torch.zeros(1)
    enough = kernels.CPU_SPLIT_MIN_ROWS * 64
    assert kernels.cpu_expert_workers(x, 64, enough) == 2 and kernels.cpu_expert_workers(x, 1, 4096) == 1
    assert kernels.cpu_expert_workers(x, 64, enough - 1) == 1  # small batches: tiny ops would queue for the GIL
    assert kernels.cpu_expert_workers(x, 0, 0) == 1
    torch.set_num_threads(1)
    assert kernels.cpu_expert_workers(x, 64, enough) == 1


def test_an_error_in_the_callers_own_part_still_waits_for_the_helpers(two_threads):
    finished = []

    def work(part):
        if part == "mine":
            raise RuntimeError("caller's part failed")
        time.sleep(0.1)
        finished.append(part)

    with pytest.raises(RuntimeError, match="caller's part"):
        kernels.run_split(work, ["mine", "helper"])
    assert finished == ["helper"] and torch.get_num_threads() == 2
