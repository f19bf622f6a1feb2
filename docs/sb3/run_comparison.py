"""SB3's PPO against MDRPPO, both with BatchNormCNN, on probe-sized PatchLoc-v0: a small check of
integrations/sb3_mdr.py, not a study (docs/mdr_in_sb3.md).

    nice -n 10 env OMP_NUM_THREADS=1 python docs/sb3/run_comparison.py --seeds 1 2 3 4 5 6

For each seed, one run after the other in this process, the example of integrations/sb3_mdr.py with
its defaults (4 tasks of 36-px views drawn from the seed, 4 envs x 32 steps, minibatches of 32, 3
epochs, 150 updates, learning rate 1e-3, entropy coefficient 0.01, the rest SB3's PPO defaults) in
two arms: `ppo` = alpha2=0, which is SB3's PPO bit for bit (tests/test_sb3_mdr.py), and `mdr` =
alpha2=1, MDR(2,1). The diagnostics are on in both: they change nothing (tested), and they give
Delta pi minus for SB3's PPO too. Same seed, same tasks and initial weights in both arms.

Writes to docs/sb3/: curves/{arm}_s{seed}.csv (one row per update; a run whose CSV exists is not run
again, so a rerun only analyses), summary.csv (per run), paired.csv (MDR - PPO per measure, paired
bootstrap 95 % percentile intervals), comparison.png, provenance.json (per run: commit, uncommitted
changes to the code it ran, versions); prints the tables as markdown. Measures: AUC = mean
normalized reward (% of the optimal return) over the updates in which an episode ended, final = its
mean over the last 10 updates, mean and median Delta pi minus, mean ratio gap, and whether the run
collapsed by the project's revised definition (analysis/collapse_runs.py).
"""

import argparse
import csv
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import stable_baselines3
import torch as th
from matplotlib.figure import Figure
from scipy import stats
from stable_baselines3.common.callbacks import BaseCallback

# the repository root (integrations/) and analysis/ (collapse_runs: the collapse definition)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analysis"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from collapse_runs import collapse_onset, smoothed_rewards

from integrations import sb3_mdr

REPO_ROOT = Path(__file__).resolve().parents[2]
ARMS = {"ppo": 0, "mdr": 1}  # arm -> alpha2 (of n_epochs = 3)
LABELS = {"ppo": "SB3 PPO (BN)", "mdr": "MDRPPO, MDR(2,1)"}
COLORS = {"ppo": "tab:red", "mdr": "tab:blue"}
COLUMNS = (
    "iteration global_step episodes episodic_return normalized_reward acting_entropy "
    "delta_pi_minus ratio_gap approx_kl clip_fraction entropy_loss value_loss"
).split()
TRAIN_KEYS = "delta_pi_minus ratio_gap approx_kl clip_fraction entropy_loss value_loss".split()
FINAL_UPDATES = 10
CONFIDENCE, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 0.95, 9999, 0


class UpdateRows(BaseCallback):
    """One row per update k: rollout k's finished episodes (return, % of the optimal return), the
    acting (eval-mode) policy's mean entropy on D_k, and update k's train/ keys. SB3 records those
    after rollout k's log dump, so they are read at the start of rollout k + 1 (or at the end)."""

    def _on_training_start(self) -> None:
        self.rows, self.episodes = [], []

    def _on_rollout_start(self) -> None:
        self.take_train_keys()
        self.episodes = []

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:
                self.episodes.append((info["episode"]["r"], info["optimal_return"]))
        return True

    def _on_rollout_end(self) -> None:
        returns = np.array([r for r, _ in self.episodes], dtype=float)
        optimal = np.array([o for _, o in self.episodes], dtype=float)
        self.rows.append(
            {
                "iteration": len(self.rows) + 1,
                "global_step": self.num_timesteps,
                "episodes": len(returns),
                "episodic_return": float(returns.mean()) if len(returns) else math.nan,
                "normalized_reward": float(100 * (returns / optimal).mean())
                if len(returns)
                else math.nan,
                "acting_entropy": acting_entropy(self.model),
            }
        )

    def _on_training_end(self) -> None:
        self.take_train_keys()

    def take_train_keys(self) -> None:
        if self.rows:
            logged = self.model.logger.name_to_value
            self.rows[-1].update({k: logged.get(f"train/{k}", math.nan) for k in TRAIN_KEYS})


@th.no_grad()
def acting_entropy(model) -> float:
    """Mean entropy of the policy that collected D_k (eval mode, as SB3 leaves it after the rollout:
    no running statistic moves)."""
    obs = sb3_mdr.rollout_observations(model.rollout_buffer)
    chunks = th.split(obs, model.batch_size)
    return float(th.cat([model.policy.get_distribution(o).entropy() for o in chunks]).mean())


def run(arm: str, seed: int, path: Path, budget: list) -> None:
    args = sb3_mdr.parse_args(["--seed", str(seed), "--alpha2", str(ARMS[arm]), *budget])
    model = sb3_mdr.make_model(args, sb3_mdr.make_env(args))
    rows = UpdateRows()
    model.learn(total_timesteps=args.total_timesteps, callback=rows)
    write_csv(path, rows.rows)


def write_csv(path: Path, rows: list) -> None:
    """Written to a temporary name and renamed: an interrupted run leaves no CSV behind."""
    partial = path.with_suffix(".partial")
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    partial.rename(path)


def read_run(path: Path) -> dict:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in COLUMNS}


def finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def measures(run: dict) -> dict:
    onset, criterion = collapse_onset(run["normalized_reward"], run["acting_entropy"], "revised")
    return {
        "auc": float(finite(run["normalized_reward"]).mean()),
        "final": float(finite(run["normalized_reward"][-FINAL_UPDATES:]).mean()),
        "mean_delta_pi_minus": float(finite(run["delta_pi_minus"]).mean()),
        "median_delta_pi_minus": float(np.median(finite(run["delta_pi_minus"]))),
        "mean_ratio_gap": float(finite(run["ratio_gap"]).mean()),
        "collapsed": onset is not None,
        "collapse_update": "" if onset is None else int(run["iteration"][onset]),
        "collapse_criterion": criterion or "",
    }


def paired_bootstrap(x, y) -> tuple:
    """(mean of x - y, low, high): paired bootstrap percentile interval of the mean difference."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    result = stats.bootstrap(
        (x, y),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        random_state=np.random.default_rng(BOOTSTRAP_SEED),
    )
    interval = result.confidence_interval
    return float(np.mean(x - y)), float(interval.low), float(interval.high)


def draw(runs: dict, path: Path) -> None:
    """Per arm and seed: smoothed normalized reward, Delta pi minus (log) and the ratio gap."""
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [
        ("normalized_reward", "normalized reward, % of optimal (10-update mean)"),
        ("delta_pi_minus", "Delta pi minus (JS, nats; log)"),
        ("ratio_gap", "ratio gap mean |r' - r|, standard phase"),
    ]
    for ax, (key, title) in zip(axes, panels):
        for (arm, seed), run in sorted(runs.items()):
            x, y = run["iteration"], run[key]
            if key == "normalized_reward":
                indices, y, _ = smoothed_rewards(y)
                x = x[indices]
            label = LABELS[arm] if seed == min(s for a, s in runs if a == arm) else None
            ax.plot(x, y, color=COLORS[arm], lw=1, alpha=0.7, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(loc="upper left", fontsize=9)
    seeds = sorted({s for _, s in runs})
    fig.suptitle(
        f"SB3 PPO vs MDRPPO with BatchNormCNN, PatchLoc-v0 (4 tasks, 36-px views), "
        f"{len(seeds)} paired seeds: one line per run",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)


def markdown(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def provenance() -> dict:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.rstrip()

    return {
        "commit": git("rev-parse", "HEAD"),
        # uncommitted changes to the code the runs import (other sessions edit envs/ meanwhile)
        "dirty": git("status", "--porcelain", "--", "integrations/sb3_mdr.py", "envs").split("\n"),
        "stable_baselines3": stable_baselines3.__version__,
        "torch": th.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": th.get_num_threads(),
    }


def analyse(seeds: list, out: Path) -> None:
    runs = {(arm, s): read_run(out / "curves" / f"{arm}_s{s}.csv") for arm in ARMS for s in seeds}
    per_run = {key: measures(run) for key, run in runs.items()}
    names = list(next(iter(per_run.values())))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "seed", *names])
        writer.writeheader()
        for (arm, seed), m in sorted(per_run.items()):
            writer.writerow({"arm": arm, "seed": seed, **m})
    paired_names = [
        "auc",
        "final",
        "mean_delta_pi_minus",
        "median_delta_pi_minus",
        "mean_ratio_gap",
    ]
    paired = {}
    for name in paired_names:
        mdr = [per_run[("mdr", s)][name] for s in seeds]
        ppo = [per_run[("ppo", s)][name] for s in seeds]
        paired[name] = (np.mean(ppo), np.mean(mdr), *paired_bootstrap(mdr, ppo))
    with open(out / "paired.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["measure", "ppo_mean", "mdr_mean", "mdr_minus_ppo", "low95", "high95"])
        for name, values in paired.items():
            writer.writerow([name, *(f"{v:.6g}" for v in values)])
    draw(runs, out / "comparison.png")

    print(
        markdown(
            ["measure", "SB3 PPO", "MDRPPO", "MDR - PPO [95 % CI]"],
            [
                [name, f"{p:.4g}", f"{m:.4g}", f"{d:+.4g} [{lo:+.4g}, {hi:+.4g}]"]
                for name, (p, m, d, lo, hi) in paired.items()
            ],
        )
    )
    print()
    print(
        markdown(
            [
                "seed",
                "AUC PPO",
                "AUC MDR",
                "final PPO",
                "final MDR",
                "collapse PPO",
                "collapse MDR",
            ],
            [
                [s]
                + [f"{per_run[(a, s)][k]:.1f}" for k in ("auc", "final") for a in ARMS]
                + [
                    f"update {per_run[(a, s)]['collapse_update']} "
                    f"({per_run[(a, s)]['collapse_criterion']})"
                    if per_run[(a, s)]["collapsed"]
                    else "no"
                    for a in ARMS
                ]
                for s in seeds
            ],
        )
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4], help="paired seeds")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument(
        "--total-timesteps", type=int, default=None, help="per run (default: the example's)"
    )
    args = parser.parse_args(argv)
    seeds, out = args.seeds, args.out_dir
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        print(f"error: --seeds {seeds}: give two or more distinct seeds", file=sys.stderr)
        return 2
    budget = (
        [] if args.total_timesteps is None else ["--total-timesteps", str(args.total_timesteps)]
    )
    th.set_num_threads(1)  # one core of a small shared machine
    (out / "curves").mkdir(parents=True, exist_ok=True)
    at_start = provenance()  # this process imported the code as it was now
    provenance_file = out / "provenance.json"
    by_run = json.loads(provenance_file.read_text()) if provenance_file.exists() else {}
    for seed in seeds:
        for arm in ARMS:
            path = out / "curves" / f"{arm}_s{seed}.csv"
            if not path.exists():
                print(f"run {arm} seed {seed} -> {path}", flush=True)
                run(arm, seed, path, budget)
                by_run[path.stem] = at_start
                provenance_file.write_text(json.dumps(by_run, indent=2, sort_keys=True) + "\n")
    analyse(seeds, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
