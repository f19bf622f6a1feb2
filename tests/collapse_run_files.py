"""Run folders as ppo_collapse_probe.py writes them (metrics.csv, summary.json), made by the tests
of analysis/ from hand-made reward and entropy curves: no training."""

import csv
import json
from pathlib import Path

import numpy as np

# the columns the analysis reads, in the probe's order (analysis/collapse_runs.py SERIES and more)
COLUMNS = (
    "iteration",
    "global_step",
    "mode",
    "clip_coef",
    "ent_coef",
    "seed",
    "alpha1",
    "alpha2",
    "normalized_reward",
    "smoothed_reward",
    "delta_pi_minus",
    "trust_region_violation_signed",
    "entropy",
    "acting_entropy",
    "wall_time",
)
PROVENANCE = {"commit": "a" * 40, "dirty": False, "torch": "2.14.1", "cpu": "AMD EPYC"}
# hosts.jsonl records (sweeps/run_and_commit.sh) of the two CPU kinds behind "AMD EPYC"
ZEN4 = {"model_name": "AMD EPYC", "cpu_family": "25", "model": "17", "stepping": "1"}
ZEN4["torch_cpu_capability"] = "AVX512"
ZEN3 = {**ZEN4, "model": "1", "torch_cpu_capability": "AVX2"}


def kind_check(run: str, same: bool, host: dict, commit: str = PROVENANCE["commit"]) -> dict:
    """A record of sweeps/check_cpu_kind.py (cpu_kinds.jsonl): 3 updates of `run` rerun on
    `host` from `commit`, reproduced or not."""
    return {"run": run, "same": same, "updates": 3, "commit": commit, "host": host}


def curve(*pieces) -> np.ndarray:
    """Concatenated (value, number of updates) pieces."""
    return np.concatenate([np.full(length, value, dtype=float) for value, length in pieces])


def smoothed(rewards, window: int = 10) -> list:
    """The probe's smoothed_reward column: the mean of the last `window` finite rewards."""
    seen, out = [], []
    for reward in rewards:
        if np.isfinite(reward):
            seen.append(reward)
        out.append(float(np.mean(seen[-window:])) if seen else float("nan"))
    return out


def write_run(
    folder: Path,
    mode: str,
    seed: int,
    rewards,
    entropies,
    alphas=None,
    summary=True,
    provenance=PROVENANCE,
    segments=None,
    **args,
):
    """A run of `mode` and `seed` with these per-update rewards and acting entropies; alphas: the
    (alpha1, alpha2) split (default: the probe's for the mode); summary=False: a killed run (no
    summary.json); provenance None: a run of the first studies (none recorded); segments: the
    provenance of each process of a resumed run; args: summary.json args over Stage C's regime."""
    alpha1, alpha2 = alphas or ((2, 1) if "mdr" in mode else (3, 0))
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i, (reward, entropy, smooth) in enumerate(
            zip(rewards, entropies, smoothed(rewards)), start=1
        ):
            delta = 0.0 if mode == "eval" else 0.41 if i == 1 else 0.01
            writer.writerow(
                [i, 128 * i, mode, 0.2, 0.01, seed, alpha1, alpha2, reward, smooth, delta, 0.0]
                + [entropy + 0.1, entropy, 2.0 * i]
            )
    if not summary:
        return folder
    run_args = {
        "mode": mode,
        "seed": seed,
        "update_epochs": alpha1 + alpha2,
        "alpha1": alpha1,
        "alpha2": alpha2,
        "clip_coef": 0.2,
        "ent_coef": 0.01,
        "bn_momentum": 0.1,
        "view_batching": "separate",
        "total_timesteps": 25600,
        "image_source": "procedural",
        "targets_per_image": 1,
        **args,
    }
    content = {"status": "completed", "wall_time_s": 2.0 * len(rewards), "args": run_args}
    if segments is not None:
        content.update(provenance=segments[-1], provenance_segments=segments)
    elif provenance is not None:
        segment = {"from_iteration": 1, **provenance}
        content.update(provenance=segment, provenance_segments=[segment])
    (folder / "summary.json").write_text(json.dumps(content))
    return folder


