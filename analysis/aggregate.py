"""The paper's figures and a table of final scores from your runs: TensorBoard folders or wandb.

    python analysis/aggregate.py                                  # runs/ -> figures/
    python analysis/aggregate.py --wandb-project ENTITY/PROJECT   # runs made with --track

Runs are grouped by their arguments (runs/<run>/args.json; the TensorBoard `hyperparameters` text
where it is missing; the wandb config): a method (BN, BN+MDR, Dropout 20%+MDR, ...), its variant
(MDR ratio, BN momentum), a panel (Procgen game, or patch-loc image source and task count) and a
seed. Each figure shows, per panel and method, the mean and one standard deviation over seeds on a
common step grid; where a method was run in several variants (Procgen: BN momentum 0.1/0.01,
MDR(2,1)/(1,2)), the one with the best final training score in that panel, as the paper reports
(Sec. 4.1). Written to --out-dir, each where its runs exist:

    fig3_procgen.png           Fig. 3 bottom: Procgen score over steps per game, every method but
                               dropout
    fig4_procgen_dropout.png   Fig. 4: NoNorm, Dropout, Dropout+MDR; training solid, held-out
                               levels dashed
    fig3_patchloc.png          Fig. 3 top: patch-loc normalized reward (% of optimal) per task set
    fig5_patchloc_dropout.png  Fig. 5: the same for NoNorm and dropout runs; training solid,
                               held-out tasks dashed
    final_scores.md            final score mean +- std per panel and method (the mean over the last
                               --final-fraction of each run's steps); Procgen: interquartile mean
                               over games of the normalized score with 95 % stratified bootstrap
                               intervals, and the probability that X+MDR improves on X (rliable)
    final_scores.csv           the same per panel, method, variant and metric, one row each
"""

import ast
import csv
import json
import math
import os
import re
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import matplotlib
import numpy as np
import tyro
from matplotlib.figure import Figure  # no pyplot: no display backend, no global figure state
from matplotlib.lines import Line2D


@dataclass
class Args:
    runs_dir: str = "runs"
    """folder of run folders (TensorBoard event files, args.json), read when --wandb-project is not
    given"""
    wandb_project: Optional[str] = None
    """read the runs of this wandb project (ENTITY/PROJECT or PROJECT) instead of --runs-dir"""
    out_dir: str = "figures"
    """where the figures and tables go"""
    final_fraction: float = 0.1
    """a run's final score: the mean of its values over this last fraction of its steps"""
    points: int = 200
    """points of the common step grid on which seeds are averaged"""
    reps: int = 2000
    """bootstrap resamples for the interval estimates"""
    seed: int = 0
    """seed of the bootstrap"""


class UserError(Exception):
    """Bad input: one line on stderr, exit 1."""


# what each script logs (README "Log keys"): the figure's score, its held-out counterpart, and the
# normalized score
METRICS = {
    "procgen": ("charts/episodic_return", "charts/test_episodic_return", "charts/normalized_score"),
    "patchloc": ("charts/normalized_reward", "charts/test_normalized_reward", None),
}
NORM_NAMES = {
    "bn": "BN",
    "eval": "Eval",
    "brn": "BRN",
    "ln": "LN",
    "gn": "GN",
    "none": "NoNorm",
    "dropout": "Dropout",
}
MODE_DEPENDENT_BN = ("bn", "brn")  # their running statistics move, so the momentum is a variant
PATCHLOC_YLABEL = "normalized reward (% of optimal)"
FIGURES = {  # (kind, dropout figure?) -> file, title, y label
    ("procgen", False): ("fig3_procgen", "Procgen (Fig. 3 bottom)", "score"),
    ("procgen", True): (
        "fig4_procgen_dropout",
        "Procgen, dropout (Fig. 4): training solid, held-out dashed",
        "score",
    ),
    ("patchloc", False): ("fig3_patchloc", "Patch localization (Fig. 3 top)", PATCHLOC_YLABEL),
    ("patchloc", True): (
        "fig5_patchloc_dropout",
        "Patch localization, dropout (Fig. 5): training solid, held-out dashed",
        PATCHLOC_YLABEL,
    ),
}


