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
