"""mean_stats, the helper every script carries its own copy of (one file = everything), checked once
on each copy."""

import pytest
import torch

import ppo_collapse_probe
import ppo_patchloc_mdr
import ppo_procgen_mdr


@pytest.fixture(
    params=[ppo_procgen_mdr, ppo_patchloc_mdr, ppo_collapse_probe],
    ids=lambda module: module.__name__,
)
def ppo(request):
    return request.param


def test_mean_stats_averages_each_key_over_the_minibatches_that_have_it(ppo):
    stats = [
        {"loss": torch.tensor(1.0), "ratio_gap": torch.tensor(0.5)},
        {"loss": torch.tensor(3.0)},
    ]
    assert ppo.mean_stats(stats) == {"loss": 2.0, "ratio_gap": 0.5}
