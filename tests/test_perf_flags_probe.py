"""Determinism of ppo_collapse_probe.py: two tiny in-process runs with the same seed end with
bitwise the same parameters and write the same metrics.csv (the clock columns aside), TensorBoard
scalars included; another seed gives another run. The probe's speed flags (--amp, --compile,
--channels-last, --timing) are gone (timing lives in benchmarks/bench_sps.py now); what remains of
this file is what their tests compared against: the run itself."""

import contextlib
import copy
import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_collapse_probe as probe

TINY = dict(
    num_envs=2,
    num_steps=8,
    minibatch_size=8,
    total_timesteps=32,
    view_size=16,
    image_size=64,
    hidden_size=32,
)
# the only metrics.csv columns that two identical runs may differ in
CLOCK_COLUMNS = (
    "sps",
    "wall_time",
)


def tiny_args(**overrides) -> probe.Args:
    """Two updates of 2 envs x 8 steps, 2 minibatches of 8 per epoch, BN + MDR(2,1), 16-px views,
    CPU."""
    return probe.Args(**{**TINY, "mode": "bn-mdr", **overrides})


def run_main(cwd, monkeypatch, **overrides) -> dict:
    """main() in `cwd`; returns the agent's initial and final states, the metrics.csv (header,
    rows), summary.json and the TensorBoard scalars. torch's thread count (main sets --torch-threads
    1) is restored afterwards."""
    initial, agents = [], []

    class RecordedAgent(probe.Agent):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            initial.append(copy.deepcopy(self.state_dict()))
            agents.append(self)

    monkeypatch.setattr(probe, "Agent", RecordedAgent)
    monkeypatch.chdir(cwd)
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert probe.main(tiny_args(**overrides)) == 0
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = list(Path(cwd, "runs").iterdir())
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        "initial": initial[0],
        "final": {name: tensor.detach().clone() for name, tensor in agents[0].state_dict().items()},
        "columns": reader.fieldnames,
        "rows": rows,
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "scalars": {
            tag: [e.value for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]
        },
    }


def differing(a: dict, b: dict) -> list:
    return [name for name in a if not torch.equal(a[name], b[name])]


def without_clocks(rows: list) -> list:
    return [{key: value for key, value in row.items() if key not in CLOCK_COLUMNS} for row in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The default tiny run, shared by the comparisons below."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_main(tmp_path_factory.mktemp("reference"), monkeypatch)


def test_same_seed_gives_bitwise_the_same_run(reference, tmp_path, monkeypatch):
    run = run_main(tmp_path, monkeypatch)

    assert differing(reference["initial"], run["initial"]) == []
    assert differing(reference["final"], run["final"]) == []
    assert without_clocks(run["rows"]) == without_clocks(reference["rows"])
    clocks = ("charts/SPS",)
    assert {k: v for k, v in run["scalars"].items() if k not in clocks} == {
        k: v for k, v in reference["scalars"].items() if k not in clocks
    }
    assert {k: v for k, v in run["summary"].items() if k != "wall_time_s"} == {
        k: v for k, v in reference["summary"].items() if k != "wall_time_s"
    }


def test_reference_run_differs_from_a_different_seed(reference, tmp_path, monkeypatch):
    # the comparison above is meaningful: another seed gives other parameters and another CSV
    run = run_main(tmp_path, monkeypatch, seed=2)

    assert differing(reference["initial"], run["initial"])
    assert differing(reference["final"], run["final"])
    assert without_clocks(run["rows"]) != without_clocks(reference["rows"])


def test_the_run_trains_every_parameter(reference):
    trained = differing(reference["initial"], reference["final"])
    parameters = [
        name
        for name, tensor in reference["initial"].items()
        if "running" not in name and "num_batches" not in name
    ]

    assert sorted(set(parameters) - set(trained)) == []  # every weight moved: a real run to compare


def test_csv_columns_and_tensorboard_scalars(reference):
    # analysis/collapse_stats.py and collapse_figures.py read them
    assert reference["columns"] == probe.CSV_COLUMNS
    tags = {probe.tensorboard_tag(column): column for column in probe.TENSORBOARD_COLUMNS}
    assert set(reference["scalars"]) <= set(tags)  # no perf/ keys: --timing is gone
    for tag in (
        "charts/delta_pi_minus",
        "mdr/ratio_gap",
        "mdr/trust_region_violation_signed",
        "charts/acting_entropy",
    ):
        column = tags[tag]
        # one point per update, the CSV's value
        expected = [float(row[column]) for row in reference["rows"]]
        assert reference["scalars"][tag] == pytest.approx(expected, rel=1e-5, abs=1e-9), tag


def test_diagnostics_stay_complete(reference):
    # the probe's diagnostics are the experiment (paper Fig. 6): measured every update
    for row in reference["rows"]:
        for column in ("delta_pi_minus", "delta_pi_plus", "ratio_gap", "trust_region_violation"):
            assert math.isfinite(float(row[column])), column
        assert "trust_region_violation_signed" in row