@dataclass
class Run:
    name: str
    config: dict
    series: dict  # tag -> (steps, values), sorted by step

    @property
    def kind(self) -> Optional[str]:
        if "env_id" in self.config:
            return "procgen"
        if "num_tasks" in self.config and "norm" in self.config:
            return "patchloc"
        return None  # e.g. a collapse-probe run

    @property
    def method(self) -> str:
        c = self.config
        name = NORM_NAMES.get(c["norm"], c["norm"])
        if c["norm"] == "dropout" and float(c.get("dropout_p", 0.1)) != 0.1:
            name += f" {float(c['dropout_p']):.0%}"
        return name + ("+MDR" if int(c["alpha2"]) > 0 else "")

    @property
    def variant(self) -> str:
        c = self.config
        text = f"({c['alpha1']},{c['alpha2']})" + (
            f"x{c['mdr_rounds']}" if int(c.get("mdr_rounds", 1)) > 1 else ""
        )
        return text + (f" m={float(c['bn_momentum']):g}" if c["norm"] in MODE_DEPENDENT_BN else "")

    @property
    def panel(self) -> str:
        if self.kind == "procgen":
            return self.config["env_id"]
        source = str(self.config.get("image_source", "procedural"))
        return f"{os.path.basename(source.rstrip('/')) or source}, {self.config['num_tasks']} tasks"


# --------------------------------------------------------------------------------------------------
# reading runs


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_tensorboard_run(folder: str, name: str) -> Optional[Run]:
    """A run folder: its arguments (args.json, else the `hyperparameters` text) and its scalars.
    Event files of a resumed run are read in order; a step logged twice (before and after a restart)
    keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        folder, size_guidance={"scalars": 0, "tensors": 0, "images": 1, "histograms": 1}
    )
    events.Reload()
    args_file = os.path.join(folder, "args.json")
    if os.path.exists(args_file):
        with open(args_file) as f:
            config = json.load(f)
    elif "hyperparameters/text_summary" in events.Tags()["tensors"]:
        table = (
            events.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
        )
        config = {
            key: parse_value(value)
            for key, value in re.findall(r"^\|([^|]+)\|([^|]*)\|$", table, re.M)
        }
    else:
        return None
    series = {}
    for tag in events.Tags()["scalars"]:
        by_step = {event.step: event.value for event in events.Scalars(tag)}
        steps = np.array(sorted(by_step))
        series[tag] = (steps, np.array([by_step[s] for s in steps], dtype=float))
    return Run(name, config, series)


def read_runs_dir(runs_dir: str) -> list[Run]:
    if not os.path.isdir(runs_dir):
        raise UserError(
            f"--runs-dir {runs_dir}: no such folder "
            "(train with the scripts first, or pass --wandb-project)"
        )
    runs = []
    for folder, _, files in sorted(os.walk(runs_dir)):
        if any(f.startswith("events.out.tfevents.") for f in files):
            run = read_tensorboard_run(folder, os.path.relpath(folder, runs_dir))
            if run is not None:
                runs.append(run)
    return runs


def read_wandb_project(project: str) -> list[Run]:
    """Runs made with --track: the config is the script's Args, the scalars are the TensorBoard ones
    (sync_tensorboard), stepped by global_step."""
    import wandb

    runs = []
    for wandb_run in wandb.Api().runs(project):
        config = {key: value for key, value in wandb_run.config.items() if not key.startswith("_")}
        kind = Run(wandb_run.name, config, {}).kind
        series = {}
        for tag in [tag for tag in METRICS.get(kind, ()) if tag]:
            rows = [
                (row["global_step"], row[tag])
                for row in wandb_run.scan_history(keys=["global_step", tag])
            ]
            if rows:
                by_step = dict(rows)
                steps = np.array(sorted(by_step))
                series[tag] = (steps, np.array([by_step[s] for s in steps], dtype=float))
        runs.append(Run(wandb_run.name, config, series))
    return runs


# --------------------------------------------------------------------------------------------------
# aggregation


def final_score(steps: np.ndarray, values: np.ndarray, fraction: float) -> float:
    """Mean over the last `fraction` of the run's steps (at least its last value)."""
    return float(values[steps >= steps[-1] * (1 - fraction)].mean())


