"""Speed flags of ppo_procgen_mdr.py (--channels-last, --amp, --compile, --torch-threads,
diagnostics off): each one on vs off on CPU, comparing the final parameters of tiny in-process runs;
plus the pieces behind them.

No timing assertions: what is measured lives in benchmarks/bench_sps.py and docs/benchmarks.md."""

import contextlib
import io
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_procgen_mdr as ppo

NUM_ACTIONS = 15


def tiny_args(**overrides) -> ppo.Args:
    """Two iterations of 2 envs x 8 steps (2 minibatches of 8 per epoch), CPU, random init,
    checkpoint at the end."""
    fields = dict(
        num_envs=2,
        num_steps=8,
        minibatch_size=8,
        total_timesteps=32,
        num_eval_envs=2,
        eval_interval=0,
        pretrained=False,
        cuda=False,
        save_model=True,
    )
    return ppo.Args(**{**fields, **overrides})


def run_main(cwd, monkeypatch, **overrides):
    """main() in `cwd` with the held-out evaluation stubbed out; returns (agent state, TensorBoard
    scalars, stdout)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(
        ppo, "evaluate", lambda agent, args, device, iteration: np.zeros(args.num_eval_envs)
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert ppo.main(tiny_args(**overrides)) == 0
    (run_dir,) = list(Path(cwd, "runs").iterdir())
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {
        tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }
    return checkpoint["agent"], scalars, stdout.getvalue()


def differing(a: dict, b: dict) -> list:
    return [name for name in a if not torch.equal(a[name], b[name])]


def distance(a: dict, b: dict) -> float:
    """Euclidean distance between two states over their floating-point parameters and running
    statistics."""
    return math.sqrt(
        sum(
            ((a[k].double() - b[k].double()) ** 2).sum().item()
            for k in a
            if a[k].is_floating_point()
        )
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The default tiny run (every flag at its default); shared by the comparisons below."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_main(tmp_path_factory.mktemp("reference"), monkeypatch)


# --------------------------------------------------------------------------------------------------
# flags that change nothing on CPU: bitwise the same parameters


@pytest.mark.parametrize(
    "overrides",
    [
        dict(channels_last=False),  # a CUDA-only fast path: a no-op on CPU
        dict(
            diag_minibatches=-1, diag_ratio_every=0
        ),  # diagnostics off: they never touch the training
        dict(diag_minibatches=0, diag_ratio_every=1),  # ... nor when they measure everything
    ],
    ids=["no-channels-last", "diagnostics-off", "diagnostics-all"],
)
def test_flag_leaves_the_training_bitwise_unchanged(overrides, reference, tmp_path, monkeypatch):
    agent, _, _ = run_main(tmp_path, monkeypatch, **overrides)

    assert differing(reference[0], agent) == []


def test_reference_run_differs_from_a_different_seed(reference, tmp_path, monkeypatch):
    # the bitwise comparisons above are meaningful: another seed gives other parameters
    agent, _, _ = run_main(tmp_path, monkeypatch, seed=2)

    assert differing(reference[0], agent)


def test_diagnostics_off_logs_no_diagnostics(reference, tmp_path, monkeypatch):
    _, scalars, stdout = run_main(tmp_path, monkeypatch, diag_minibatches=-1, diag_ratio_every=0)

    diagnostics = (
        "charts/delta_pi_minus",
        "charts/delta_pi_plus",
        "mdr/ratio_gap",
        "mdr/trust_region_violation",
    )
    for key in (*diagnostics, "mdr/trust_region_violation_signed"):
        assert key in reference[1]
        assert key not in scalars
    # the progress line leaves it out
    assert "delta_pi_minus=" in reference[2] and "delta_pi_minus=" not in stdout
    assert "losses/policy_loss" in scalars


# --------------------------------------------------------------------------------------------------
# flags that change the arithmetic (rounding, or bfloat16): compared on a single Adam step, where
# two runs can be compared at all (over several steps Adam turns rounding-level gradient differences
# into lr-sized ones: even 1 vs 2 threads then differ by ~40 % of the distance trained)

ONE_STEP = dict(
    total_timesteps=16,
    minibatch_size=16,
    update_epochs=1,
    alpha2=0,
    diag_minibatches=-1,
    diag_ratio_every=0,
)


def update_cosine(a: dict, b: dict) -> float:
    """Cosine between the parameter updates (from the common initial parameters) of two runs."""
    torch.manual_seed(tiny_args().seed)  # as main() does right before it builds the agent
    initial = ppo.Agent(NUM_ACTIONS, tiny_args()).state_dict()
    names = [
        name
        for name, tensor in initial.items()
        if tensor.is_floating_point() and "running" not in name
    ]
    delta_a = torch.cat([(a[name] - initial[name]).double().flatten() for name in names])
    delta_b = torch.cat([(b[name] - initial[name]).double().flatten() for name in names])
    return float(delta_a @ delta_b / (delta_a.norm() * delta_b.norm()))


@pytest.fixture(scope="module")
def one_step_reference(tmp_path_factory):
    """One rollout and one Adam step (one epoch of one minibatch), float32, eager, torch's default
    threads."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_main(tmp_path_factory.mktemp("one_step"), monkeypatch, **ONE_STEP)[0]


def test_one_step_reference_moved_from_the_initial_parameters(one_step_reference):
    torch.manual_seed(tiny_args().seed)
    initial = ppo.Agent(NUM_ACTIONS, tiny_args()).state_dict()
    # the cosines below compare real updates
    assert "actor.4.weight" in differing(initial, one_step_reference)