STAGE_C_ARMS = {  # arm -> (mode, alphas), as docs/collapse/study_c/stage_c.txt runs them
    "bn": ("bn", (3, 0)),
    "bn-e2": ("bn", (2, 0)),
    "bn-mdr21": ("bn-mdr", (2, 1)),
    "bn-mdr12": ("bn-mdr", (1, 2)),
}


def write_stage_c_run(study: Path, family: str, arm: str, seed: int, rewards, entropies, **kw):
    """A run of Stage C where the plan's queue puts it: <family>/<arm>_bnm0.1_s<seed>."""
    mode, alphas = STAGE_C_ARMS[arm]
    if family == "photos":
        kw.setdefault("image_source", "data/photos")
        kw.setdefault("targets_per_image", 2)
    folder = study / family / f"{arm}_bnm0.1_s{seed}"
    return write_run(folder, mode, seed, rewards, entropies, alphas, **kw)


DROPOUT_ARMS = {  # the dropout study's arm -> (mode, alphas), as docs/dropout/PLAN.md runs them
    "none": ("none", (3, 0)),
    "dropout": ("dropout", (3, 0)),
    "dropout-mdr": ("dropout-mdr", (2, 1)),
}


def write_dropout_run(study: Path, arm: str, seed: int, rewards, entropies, p=0.1, **kw):
    """A run of the dropout study's Study 1 in <study>/<arm>[_p<p>]_s<seed> (none: no dropout_p in
    its args, as the probe's runs before the flag)."""
    mode, alphas = DROPOUT_ARMS[arm]
    if arm != "none":
        kw["dropout_p"] = p
    name = arm if arm == "none" else f"{arm}_p{p:g}"
    return write_run(study / f"{name}_s{seed}", mode, seed, rewards, entropies, alphas, **kw)


GEN_CONFIG = {  # ppo_patchloc_mdr.py's args.json, the fields analysis/ reads, the plan's regime
    "num_tasks": 32,
    "num_test_tasks": 100,
    "image_source": "procedural",
    "view_size": 32,
    "total_timesteps": 76800,
    "eval_interval": 30,
    "update_epochs": 3,
    "clip_coef": 0.2,
    "ent_coef": 1e-4,
    "learning_rate": 4e-5,
    "num_envs": 4,
    "num_steps": 150,
    "mdr_rounds": 3,
    "bn_momentum": 0.1,
}
GEN_ARMS = {"none": ("none", 0), "dropout": ("dropout", 0), "dropout-mdr": ("dropout", 1)}


def write_gen_run(folder: Path, arm: str, seed: int, held_out, gaps, p=0.1, summary=True, **kw):
    """A ppo_patchloc_mdr.py run of the dropout study's Study 2: args.json, TensorBoard events with
    one held-out evaluation per 600 steps (charts/test_normalized_reward and
    charts/generalization_gap) and summary.json (summary=False: a killed run)."""
    from torch.utils.tensorboard import SummaryWriter

    norm, alpha2 = GEN_ARMS[arm]
    config = {**GEN_CONFIG, "norm": norm, "alpha1": 3 - alpha2, "alpha2": alpha2, "seed": seed}
    config.update(dropout_p=p, **kw)
    folder.mkdir(parents=True)
    provenance = [{"from_step": 0, **PROVENANCE}]
    (folder / "args.json").write_text(json.dumps({**config, "provenance": provenance}))
    with SummaryWriter(str(folder)) as writer:
        for index, (test, gap) in enumerate(zip(held_out, gaps), start=1):
            writer.add_scalar("charts/test_normalized_reward", test, 600 * index)
            writer.add_scalar("charts/generalization_gap", gap, 600 * index)
            # the training curve's tag, not the evaluation's: a value no analysis may mistake for
            # the greedy policy's training-task reward (held-out + gap)
            writer.add_scalar("charts/normalized_reward", test + gap - 7.0, 600 * index)
    if summary:
        content = {"status": "completed", "args": config, "provenance": provenance}
        (folder / "summary.json").write_text(json.dumps(content))
    return folder
