"""Speed flags of ppo_patchloc_mdr.py (--channels-last, --amp, --compile, --torch-threads,
diagnostics off): each one on vs off on CPU, comparing the final parameters of tiny in-process runs;
plus the pieces behind them. The same flags as ppo_procgen_mdr.py (tests/test_perf_flags.py), on the
patch-localization configuration of tests/test_patchloc.py (16-pixel views, 4 + 4 procedural tasks,
hidden width 32, random init).

No timing assertions: what is measured lives in benchmarks/ and docs/benchmarks.md."""

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_patchloc_mdr as ppo

NUM_ACTIONS = 7
V = 16  # view side; the images are 4V = 64 pixels


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread (as tests/test_patchloc.py: two oversubscribe a small shared machine),
    restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_args(**overrides) -> ppo.Args:
    """Two iterations of 2 envs x 16 steps, MDR(2,1) x 2 rounds (2 minibatches of 16 per epoch,
    values recomputed before round 2), held-out evaluation and one drawn episode at the end, CPU,
    random init, checkpoint at the end."""
    fields = dict(
        num_envs=2,
        num_steps=16,
        minibatch_size=16,
        total_timesteps=64,
        num_tasks=4,
        num_test_tasks=4,
        view_size=V,
        image_size=4 * V,
        num_eval_envs=2,
        num_render_episodes=1,
        hidden_size=32,
        mdr_rounds=2,
        eval_interval=0,
        pretrained=False,
        cuda=False,
        save_model=True,
    )
    return ppo.Args(**{**fields, **overrides})


def run_main(cwd, monkeypatch, **overrides):
    """main() in `cwd`; returns (agent state, TensorBoard scalars, stdout, checkpoint path)."""
    monkeypatch.chdir(cwd)
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
    return checkpoint["agent"], scalars, stdout.getvalue(), run_dir / "checkpoint.pt"


def differing(a: dict, b: dict) -> list:
    return [name for name in a if not torch.equal(a[name], b[name])]


def assert_trained_identically(run, reference):
    """Bitwise the same final parameters and buffers, and the same logged losses at every
    iteration."""
    assert differing(reference[0], run[0]) == []
    losses = {key: values for key, values in reference[1].items() if key.startswith("losses/")}
    assert {key: run[1][key] for key in losses} == losses


