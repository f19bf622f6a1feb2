"""The speed helpers that every script carries its own copy of (one file = everything): SectionTimer, to_device and
mean_stats, checked once, on each script's copy."""

import numpy as np
import pytest
import torch

import ppo_collapse_probe
import ppo_patchloc_mdr
import ppo_procgen_mdr


@pytest.fixture(params=[ppo_procgen_mdr, ppo_patchloc_mdr, ppo_collapse_probe], ids=lambda module: module.__name__)
def ppo(request):
    return request.param


def test_section_timer_counts_nested_time_once(ppo, monkeypatch):
    clock, cpu_clock = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0, 21.0]), iter([0.0, 2.0, 6.0, 12.0, 20.0, 30.0, 42.0])
    monkeypatch.setattr(ppo.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(ppo.time, "process_time", lambda: next(cpu_clock))
    timer = ppo.SectionTimer(True, torch.device("cpu"))

    timer.start()  # t=0
    with timer("update"):  # t=1 (0-1: other)
        with timer("diagnostics"):  # t=3 (1-3: update)
            pass  # t=6 (3-6: diagnostics)
    # t=10 (6-10: update)
    totals = timer.stop()  # t=15 (10-15: other)

    assert totals == {
        "other_time": 6.0,
        "update_time": 6.0,
        "diagnostics_time": 3.0,
        "other_cpu": 12.0,
        "update_cpu": 12.0,
        "diagnostics_cpu": 6.0,
    }
    assert timer.stop() == {}  # the next iteration starts from an empty slate


def test_disabled_section_timer_is_a_no_op(ppo, monkeypatch):
    monkeypatch.setattr(ppo.time, "perf_counter", lambda: pytest.fail("clock read while timing is off"))
    monkeypatch.setattr(ppo.time, "process_time", lambda: pytest.fail("clock read while timing is off"))
    timer = ppo.SectionTimer(False, torch.device("cpu"))

    timer.start()
    with timer("env"):
        pass
    assert timer.stop() == {}


def test_to_device_on_cpu_shares_memory_and_converts_dtypes(ppo):
    obs = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    staging = torch.empty((2, 3, 16, 16, 3), dtype=torch.uint8)

    tensor = ppo.to_device(obs, staging, torch.device("cpu"))

    assert tensor.data_ptr() == obs.__array_interface__["data"][0]  # no copy on CPU
    done = ppo.to_device(np.array([True, False]), torch.empty(2), torch.device("cpu"))
    assert done.dtype == torch.float32 and done.tolist() == [1.0, 0.0]


def test_mean_stats_averages_each_key_over_the_minibatches_that_have_it(ppo):
    stats = [
        {"loss": torch.tensor(1.0), "ratio_gap": torch.tensor(0.5)},
        {"loss": torch.tensor(3.0)},
    ]
    assert ppo.mean_stats(stats) == {"loss": 2.0, "ratio_gap": 0.5}