def test_amp_on_cpu_trains_like_float32(one_step_reference, tmp_path, monkeypatch):
    """--amp on CPU is bfloat16 autocast of the backbone (our choice: a real fast path on CPUs with
    bf16 units, 1.8x here). It must really differ (autocast active) and update the parameters in
    nearly the same direction."""
    agent, scalars, _ = run_main(tmp_path, monkeypatch, amp=True, **ONE_STEP)

    assert differing(one_step_reference, agent), "--amp changed nothing: autocast is not active"
    assert update_cosine(agent, one_step_reference) > 0.8  # measured 0.94
    assert np.isfinite(scalars["losses/policy_loss"]).all()


def test_compile_matches_eager(one_step_reference, tmp_path, monkeypatch):
    """--compile (torch.compile of the backbone, which runs on CPU here) computes the same function
    up to float reassociation. Plain PPO with the diagnostics off keeps the compiles to two graphs
    (rollout, train-mode update)."""
    torch._dynamo.reset()
    try:
        compiled, _, _ = run_main(tmp_path, monkeypatch, compile=True, **ONE_STEP)
    finally:
        torch._dynamo.reset()

    # compiled in place: checkpoints load either way
    assert compiled.keys() == one_step_reference.keys()
    assert update_cosine(compiled, one_step_reference) > 0.999
    for name in compiled:  # the first Adam step moves each weight by at most ~lr = 5e-4
        torch.testing.assert_close(
            compiled[name], one_step_reference[name], rtol=0, atol=1.1e-3, msg=name
        )


def test_torch_threads_sets_the_intra_op_threads(one_step_reference, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        agent, _, _ = run_main(tmp_path, monkeypatch, torch_threads=1, **ONE_STEP)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    # another split of the reductions: rounding only
    assert update_cosine(agent, one_step_reference) > 0.999


@pytest.mark.parametrize("norm", ["bn", "brn", "ln", "dropout"])
def test_amp_backbone_runs_in_bfloat16_and_returns_float32(norm):
    torch.manual_seed(0)
    agent = ppo.Agent(NUM_ACTIONS, tiny_args(norm=norm, amp=True))
    obs = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    conv_outputs = []
    agent.backbone.conv1.register_forward_hook(
        lambda module, inputs, output: conv_outputs.append(output.dtype)
    )
    agent.train()

    _, logprob, entropy, value = agent.get_action_and_value(obs, torch.arange(8))
    (logprob.sum() + value.sum()).backward()

    assert conv_outputs == [torch.bfloat16]
    assert logprob.dtype == entropy.dtype == value.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in agent.parameters() if p.grad is not None)
    for name, buf in agent.named_buffers():  # running statistics stay float32
        assert buf.dtype in (torch.float32, torch.long), name


# --------------------------------------------------------------------------------------------------
# the pieces


def test_features_convert_in_place_without_changing_values():
    obs = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    torch.manual_seed(0)
    agent = ppo.Agent(NUM_ACTIONS, tiny_args())
    agent.eval()
    captured = []
    agent.backbone.conv1.register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0])
    )

    with torch.no_grad():
        agent.features(obs)

    assert torch.equal(captured[0], obs.permute(0, 3, 1, 2).float() / 255.0)
    # NHWC observations: channels_last activations
    assert captured[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(diag_minibatches=-2), "--diag-minibatches -2 >= -1"),
        (dict(torch_threads=-1), "--torch-threads -1: must be a finite number in [0, "),
    ],
)
def test_validate_args_rejects_bad_speed_settings(overrides, message):
    with pytest.raises(ppo.ConfigError) as error:
        ppo.validate_args(tiny_args(**overrides))
    assert message in str(error.value)


def resume_from_fake_checkpoint(tmp_path, saved_args, args: ppo.Args):
    """find_checkpoint on a file with what it checks: the required keys and the run's arguments."""
    path = tmp_path / "checkpoint.pt"
    contents = {key: {} for key in ("agent", "optimizer", "rng", "env")}
    torch.save(
        {**contents, "global_step": 0, "iteration": 1, "run_name": "x", "args": saved_args}, path
    )
    args.resume = str(path)
    return ppo.find_checkpoint(args, str(tmp_path / "runs" / "x"))


def test_resume_accepts_other_speed_flags_and_rejects_amp(tmp_path):
    speed_flags = tiny_args(torch_threads=1, compile=True, channels_last=False)
    # accepted
    checkpoint, run_dir = resume_from_fake_checkpoint(tmp_path, asdict(tiny_args()), speed_flags)
    assert checkpoint["iteration"] == 1 and run_dir == "runs/x"

    with pytest.raises(ppo.ConfigError) as error:
        # bfloat16 changes what is computed
        resume_from_fake_checkpoint(tmp_path, asdict(tiny_args()), tiny_args(amp=True))
    assert "the run used different --amp" in str(error.value)


def test_resume_of_a_checkpoint_older_than_a_field_uses_its_default(tmp_path):
    older = {
        key: value
        for key, value in asdict(tiny_args()).items()
        if key not in ("amp", "compile", "collect_mode")
    }

    resume_from_fake_checkpoint(tmp_path, older, tiny_args())  # no "the run used different --amp"
    with pytest.raises(ppo.ConfigError) as error:
        resume_from_fake_checkpoint(tmp_path, older, tiny_args(collect_mode="train"))
    assert "--collect-mode" in str(error.value)
