"""Speed flags of ppo_collapse_probe.py (--channels-last, --amp, --compile, --timing): each one on vs off on CPU,
comparing the final parameters and the metrics.csv of tiny in-process runs; plus the pieces behind them.

No timing assertions: the probe's diagnostics are the experiment, and its speed is not what these tests are about."""

import contextlib
import copy
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_collapse_probe as probe

TINY = dict(num_envs=2, num_steps=8, minibatch_size=8, total_timesteps=32, view_size=16, image_size=64, hidden_size=32)
CLOCK_COLUMNS = ("sps", "wall_time")  # the only metrics.csv columns that two identical runs may differ in
SECTIONS = ("inference", "env", "update", "diagnostics", "other")


def tiny_args(**overrides) -> probe.Args:
    """Two updates of 2 envs x 8 steps, 2 minibatches of 8 per epoch, BN + MDR(2,1), 16-px views, CPU."""
    return probe.Args(**{**TINY, "mode": "bn-mdr", **overrides})


def run_main(cwd, monkeypatch, **overrides) -> dict:
    """main() in `cwd`; returns the agent's initial and final states, the metrics.csv (header, rows), summary.json and
    the TensorBoard scalars. torch's thread count (main sets --torch-threads 1) is restored afterwards."""
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
        "scalars": {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]},
    }


def differing(a: dict, b: dict) -> list:
    return [name for name in a if not torch.equal(a[name], b[name])]


