"""The CUDA code paths of the scripts, which no CPU run takes: fused Adam (all three), channels_last
weights (the two training scripts; the probe has no speed flags), bfloat16 autocast on the GPU and
torch.compile there. Each is compared with its plain counterpart on the same GPU, and tiny main()
runs check that the scripts really take these paths.

Marked `cuda` (benchmarks/gpu_check.sh runs `pytest -m cuda` on a lent GPU machine) and skipped
without a GPU."""

import contextlib
import copy
import io
from pathlib import Path

import pytest
import torch

import ppo_collapse_probe
import ppo_patchloc_mdr
import ppo_procgen_mdr

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these)",
    ),
]

CUDA = torch.device("cuda")
NUM_PROCGEN_ACTIONS = 15
# relative errors allowed between two float32 code paths of the same function; the gradient's is
# larger because the backward through BatchNorm's statistics of a 16-sample batch amplifies
# reassociation (compile vs eager: 0.7 % on CPU)
ROUNDING = {"logits": 1e-3, "value": 1e-3, "running_mean": 1e-3, "gradient": 2e-2}
# tiny configurations as in tests/test_perf_flags*.py, run on CUDA: (module, fields, conv weights in
# channels_last)
MAIN_RUNS = {
    "procgen": (
        ppo_procgen_mdr,
        dict(
            num_envs=2,
            num_steps=16,
            minibatch_size=16,
            total_timesteps=64,
            num_eval_envs=2,
            eval_interval=0,
        ),
        True,
    ),
    "patchloc": (
        ppo_patchloc_mdr,
        dict(
            num_envs=2,
            num_steps=16,
            minibatch_size=16,
            total_timesteps=64,
            num_tasks=4,
            num_test_tasks=4,
            view_size=16,
            image_size=64,
            num_eval_envs=2,
            num_render_episodes=0,
            hidden_size=32,
            mdr_rounds=2,
            eval_interval=0,
        ),
        True,
    ),
    "probe": (
        ppo_collapse_probe,
        dict(
            num_envs=2,
            num_steps=8,
            minibatch_size=8,
            total_timesteps=32,
            view_size=16,
            image_size=64,
            hidden_size=32,
        ),
        False,
    ),
}


@pytest.fixture
def ieee_float32():
    """cuDNN convolutions in full float32 (PyTorch lets them use TF32 by default), so that two code
    paths of the same function agree to float32 rounding rather than to TF32's 10-bit mantissa."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|, and 0 where both are zero (eval mode leaves the running statistics at their
    initial zeros)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def procgen_agent(**overrides) -> ppo_procgen_mdr.Agent:
    torch.manual_seed(0)
    return ppo_procgen_mdr.Agent(
        NUM_PROCGEN_ACTIONS, ppo_procgen_mdr.Args(pretrained=False, **overrides)
    ).to(CUDA)


def passes(agent, training: bool, batch: int = 16) -> dict:
    """One forward and backward pass as in an update (random uint8 observations, seeded): logits,
    value, gradient."""
    generator = torch.Generator(device=CUDA).manual_seed(1)
    obs = torch.randint(
        0, 256, (batch, 64, 64, 3), dtype=torch.uint8, device=CUDA, generator=generator
    )
    actions = torch.randint(0, NUM_PROCGEN_ACTIONS, (batch,), device=CUDA, generator=generator)
    agent.train(training)
    agent.zero_grad(set_to_none=True)
    policy, value = agent.get_policy_and_value(obs)
    (policy.log_prob(actions).sum() + value.sum()).backward()
    return {
        "logits": policy.logits.detach(),
        "value": value.detach(),
        "gradient": torch.cat([p.grad.flatten() for p in agent.parameters() if p.grad is not None]),
        "running_mean": agent.backbone.bn1.running_mean.clone(),
    }


@pytest.mark.parametrize("script", MAIN_RUNS)
def test_main_on_cuda_trains_with_fused_adam_and_channels_last_weights(
    script, tmp_path, monkeypatch
):
    module, fields, channels_last = MAIN_RUNS[script]
    optimizers = []

    class RecordedAdam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.initial = [
                p.detach().clone() for group in self.param_groups for p in group["params"]
            ]
            optimizers.append(self)

    monkeypatch.setattr(torch.optim, "Adam", RecordedAdam)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert module.main(module.Args(**fields, pretrained=False, cuda=True)) in (0, None)
    finally:
        torch.set_num_threads(threads)  # the probe sets one thread

    (optimizer,) = optimizers
    assert optimizer.defaults["fused"] is True
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p.is_cuda and torch.isfinite(p).all() for p in parameters)
    # Adam stepped
    assert any(not torch.equal(p, initial) for p, initial in zip(parameters, optimizer.initial))
    conv_weights = [p for p in parameters if p.dim() == 4 and p.shape[-1] > 1]
    assert conv_weights and all(
        p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in conv_weights
    )
    assert (Path(tmp_path) / "runs").is_dir()


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_channels_last_weights_compute_what_contiguous_ones_do(training, ieee_float32):
    contiguous = procgen_agent()
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    assert channels_last.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)

    expected, got = passes(contiguous, training), passes(channels_last, training)

    for key, tolerance in ROUNDING.items():
        assert relative_error(got[key], expected[key]) < tolerance, key


def test_amp_on_cuda_runs_the_backbone_in_bfloat16_close_to_float32():
    float32 = procgen_agent()
    amp = procgen_agent(amp=True)
    amp.load_state_dict(float32.state_dict())
    conv_outputs = []
    amp.backbone.conv1.register_forward_hook(
        lambda module, inputs, output: conv_outputs.append(output.dtype)
    )

    expected, got = passes(float32, True), passes(amp, True)

    assert conv_outputs == [torch.bfloat16]
    assert got["logits"].dtype == got["value"].dtype == torch.float32
    assert relative_error(got["value"], expected["value"]) < 0.05
    assert relative_error(got["logits"], expected["logits"]) < 0.05
    cosine = torch.nn.functional.cosine_similarity(
        got["gradient"].double(), expected["gradient"].double(), dim=0
    )
    # bfloat16 keeps 8 bits of mantissa: the same direction, not the same digits
    assert cosine > 0.9


def test_compile_on_cuda_matches_eager(ieee_float32):
    eager = procgen_agent()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    try:
        compiled.backbone.compile(dynamic=False)
        expected, got = passes(eager, True), passes(compiled, True)
    finally:
        torch._dynamo.reset()

    for key, tolerance in ROUNDING.items():  # float reassociation in the fused kernels only
        assert relative_error(got[key], expected[key]) < tolerance, key