def mean_std(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def logged_steps(run: Run) -> int:
    return max((len(steps) for steps, _ in run.series.values()), default=0)


def group_runs(runs: list[Run]) -> dict:
    """(kind, panel, method, variant) -> {seed: Run}. Two runs of the same seed: the longer one,
    with a warning."""
    groups = defaultdict(dict)
    for run in runs:
        seeds = groups[(run.kind, run.panel, run.method, run.variant)]
        seed = run.config["seed"]
        if seed in seeds:
            print(
                f"warning: {run.name} and {seeds[seed].name}: same configuration and seed, "
                "keeping the longer",
                file=sys.stderr,
            )
            if logged_steps(run) <= logged_steps(seeds[seed]):
                continue
        seeds[seed] = run
    return groups


def finals(seeds: dict, tag: str, fraction: float) -> list[float]:
    """The final scores of the seeds' runs that logged `tag`."""
    return [final_score(*run.series[tag], fraction) for run in seeds.values() if tag in run.series]


def figure_groups(groups: dict, kind: str, dropout: bool, metric: str, fraction: float) -> dict:
    """panel -> method -> (variant, {seed: Run}): the figure's panels and methods, each method's
    best variant by the mean final `metric`. Dropout figures: NoNorm and the dropout methods, in the
    panels with dropout runs; the others: every method without dropout, in the panels with a
    normalization layer (NoNorm alone makes no panel)."""
    candidates = defaultdict(lambda: defaultdict(dict))
    for (run_kind, panel, method, variant), seeds in groups.items():
        norm = next(iter(seeds.values())).config["norm"]
        if run_kind == kind and (norm in ("none", "dropout") if dropout else norm != "dropout"):
            candidates[panel][method][variant] = seeds
    chosen = {}
    for panel, methods in sorted(candidates.items()):
        if set(methods) <= {"NoNorm", "NoNorm+MDR"}:
            continue
        chosen[panel] = {
            method: max(
                variants.items(),
                key=lambda item: np.mean(finals(item[1], metric, fraction) or [-math.inf]),
            )
            for method, variants in sorted(methods.items())
        }
    return chosen


def curve(seeds: dict, tag: str, points: int):
    """Mean and standard deviation over seeds on a common step grid, over the steps every seed
    logged."""
    series = [run.series[tag] for run in seeds.values() if tag in run.series]
    if not series:
        return None
    grid = np.linspace(
        max(steps[0] for steps, _ in series), min(steps[-1] for steps, _ in series), points
    )
    values = np.array([np.interp(grid, steps, v) for steps, v in series])
    return (
        grid,
        values.mean(axis=0),
        values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(points),
    )


def draw(chosen: dict, tags: list, title: str, ylabel: str, path: str, points: int):
    methods = sorted({method for panel in chosen.values() for method in panel})
    colors = {method: matplotlib.colormaps["tab10"](i % 10) for i, method in enumerate(methods)}
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (panel, best) in zip(axes.flat, chosen.items()):
        for method, (_, seeds) in best.items():
            for tag, style in zip(tags, ["-", "--"]):
                result = curve(seeds, tag, points)
                if result is not None:
                    grid, mean, std = result
                    ax.plot(grid, mean, style, color=colors[method])
                    ax.fill_between(
                        grid, mean - std, mean + std, color=colors[method], alpha=0.15, linewidth=0
                    )
        ax.set_title(panel)
        ax.set_xlabel("steps")
        ax.set_ylabel(ylabel)
    for ax in axes.flat[len(chosen) :]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[m], label=m) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(methods), 8), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)


def iqm_and_improvement(
    chosen: dict, metric: str, fraction: float, reps: int, seed: int
) -> list[str]:
    """rliable on the final normalized scores of the figure's methods (each game: the variant
    drawn): the interquartile mean over games and seeds with 95 % stratified bootstrap intervals;
    P(X+MDR > X) for every pair present."""
    from rliable import library as rly
    from rliable import metrics

    warnings.filterwarnings(
        "ignore", "random_state is deprecated", FutureWarning
    )  # rliable's call into arch, not ours

    games = sorted(
        panel
        for panel, best in chosen.items()
        if any(finals(seeds, metric, 1) for _, seeds in best.values())
    )
    methods = [
        m
        for m in sorted({m for best in chosen.values() for m in best})
        if all(m in chosen[g] for g in games)
    ]
    scores = {}
    for method in methods:
        per_game = [finals(chosen[game][method][1], metric, fraction) for game in games]
        seeds = min(
            map(len, per_game), default=0
        )  # rliable wants runs x games: the seeds every game has
        if seeds:
            scores[method] = np.array([game_scores[:seeds] for game_scores in per_game]).T
    if not scores:
        return []
    lines = [
        f"Interquartile mean of the final `{metric}` over {len(games)} "
        f"game{'s' * (len(games) > 1)} ({', '.join(games)}), "
        f"95 % stratified bootstrap interval ({reps} resamples):",
        "",
        "| method | runs x games | IQM | 95 % CI |",
        "|---|---|---|---|",
    ]
    point, interval = rly.get_interval_estimates(
        scores,
        lambda x: np.array([metrics.aggregate_iqm(x)]),
        reps=reps,
        random_state=np.random.RandomState(seed),
    )
    for method, matrix in scores.items():
        low, high = interval[method][:, 0]
        lines.append(
            f"| {method} | {matrix.shape[0]} x {matrix.shape[1]} | {point[method][0]:.3f} "
            f"| [{low:.3f}, {high:.3f}] |"
        )
    without_mdr = {
        m: m.removesuffix("+MDR")
        for m in scores
        if m.endswith("+MDR") and m.removesuffix("+MDR") in scores
    }
    pairs = {f"{m},{base}": (scores[m], scores[base]) for m, base in without_mdr.items()}
    if pairs:
        probability, interval = rly.get_interval_estimates(
            pairs,
            metrics.probability_of_improvement,
            reps=reps,
            random_state=np.random.RandomState(seed),
        )
        lines += ["", "| X | Y | P(X > Y) | 95 % CI |", "|---|---|---|---|"]
        for pair in pairs:
            x, y = pair.split(",")
            low, high = np.ravel(interval[pair])
            p_improve = float(np.ravel(probability[pair])[0])
            lines.append(f"| {x} | {y} | {p_improve:.3f} | [{low:.3f}, {high:.3f}] |")
    return lines