def without_clocks(rows: list) -> list:
    return [{key: value for key, value in row.items() if key not in CLOCK_COLUMNS} for row in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The default tiny run (every speed flag at its default); shared by the comparisons below."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_main(tmp_path_factory.mktemp("reference"), monkeypatch)


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    """The same run with --timing."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_main(tmp_path_factory.mktemp("timed"), monkeypatch, timing=True)


# ----------------------------------------------------------------------------------------------------------------------
# flags that change nothing on CPU: bitwise the same parameters, the same metrics.csv


def test_no_channels_last_leaves_the_run_bitwise_unchanged(reference, tmp_path, monkeypatch):
    run = run_main(tmp_path, monkeypatch, channels_last=False)  # a CUDA-only fast path: a no-op on CPU

    assert differing(reference["final"], run["final"]) == []
    assert without_clocks(run["rows"]) == without_clocks(reference["rows"])


def test_timing_leaves_the_run_bitwise_unchanged(reference, timed):
    assert differing(reference["final"], timed["final"]) == []
    assert without_clocks(timed["rows"]) == without_clocks(reference["rows"])


def test_reference_run_differs_from_a_different_seed(reference, tmp_path, monkeypatch):
    # the comparisons above are meaningful: another seed gives other parameters and another CSV
    run = run_main(tmp_path, monkeypatch, seed=2)

    assert differing(reference["final"], run["final"])
    assert without_clocks(run["rows"]) != without_clocks(reference["rows"])


# ----------------------------------------------------------------------------------------------------------------------
# --timing: TensorBoard perf/ keys (the scheme of ppo_procgen_mdr.py, read by benchmarks/bench_sps.py), nothing else


def test_timing_logs_every_section_in_both_clocks_and_peak_memory(timed):
    scalars = timed["scalars"]

    for section in SECTIONS:
        for clock in ("time", "cpu"):  # wall, and this process's CPU seconds
            values = scalars[f"perf/{section}_{clock}"]
            assert len(values) == 2, (section, clock, values)  # one point per update
            assert all(np.isfinite(values)) and all(v >= 0 for v in values), (section, clock, values)
    assert len(scalars["perf/peak_rss_gb"]) == 2 and all(v > 0 for v in scalars["perf/peak_rss_gb"])
    assert "perf/cuda_max_allocated_gb" not in scalars  # CPU
    expected = {f"perf/{s}_{c}" for s in SECTIONS for c in ("time", "cpu")} | {"perf/peak_rss_gb"}
    assert {key for key in scalars if key.startswith("perf/")} == expected


def test_no_perf_keys_without_timing(reference):
    assert not [key for key in reference["scalars"] if key.startswith("perf/")]


def test_timing_leaves_the_csv_columns_and_the_summary_keys_unchanged(reference, timed):
    assert timed["columns"] == reference["columns"] == probe.CSV_COLUMNS  # fixed by docs/collapse/ and `plot`
    assert timed["summary"].keys() == reference["summary"].keys()
    assert timed["summary"]["args"]["timing"] and not reference["summary"]["args"]["timing"]


def test_diagnostics_stay_complete(reference):
    # the probe's diagnostics are the experiment (paper Fig. 6): measured every update, whatever the speed flags
    for row in reference["rows"]:
        for column in ("delta_pi_minus", "delta_pi_plus", "ratio_gap", "trust_region_violation"):
            assert math.isfinite(float(row[column])), column


# ----------------------------------------------------------------------------------------------------------------------
# flags that change the arithmetic (bfloat16, or a compiled graph's reassociation): compared on a single Adam step (over
# several steps Adam turns rounding-level gradient differences into lr-sized ones)

ONE_STEP = dict(num_envs=2, num_steps=1, minibatch_size=2, total_timesteps=2, update_epochs=1)  # 6 images per batch


def update_cosine(run: dict, other: dict, prefixes=("",)) -> float:
    """Cosine between the parameter updates (from the common initial parameters) of two runs, over the parameters whose
    names start with one of `prefixes` (default: all)."""
    initial = run["initial"]
    names = [
        name
        for name, tensor in initial.items()
        if tensor.is_floating_point() and "running" not in name and name.startswith(prefixes)
    ]
    delta_a = torch.cat([(run["final"][name] - initial[name]).double().flatten() for name in names])
    delta_b = torch.cat([(other["final"][name] - initial[name]).double().flatten() for name in names])
    return float(delta_a @ delta_b / (delta_a.norm() * delta_b.norm()))


@pytest.fixture(scope="module")
def one_step_reference(tmp_path_factory):
    """Per --mode, made on first use: one rollout of one step per env and one Adam step on its 2 samples, float32, eager."""
    runs = {}

    def get(mode):
        if mode not in runs:
            with pytest.MonkeyPatch.context() as monkeypatch:
                runs[mode] = run_main(tmp_path_factory.mktemp(f"one_step_{mode}"), monkeypatch, mode=mode, **ONE_STEP)
        return runs[mode]

    return get


@pytest.mark.parametrize("mode", ["bn", "eval"])
def test_amp_on_cpu_trains_like_float32(mode, one_step_reference, tmp_path, monkeypatch):
    """--amp on CPU is bfloat16 autocast of the backbone. It must really differ (autocast active) and update the
    parameters in nearly the same direction, from the same initial parameters. Adam's first step is about lr x the
    sign of each gradient, so bfloat16 rounding flips the small backbone gradients (measured: BN 0.85 over all
    parameters, 0.97-0.998 for the float32 heads; eval 0.995)."""
    reference = one_step_reference(mode)
    run = run_main(tmp_path, monkeypatch, amp=True, mode=mode, **ONE_STEP)

    assert "actor.4.weight" in differing(reference["initial"], reference["final"])  # a real update to compare
    assert differing(run["initial"], reference["initial"]) == []
    assert differing(reference["final"], run["final"]), "--amp changed nothing: autocast is not active"
    assert update_cosine(run, reference) > 0.7
    assert update_cosine(run, reference, prefixes=("actor.", "critic.")) > 0.9
    (row,), (reference_row,) = run["rows"], reference["rows"]
    for column in ("policy_loss", "value_loss", "entropy", "delta_pi_minus", "delta_pi_plus", "ratio_gap"):
        assert math.isfinite(float(row[column])), column
    assert float(row["entropy"]) == pytest.approx(float(reference_row["entropy"]), rel=1e-2)
    assert float(row["value_loss"]) == pytest.approx(float(reference_row["value_loss"]), rel=0.1, abs=1e-6)


def test_compile_matches_eager(one_step_reference, tmp_path, monkeypatch):
    """--compile (torch.compile of the backbone, which runs on CPU here) computes the same function up to float
    reassociation. The cheapest run that compiles: --mode eval (its BatchNorm reads no mode flag) and one batch shape
    (6 images) everywhere make two graphs, the no-grad forward and the training forward + backward (2 cores: 27-43 s
    with a cold inductor cache, ~5 s warm)."""
    reference = one_step_reference("eval")
    torch._dynamo.reset()
    try:
        compiled = run_main(tmp_path, monkeypatch, compile=True, mode="eval", **ONE_STEP)
    finally:
        torch._dynamo.reset()

    assert compiled["final"].keys() == reference["final"].keys()  # compiled in place: the same state_dict
    assert update_cosine(compiled, reference) > 0.999
    for name, tensor in compiled["final"].items():  # the first Adam step moves each weight by at most ~lr = 1e-3
        torch.testing.assert_close(tensor, reference["final"][name], rtol=0, atol=2e-3, msg=name)
    (row,), (reference_row,) = compiled["rows"], reference["rows"]
    for column in ("policy_loss", "value_loss", "entropy"):
        assert float(row[column]) == pytest.approx(float(reference_row[column]), rel=1e-3, abs=1e-6), column


@pytest.mark.parametrize("mode", ["bn", "eval"])  # nn.BatchNorm2d, and EvalModeBatchNorm2d (F.batch_norm, eval stats)
def test_amp_backbone_runs_in_bfloat16_and_returns_float32(mode):
    torch.manual_seed(0)
    agent = probe.Agent(7, tiny_args(mode=mode, amp=True))
    obs = torch.randint(0, 256, (4, 3, 16, 16, 3), dtype=torch.uint8)
    conv_outputs = []
    agent.backbone.conv1.register_forward_hook(lambda module, inputs, output: conv_outputs.append(output.dtype))
    agent.train()

    features = agent.features(obs)
    _, logprob, entropy, value = agent.get_action_and_value(obs, torch.arange(4))
    (logprob.sum() + value.sum()).backward()

    assert conv_outputs == [torch.bfloat16, torch.bfloat16]
    assert features.dtype == logprob.dtype == entropy.dtype == value.dtype == torch.float32
    assert features.shape == (4, 3 * 256)
    assert all(p.grad.dtype == torch.float32 for p in agent.parameters() if p.grad is not None)
    for name, buf in agent.named_buffers():  # running statistics stay float32
        assert buf.dtype in (torch.float32, torch.long), name


# ----------------------------------------------------------------------------------------------------------------------
# the pieces


def test_ppo_update_charges_the_trust_region_diagnostics_to_their_section(monkeypatch):
    torch.manual_seed(0)
    args = tiny_args(mode="bn")
    agent = probe.Agent(7, args)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    batch = {
        "obs": torch.randint(0, 256, (8, 3, 16, 16, 3), dtype=torch.uint8),
        "actions": torch.randint(0, 7, (8,)),
        "logprobs": torch.full((8,), -math.log(7)),
        "advantages": torch.randn(8),
        "returns": torch.randn(8),
        "values": torch.zeros(8),
    }
    opened = []

    def timer(section):
        opened.append(section)
        return contextlib.nullcontext()

    agent.train()
    stats = probe.ppo_update(agent, optimizer, batch, torch.arange(8), args, True, timer)
    assert opened == ["diagnostics"] and "ratio_gap" in stats
    probe.ppo_update(agent, optimizer, batch, torch.arange(8), args, False, timer)
    assert opened == ["diagnostics"]  # not measured: no section opened
    off = probe.SectionTimer(False, torch.device("cpu"))
    assert "ratio_gap" in probe.ppo_update(agent, optimizer, batch, torch.arange(8), args, True, off)  # timing off: fine


def test_features_convert_in_place_without_changing_values():
    obs = torch.randint(0, 256, (4, 3, 16, 16, 3), dtype=torch.uint8)
    torch.manual_seed(0)
    agent = probe.Agent(7, tiny_args())
    agent.eval()
    captured = []
    agent.backbone.conv1.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))

    with torch.no_grad():
        agent.features(obs)

    assert torch.equal(captured[0], obs.reshape(12, 16, 16, 3).permute(0, 3, 1, 2).float() / 255.0)  # views stacked
    assert captured[0].is_contiguous(memory_format=torch.channels_last)  # NHWC observations: channels_last activations