def random_obs(n=8, seed=0) -> torch.Tensor:
    """uint8 (n, 3 views, V, V, 3), as the env returns."""
    return torch.randint(
        0, 256, (n, 3, V, V, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The default tiny run (every speed and diagnostics flag at its default); shared by the
    comparisons below."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_main(tmp_path_factory.mktemp("reference"), monkeypatch)


@pytest.fixture(scope="module")
def diagnostics_off(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_main(
            tmp_path_factory.mktemp("diagnostics_off"),
            monkeypatch,
            diag_minibatches=-1,
            diag_ratio_every=0,
        )


# --------------------------------------------------------------------------------------------------
# flags that change nothing on CPU: bitwise the same parameters


def test_no_channels_last_and_diagnostics_everywhere_leave_the_training_bitwise_unchanged(
    reference, tmp_path, monkeypatch
):
    # --no-channels-last: channels_last is a CUDA-only fast path, a no-op on CPU; Delta pi over all
    # of D_k and the ratio gap on every standard-phase minibatch never touch the training either
    # (one run for both: neither can undo the other)
    run = run_main(
        tmp_path, monkeypatch, channels_last=False, diag_minibatches=0, diag_ratio_every=1
    )
    assert_trained_identically(run, reference)


def test_diagnostics_off_leaves_the_training_bitwise_unchanged(reference, diagnostics_off):
    assert_trained_identically(diagnostics_off, reference)  # the diagnostics have no side effect


def test_reference_run_differs_from_a_different_seed(reference, tmp_path, monkeypatch):
    # the bitwise comparisons above are meaningful: another seed gives other parameters and losses
    agent, scalars, _, _ = run_main(tmp_path, monkeypatch, seed=2)

    assert differing(reference[0], agent)
    assert scalars["losses/policy_loss"] != reference[1]["losses/policy_loss"]


def test_diagnostics_off_logs_no_diagnostics(reference, diagnostics_off):
    _, scalars, stdout, _ = diagnostics_off

    diagnostics = (
        "charts/delta_pi_minus",
        "charts/delta_pi_plus",
        "mdr/ratio_gap",
        "mdr/trust_region_violation",
    )
    for key in (*diagnostics, "mdr/trust_region_violation_signed"):
        # the defaults measure them (1 minibatch; every 8th standard-phase minibatch)
        assert key in reference[1]
        assert key not in scalars
    progress = [line for line in stdout.splitlines() if line.startswith("iteration=")]
    assert len(progress) == 2 and not [line for line in progress if "delta_pi_minus" in line]
    assert "delta_pi_minus=" in reference[2]
    assert "losses/policy_loss" in scalars


def test_policy_mismatch_off_returns_none_and_touches_nothing():
    torch.manual_seed(0)
    agent = ppo.Agent(NUM_ACTIONS, tiny_args()).train()
    before = {name: tensor.clone() for name, tensor in agent.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    generator_state, rng_state = generator.get_state(), torch.get_rng_state()

    assert ppo.policy_mismatch(agent, random_obs(8), 4, -1, generator) is None

    assert differing(before, agent.state_dict()) == [] and agent.training
    assert torch.equal(generator.get_state(), generator_state) and torch.equal(
        torch.get_rng_state(), rng_state
    )


# --------------------------------------------------------------------------------------------------
# flags that change the arithmetic (rounding, or bfloat16): compared on a single Adam step, where
# two runs can be compared at all (over several steps Adam turns rounding-level gradient differences
# into lr-sized ones). One backbone pass over all views (--view-batching joint): with separate
# passes, the target and overview batches of this tiny rollout hold only its 4 tasks' images, whose
# small batch std magnifies bfloat16 rounding (update cosine of --amp measured 0.46, -0.02, 0.62 for
# seeds 1-3, against 0.88, 0.88, 0.78 joint); the gradient test below covers separate passes.

ONE_STEP = dict(
    view_batching="joint",
    total_timesteps=32,
    minibatch_size=32,
    update_epochs=1,
    alpha2=0,
    mdr_rounds=1,
    diag_minibatches=-1,
    diag_ratio_every=0,
    num_render_episodes=0,
)


def initial_state() -> dict:
    # as main() does before it builds the agent (the task sets draw from numpy)
    torch.manual_seed(tiny_args().seed)
    return ppo.Agent(NUM_ACTIONS, tiny_args()).state_dict()


def moved_by_adam(state: dict) -> list:
    """Names of the entries the optimizer updates: floating-point, not running statistics."""
    return [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and "running" not in name
    ]


def update_cosine(a: dict, b: dict) -> float:
    """Cosine between the parameter updates (from the common initial parameters) of two runs."""
    initial = initial_state()
    names = moved_by_adam(initial)
    delta_a = torch.cat([(a[name] - initial[name]).double().flatten() for name in names])
    delta_b = torch.cat([(b[name] - initial[name]).double().flatten() for name in names])
    return float(delta_a @ delta_b / (delta_a.norm() * delta_b.norm()))


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """One rollout and one Adam step (one epoch of one minibatch), float32, eager, one thread."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_main(tmp_path_factory.mktemp("one_step"), monkeypatch, **ONE_STEP)


@pytest.fixture(scope="module")
def one_step_reference(one_step_run):
    """The final agent state of one_step_run."""
    return one_step_run[0]


def test_one_step_reference_is_one_adam_step_from_the_initial_parameters(one_step_reference):
    """initial_state() is the run's real starting point (so the cosines below compare real updates):
    one Adam step moves every parameter by at most lr, and moves the actor's output layer."""
    initial = initial_state()
    lr = tiny_args().learning_rate
    for name in moved_by_adam(initial):
        assert (one_step_reference[name] - initial[name]).abs().max() <= lr * 1.001, name
    assert "actor.4.weight" in differing(initial, one_step_reference)


def test_amp_on_cpu_trains_like_float32(one_step_run, one_step_reference, tmp_path, monkeypatch):
    """--amp on CPU is bfloat16 autocast of the backbone. It must really differ (autocast active),
    compute nearly the same losses, and update the parameters in the same direction. Adam's first
    step is ~lr * sign(gradient), so the many near-zero gradients of this tiny network flip sign
    under bfloat16 rounding: the update cosine is lower than the gradient cosine of the test below
    (measured 0.80 vs 0.94)."""
    agent, scalars, _, _ = run_main(tmp_path, monkeypatch, amp=True, **ONE_STEP)
    reference_scalars = one_step_run[1]

    assert differing(one_step_reference, agent), "--amp changed nothing: autocast is not active"
    assert update_cosine(agent, one_step_reference) > 0.6
    for key in ("losses/value_loss", "losses/entropy"):  # measured within 0.5 %
        np.testing.assert_allclose(scalars[key], reference_scalars[key], rtol=0.02, err_msg=key)
    assert np.isfinite(scalars["losses/policy_loss"]).all()


@pytest.mark.parametrize("norm", ["bn", "brn"])
def test_amp_gradient_is_close_to_float32(norm):
    """The same agent, minibatch and loss in train mode, with and without bfloat16 autocast of the
    backbone."""
    torch.manual_seed(0)
    agent = ppo.Agent(NUM_ACTIONS, tiny_args(norm=norm)).train()
    obs, actions = random_obs(32, seed=1), torch.arange(32) % NUM_ACTIONS
    before = {name: tensor.clone() for name, tensor in agent.state_dict().items()}
    gradients = []
    for amp in (False, True):
        # the same running statistics (and Batch Renorm warm-up) for both passes
        agent.load_state_dict(before)
        agent.amp = amp
        agent.zero_grad()
        _, logprob, _, value = agent.get_action_and_value(obs, actions)
        (logprob.sum() + value.sum()).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in agent.parameters()]).double())

    cosine = float(gradients[0] @ gradients[1] / (gradients[0].norm() * gradients[1].norm()))
    # measured 0.94 (bn and brn); 1.0 would mean autocast was not active
    assert 0.9 < cosine < 1.0, cosine


def test_compile_matches_eager(one_step_reference, tmp_path, monkeypatch):
    """--compile (torch.compile of the backbone, which runs on CPU here) computes the same function
    up to float reassociation. One update, diagnostics and drawing off: two graphs (eval-mode batch
    of 2 envs for the rollout and the evaluation, train-mode minibatch)."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        compiled, _, _, _ = run_main(tmp_path, monkeypatch, compile=True, **ONE_STEP)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()

    assert graphs >= 1, "nothing was compiled"  # measured 2
    # compiled in place: checkpoints load either way
    assert compiled.keys() == one_step_reference.keys()
    assert update_cosine(compiled, one_step_reference) > 0.999
    # each run moved each weight by at most lr from the same start
    atol = 2.2 * tiny_args().learning_rate
    for name in compiled:
        torch.testing.assert_close(
            compiled[name], one_step_reference[name], rtol=0, atol=atol, msg=name
        )


def test_torch_threads_sets_the_intra_op_threads(one_step_reference, tmp_path, monkeypatch):
    # (two threads would oversubscribe this machine's cores: the run itself uses one)
    torch.set_num_threads(2)
    try:
        agent, _, _, _ = run_main(tmp_path, monkeypatch, torch_threads=1, **ONE_STEP)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)  # the module's setting
    assert differing(one_step_reference, agent) == []  # the reference ran with one thread too


@pytest.mark.parametrize("norm", ["bn", "brn", "ln", "dropout"])
def test_amp_backbone_runs_in_bfloat16_and_returns_float32(norm):
    torch.manual_seed(0)
    agent = ppo.Agent(NUM_ACTIONS, tiny_args(norm=norm, amp=True))
    conv_outputs = []
    agent.backbone.conv1.register_forward_hook(
        lambda module, inputs, output: conv_outputs.append(output.dtype)
    )
    agent.train()

    _, logprob, entropy, value = agent.get_action_and_value(
        random_obs(), torch.arange(8) % NUM_ACTIONS
    )
    (logprob.sum() + value.sum()).backward()

    # one backbone pass per view (--view-batching separate), in bfloat16
    assert conv_outputs == [torch.bfloat16] * 3
    assert logprob.dtype == entropy.dtype == value.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in agent.parameters() if p.grad is not None)
    for name, buf in agent.named_buffers():  # running statistics stay float32
        assert buf.dtype in (torch.float32, torch.long), name


# --------------------------------------------------------------------------------------------------
# the pieces


@pytest.mark.parametrize("view_batching", ["separate", "joint"])
def test_features_convert_in_place_without_changing_values(view_batching):
    obs = random_obs(4)
    torch.manual_seed(0)
    agent = ppo.Agent(NUM_ACTIONS, tiny_args(view_batching=view_batching))
    agent.eval()
    captured = []
    agent.backbone.conv1.register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0])
    )

    with torch.no_grad():
        agent.features(obs)

    if view_batching == "joint":
        assert torch.equal(
            captured[0], obs.reshape(12, V, V, 3).permute(0, 3, 1, 2).float() / 255.0
        )
        # NHWC observations: channels_last activations
        assert captured[0].is_contiguous(memory_format=torch.channels_last)
    # three passes over views of one float copy of the minibatch, each channels_last within its
    # images
    else:
        assert len(captured) == 3
        for v, images in enumerate(captured):
            assert torch.equal(images, obs[:, v].permute(0, 3, 1, 2).float() / 255.0)
            assert images.untyped_storage().data_ptr() == captured[0].untyped_storage().data_ptr()
            assert images.stride()[1:] == (1, V * 3, 3)


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
    assert message in str(error.value) and "\n" not in str(error.value)


def test_validate_args_accepts_diagnostics_off():
    ppo.validate_args(tiny_args(diag_minibatches=-1, diag_ratio_every=0))


def find_checkpoint(path, **overrides):
    """find_checkpoint as main() calls it for --resume PATH (--batch-size filled in); returns the
    checkpoint."""
    args = tiny_args(resume=str(path), **overrides)
    args.batch_size = args.num_envs * args.num_steps
    checkpoint, run_dir = ppo.find_checkpoint(args, "runs/unused")
    # the checkpoint's run folder, not the default one
    assert run_dir == str(Path("runs", checkpoint["run_name"]))
    return checkpoint


def test_resume_accepts_other_speed_flags_and_rejects_amp(reference):
    path = reference[3]  # a checkpoint written by main()

    find_checkpoint(path, torch_threads=1, compile=True, channels_last=False)  # accepted
    with pytest.raises(ppo.ConfigError) as error:
        find_checkpoint(path, amp=True)  # bfloat16 changes what is computed
    assert "--amp" in str(error.value) and "\n" not in str(error.value)


def test_resume_of_a_checkpoint_older_than_a_field_uses_its_default(reference, tmp_path):
    checkpoint = torch.load(reference[3], map_location="cpu", weights_only=True)
    newer_fields = (
        "channels_last",
        "amp",
        "compile",
        "torch_threads",
        "view_batching",
        "collect_mode",
        "bn_recalibrate",
    )
    checkpoint["args"] = {
        key: value for key, value in checkpoint["args"].items() if key not in newer_fields
    }
    torch.save(checkpoint, tmp_path / "older.pt")

    find_checkpoint(tmp_path / "older.pt")  # no "the run used different --amp"
    with pytest.raises(ppo.ConfigError, match="--amp"):
        # the missing field counts as its default, False
        find_checkpoint(tmp_path / "older.pt", amp=True)
    with pytest.raises(ppo.ConfigError, match="--view-batching"):
        find_checkpoint(tmp_path / "older.pt", view_batching="joint")


def test_defaults_keep_the_diagnostics_cheap():
    """Defaults as in ppo_procgen_mdr.py: Delta pi on one minibatch, the ratio gap on every 8th
    standard-phase one."""
    args = ppo.Args()
    assert (args.diag_minibatches, args.diag_ratio_every) == (1, 8)
    assert (args.channels_last, args.amp, args.compile, args.torch_threads) == (
        True,
        False,
        False,
        0,
    )
    assert {"channels_last", "compile", "torch_threads"} <= set(ppo.RESUMABLE_FIELDS)
    assert not {"amp", "view_batching", "collect_mode", "bn_recalibrate"} & set(
        ppo.RESUMABLE_FIELDS
    )