def main(args: Args) -> int:
    if not 0 < args.final_fraction <= 1:
        raise UserError(f"--final-fraction {args.final_fraction}: use a fraction in (0, 1]")
    if args.reps < 1 or args.points < 2:
        raise UserError("--reps must be at least 1 and --points at least 2")
    runs = (
        read_wandb_project(args.wandb_project)
        if args.wandb_project
        else read_runs_dir(args.runs_dir)
    )
    source = args.wandb_project or args.runs_dir
    runs = [run for run in runs if run.kind is not None]
    if not runs:
        raise UserError(f"{source}: no runs of ppo_procgen_mdr.py or ppo_patchloc_mdr.py found")
    groups = group_runs(runs)
    os.makedirs(args.out_dir, exist_ok=True)
    table, rows = [f"# Final scores ({len(runs)} runs from {source})", ""], []
    for (kind, dropout), (file, title, ylabel) in FIGURES.items():
        train_tag, test_tag, normalized_tag = METRICS[kind]
        chosen = figure_groups(groups, kind, dropout, train_tag, args.final_fraction)
        if not chosen:
            continue
        tags = [train_tag, test_tag] if dropout else [train_tag]
        draw(chosen, tags, title, ylabel, os.path.join(args.out_dir, f"{file}.png"), args.points)
        methods = sorted({m for best in chosen.values() for m in best})
        tag_names = ", ".join(f"`{t}`" for t in tags)
        caption = (
            f"`{file}.png`: final {tag_names}, mean +- std over seeds (the variant drawn; seeds)"
        )
        table += [f"## {title}", "", caption, ""]
        table += ["| panel | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for panel, best in chosen.items():
            cells = []
            for method in methods:
                if method not in best:
                    cells.append("")
                    continue
                variant, seeds = best[method]
                texts = []
                for tag in tags:
                    scores = finals(seeds, tag, args.final_fraction)
                    if scores:
                        mean, std = mean_std(scores)
                        texts.append(f"{mean:.2f} +- {std:.2f}")
                        rows.append(
                            [
                                file,
                                panel,
                                method,
                                variant,
                                tag,
                                f"{mean:.6g}",
                                f"{std:.6g}",
                                len(scores),
                            ]
                        )
                cells.append(" / ".join(texts) + f" ({variant}; {len(seeds)})")
            table.append(f"| {panel} | " + " | ".join(cells) + " |")
        table.append("")
        if normalized_tag and not dropout:
            table += iqm_and_improvement(
                chosen, normalized_tag, args.final_fraction, args.reps, args.seed
            ) + [""]
    if not rows:
        scores = ", ".join(tag for tags in METRICS.values() for tag in tags if tag)
        raise UserError(f"{source}: the runs found log none of the scores ({scores})")
    with open(os.path.join(args.out_dir, "final_scores.md"), "w") as f:
        f.write("\n".join(table))
    with open(os.path.join(args.out_dir, "final_scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["figure", "panel", "method", "variant", "metric", "mean", "std", "seeds"])
        writer.writerows(rows)
    print(f"{len(runs)} runs -> {args.out_dir}/: " + ", ".join(sorted(os.listdir(args.out_dir))))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(tyro.cli(Args)))
    except UserError as e:
        sys.exit(f"error: {e}")
