"""--evaluate PATH [--capture-video] of the two training scripts (issue 14): the checkpoint's agent
on the run's own held-out levels / tasks, scores printed and written as evaluation-N.json beside the
checkpoint (issue 27: N the first free, an earlier evaluation is never overwritten), the first
held-out episode as eval_video-N.gif; bad checkpoints are a one-line error. Tiny in-process runs."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_patchloc_mdr as patchloc
import ppo_procgen_mdr as procgen

PROCGEN = dict(
    env_id="coinrun",
    num_envs=2,
    num_steps=16,
    minibatch_size=16,
    total_timesteps=32,
    num_eval_envs=2,
)
PROCGEN.update(eval_interval=0, pretrained=False, cuda=False, save_model=True, run_name="trained")
PATCHLOC = dict(
    num_tasks=4,
    num_test_tasks=3,
    view_size=16,
    num_envs=2,
    num_steps=8,
    minibatch_size=8,
    total_timesteps=16,
)
PATCHLOC.update(
    num_eval_envs=2,
    hidden_size=32,
    pretrained=False,
    cuda=False,
    num_render_episodes=0,
    mdr_rounds=1,
)
PATCHLOC.update(eval_interval=0, max_episode_steps=6, save_model=True, run_name="trained")


def quiet(fn, *args):
    """fn(*args) with stdout captured; returns (result, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        result = fn(*args)
    return result, out.getvalue()


@pytest.fixture(scope="module", params=["procgen", "patchloc"])
def trained(request, tmp_path_factory):
    """(script module, its training fields, the folder) after a tiny training run that saved a
    checkpoint."""
    script, fields = (procgen, PROCGEN) if request.param == "procgen" else (patchloc, PATCHLOC)
    folder = tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert quiet(script.main, script.Args(**fields))[0] == 0
    return script, fields, folder


def test_evaluate_writes_the_scores_of_the_checkpoint_and_its_video(trained, monkeypatch):
    script, fields, folder = trained
    monkeypatch.chdir(folder)
    checkpoint = folder / "runs" / "trained" / "checkpoint.pt"
    evaluation = {"num_eval_envs": 3, "cuda": False}

    exit_code, stdout = quiet(
        script.main, script.Args(evaluate=str(checkpoint), capture_video=True, **evaluation)
    )

    assert exit_code == 0
    assert stdout.startswith(f"evaluating {checkpoint} (iteration ")  # what, before it runs
    assert "-> evaluation-1.json" in stdout.splitlines()[0]
    result = json.loads((checkpoint.parent / "evaluation-1.json").read_text())
    assert result["num_eval_envs"] == 3  # set by this command
    iterations = fields["total_timesteps"] // (fields["num_envs"] * fields["num_steps"])
    assert (result["iteration"], result["global_step"]) == (iterations, fields["total_timesteps"])
    assert result["checkpoint"] == str(checkpoint)
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert printed == {key: value for key, value in result.items() if not isinstance(value, list)}
    assert np.isfinite(result["charts/test_episodic_return"])
    video = Image.open(checkpoint.parent / "eval_video-1.gif")
    assert video.n_frames >= 2  # the first held-out episode, step by step
    events = EventAccumulator(str(checkpoint.parent), size_guidance={"images": 0})
    events.Reload()
    # the same GIF, animated in TensorBoard's image panel
    assert "eval/test_video" in events.Tags()["images"]
    (shown,) = events.Images("eval/test_video")
    assert (
        shown.encoded_image_string[:6] in (b"GIF87a", b"GIF89a")
        and shown.step == fields["total_timesteps"]
    )
    assert not (folder / "runs" / "trained" / "events.out.tfevents.x").exists()
    # the evaluation is a function of the checkpoint: a second call gives the same scores, in a
    # file of its own
    first = (checkpoint.parent / "evaluation-1.json").read_bytes()
    exit_code, _ = quiet(script.main, script.Args(evaluate=str(checkpoint), **evaluation))
    second = json.loads((checkpoint.parent / "evaluation-2.json").read_text())
    assert exit_code == 0 and second == result
    assert (checkpoint.parent / "evaluation-1.json").read_bytes() == first


def test_evaluate_runs_the_held_out_set_never_the_training_one(trained, monkeypatch):
    script, fields, folder = trained
    monkeypatch.chdir(folder)
    calls = []
    original = script.evaluate

    def recording_evaluate(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(script, "evaluate", recording_evaluate)
    checkpoint = folder / "runs" / "trained" / "checkpoint.pt"
    assert (
        quiet(script.main, script.Args(evaluate=str(checkpoint), num_eval_envs=2, cuda=False))[0]
        == 0
    )
    (call,) = calls
    if script is procgen:
        run_args = call[1]
        # levels 500.. , never 0..499
        assert run_args.num_levels == 500 and run_args.num_test_levels == 500
    else:
        task_set = call[1]
        assert task_set.split == "test" and len(task_set) == fields["num_test_tasks"]


@pytest.mark.parametrize("content", [None, b"not a checkpoint"], ids=["missing", "corrupt"])
def test_a_bad_checkpoint_is_a_one_line_config_error(content, trained, tmp_path, monkeypatch):
    script = trained[0]
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(script.ConfigError, match=r"--evaluate .*checkpoint\.pt"):
        script.main(script.Args(evaluate=str(path), cuda=False))
    assert not list(tmp_path.glob("evaluation*.json")) and not (tmp_path / "runs").exists()


def test_the_evaluated_agent_is_the_checkpoints(trained, monkeypatch):
    script, _, folder = trained
    monkeypatch.chdir(folder)
    checkpoint = folder / "runs" / "trained" / "checkpoint.pt"
    saved = torch.load(checkpoint, weights_only=True)["agent"]
    agents = []
    original = script.evaluate

    def recording_evaluate(agent, *args, **kwargs):
        agents.append(agent)
        return original(agent, *args, **kwargs)

    monkeypatch.setattr(script, "evaluate", recording_evaluate)
    assert quiet(script.main, script.Args(evaluate=str(checkpoint), cuda=False))[0] == 0
    loaded = agents[0].state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())


def test_evaluate_uses_the_runs_own_settings_unless_told_otherwise(trained, monkeypatch):
    """The tiny run evaluated in 2 envs (not the default 50 / 64): an --evaluate that does not set
    --num-eval-envs uses the run's 2, one that does uses its own."""
    script, fields, folder = trained
    monkeypatch.chdir(folder)
    checkpoint = folder / "runs" / "trained" / "checkpoint.pt"
    assert fields["num_eval_envs"] == 2 != script.Args().num_eval_envs
    for asked, expected in ((None, 2), (1, 1)):
        before = len(list(checkpoint.parent.glob("evaluation-*.json")))
        chosen = {} if asked is None else {"num_eval_envs": asked}
        exit_code, stdout = quiet(
            script.main, script.Args(evaluate=str(checkpoint), cuda=False, **chosen)
        )
        written = checkpoint.parent / f"evaluation-{before + 1}.json"
        assert exit_code == 0 and f"-> {written.name}" in stdout
        assert json.loads(written.read_text())["num_eval_envs"] == expected
