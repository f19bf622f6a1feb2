"""The paper's figures and a table of final scores from your runs: TensorBoard folders or wandb.

    python analysis/aggregate.py --out-dir figures                # runs/ -> figures/
    python analysis/aggregate.py --wandb-project ENTITY/PROJECT --out-dir figures  # --track runs

Runs are grouped by their arguments (runs/<run>/args.json; the TensorBoard `hyperparameters` text
where it is missing; the wandb config): a method (BN, BN+MDR, Dropout 20%+MDR, ...), its variant
(MDR ratio, BN momentum, and every other argument that changes training, --total-timesteps
included, where runs differ in it), a panel (Procgen game, or patch-loc image source and task
count) and a seed. Only the arguments that do not change what is learned (NOT_TRAINING: the
scripts' RESUMABLE_FIELDS but --total-timesteps) are ignored. Each figure shows, per panel and
method, the mean and one standard deviation over seeds on a common step grid, and how many runs
each curve has; where a method was run in several variants (Procgen: BN momentum 0.1/0.01,
MDR(2,1)/(1,2)), the one with the best final training score in that panel, as the paper reports
(Sec. 4.1); final_scores.md lists the variants not drawn. A run whose files cannot be read is
skipped with one warning line. Written to --out-dir (required: nothing is written elsewhere), each
where its runs exist:

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

import argparse
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
from cli import ArgumentParser, run_command
from matplotlib.figure import Figure  # no pyplot: no display backend, no global figure state
from matplotlib.lines import Line2D


class UserError(Exception):
    """Bad input: one line on stderr, exit 1."""


class CorruptRun(Exception):
    """A run whose files cannot be read: skipped with one warning line."""


def bounded(kind, low, high, open_low: bool = False):
    """An argparse type: a finite `kind` (int or float) in [low, high], or (low, high]."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        above = value > low if open_low else value >= low
        if not (math.isfinite(value) and above and value <= high):
            interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
            name = "a number" if kind is float else "a whole number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {name} in {interval}")
        return value

    return parse


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
# what a run's arguments hold that does not change what is learned: the training scripts'
# RESUMABLE_FIELDS (tracking, names, checkpoints, speed) but total_timesteps, which does; the seed
# (the runs of one curve differ by it), and args.json's provenance (where it ran: not an argument)
NOT_TRAINING = (
    "resume",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "wandb_group",
    "run_name",
    "save_model",
    "checkpoint_interval",
    "cuda",
    "num_iterations",
    "channels_last",
    "compile",
    "torch_threads",
    "evaluate",
    "capture_video",
    "overwrite",
)
NOT_TRAINING += ("exp_name", "seed", "provenance", "_wandb")
FEW_SEEDS = 3  # a mean +- std or an interval over fewer seeds carries a caution
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
    where: str = ""  # the run's folder (or wandb run), for messages

    @property
    def kind(self) -> Optional[str]:
        if "env_id" in self.config:
            return "procgen"
        if "num_tasks" in self.config and "norm" in self.config:
            return "patchloc"
        return None  # e.g. a collapse-probe run

    @property
    def alphas(self) -> tuple:
        """(alpha1, alpha2): train-mode and eval-mode epochs per round (alpha1 from
        --update-epochs where the arguments name no alpha1)."""
        alpha2 = int(self.config.get("alpha2", 0))
        alpha1 = self.config.get("alpha1")
        if alpha1 is None:
            alpha1 = int(self.config.get("update_epochs", 3)) - alpha2
        return int(alpha1), alpha2

    @property
    def method(self) -> str:
        c = self.config
        name = NORM_NAMES.get(c["norm"], c["norm"])
        if c["norm"] == "dropout" and float(c.get("dropout_p", 0.1)) != 0.1:
            name += f" {float(c['dropout_p']):.0%}"
        return name + ("+MDR" if self.alphas[1] > 0 else "")

    @property
    def variant(self) -> str:
        c = self.config
        text = "({},{})".format(*self.alphas) + (
            f"x{c['mdr_rounds']}" if int(c.get("mdr_rounds", 1)) > 1 else ""
        )
        return text + (f" m={float(c['bn_momentum']):g}" if c["norm"] in MODE_DEPENDENT_BN else "")

    @property
    def training(self) -> tuple:
        """The arguments that change what is learned, as sorted (name, value) pairs."""
        return tuple(
            sorted(
                (key, canonical(value))
                for key, value in self.config.items()
                if key not in NOT_TRAINING
            )
        )

    def problem(self) -> Optional[str]:
        """Why the arguments cannot be grouped (a missing or malformed one), or None."""
        needed = {"procgen": ("env_id",), "patchloc": ("num_tasks",)}.get(self.kind, ())
        needed += ("norm", "seed", "alpha2")
        if self.config.get("norm") in MODE_DEPENDENT_BN:
            needed += ("bn_momentum",)
        missing = [key for key in needed if key not in self.config]
        if missing:
            return f"no {', '.join(missing)} in its arguments"
        try:
            _ = (int(self.config["seed"]), self.alphas, self.variant, self.method, self.panel)
        except (TypeError, ValueError) as error:
            return f"an argument that is not of its type ({error})"
        return None

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


def canonical(value) -> str:
    """A value as one comparable text: numbers equal whatever their type (3 and 3.0), lists and
    tuples alike."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{float(value):.12g}"
    return json.dumps(value, sort_keys=True, default=str)


def warn_skipped(where: str, why: str) -> None:
    print(f"warning: skipped {where}: {why}", file=sys.stderr)


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
        try:
            with open(args_file) as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise CorruptRun(f"{args_file}: unreadable ({error})") from None
        if not isinstance(config, dict):
            raise CorruptRun(f"{args_file}: not the arguments of a run (no JSON object)")
    elif "hyperparameters/text_summary" in events.Tags()["tensors"]:
        table = (
            events.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
        )
        # CleanRL's table: a |param|value| header and a |-|-| rule, then one row per argument
        config = {
            key: parse_value(value)
            for key, value in re.findall(r"^\|([^|]+)\|([^|]*)\|$", table, re.M)
            if (key, value) != ("param", "value") and set(key) != {"-"}
        }
    else:
        return None
    series = {}
    for tag in events.Tags()["scalars"]:
        by_step = {event.step: event.value for event in events.Scalars(tag)}
        steps = np.array(sorted(by_step))
        series[tag] = (steps, np.array([by_step[s] for s in steps], dtype=float))
    return Run(name, config, series, folder)


def read_runs_dir(runs_dir: str) -> list[Run]:
    if not os.path.isdir(runs_dir):
        raise UserError(
            f"--runs-dir {runs_dir}: no such folder "
            "(train with the scripts first, or pass --wandb-project)"
        )
    runs = []
    for folder, _, files in sorted(os.walk(runs_dir)):
        if any(f.startswith("events.out.tfevents.") for f in files):
            try:
                run = read_tensorboard_run(folder, os.path.relpath(folder, runs_dir))
            except CorruptRun as error:
                print(f"warning: skipped {error}", file=sys.stderr)
                continue
            if run is not None and run.kind is not None and not run.series:
                warn_skipped(folder, "no scalars in its TensorBoard events (empty or unreadable)")
                continue
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
        runs.append(Run(wandb_run.name, config, series, f"wandb run {project}/{wandb_run.name}"))
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
    """(kind, panel, method, variant) -> {seed: Run}, one group per configuration: runs that agree
    in every argument that changes training. The variant names, beyond the MDR ratio and BN
    momentum, each such argument in which runs of its kind, panel, method and ratio differ
    ('total_timesteps=640'). Two runs of one configuration and seed: the longer one, with a
    warning."""
    by_config = defaultdict(dict)
    for run in runs:
        seeds = by_config[(run.kind, run.panel, run.method, run.variant, run.training)]
        seed = int(run.config["seed"])
        if seed in seeds:
            print(
                f"warning: {run.name} and {seeds[seed].name}: same configuration and seed, "
                "keeping the longer",
                file=sys.stderr,
            )
            if logged_steps(run) <= logged_steps(seeds[seed]):
                continue
        seeds[seed] = run
    configs = defaultdict(list)  # (kind, panel, method, variant) -> the configurations seen
    for key in by_config:
        configs[key[:4]].append(dict(key[4]))
    groups = {}
    for key, seeds in by_config.items():
        seen, config = configs[key[:4]], dict(key[4])
        names = sorted({name for other in seen for name in other})
        differing = [name for name in names if len({c.get(name, "?") for c in seen}) > 1]
        label = " ".join([key[3]] + [f"{name}={show(config.get(name, '?'))}" for name in differing])
        groups[key[:3] + (label,)] = seeds
    return groups


def show(value: str) -> str:
    """A canonical value as it reads best: a number without its quotes, a string without JSON's."""
    return value[1:-1] if value.startswith('"') and value.endswith('"') else value


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
        counts = []
        for method, (_, seeds) in best.items():
            for tag, style in zip(tags, ["-", "--"]):
                result = curve(seeds, tag, points)
                if result is not None:
                    grid, mean, std = result
                    ax.plot(grid, mean, style, color=colors[method])
                    ax.fill_between(
                        grid, mean - std, mean + std, color=colors[method], alpha=0.15, linewidth=0
                    )
            counts.append(f"{method}: {sum(tags[0] in run.series for run in seeds.values())}")
        # how many runs each curve has, in the panel (they differ between panels)
        ax.text(
            0.02,
            0.98,
            "runs: " + ", ".join(counts),
            transform=ax.transAxes,
            fontsize=6,
            va="top",
            wrap=True,
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
            f"| [{low:.3f}, {high:.3f}]{caution(matrix.shape[0])} |"
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


def caution(seeds: int) -> str:
    """The caution beside a spread or interval over fewer than FEW_SEEDS seeds ('' otherwise)."""
    return f" ⚠ only {seeds} seed{'s' * (seeds != 1)}" if seeds < FEW_SEEDS else ""


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs-dir",
        default="runs",
        help="folder of run folders (TensorBoard event files, args.json), read when "
        "--wandb-project is not given",
    )
    parser.add_argument(
        "--wandb-project",
        default=None,
        help="read the runs of this wandb project (ENTITY/PROJECT or PROJECT) instead",
    )
    parser.add_argument(
        "--out-dir", required=True, help="where the figures and tables go (created if needed)"
    )
    parser.add_argument(
        "--final-fraction",
        type=bounded(float, 0, 1, open_low=True),
        default=0.1,
        help="a run's final score: the mean of its values over this last fraction of its steps",
    )
    parser.add_argument(
        "--points",
        type=bounded(int, 2, 100_000),
        default=200,
        help="points of the common step grid on which seeds are averaged",
    )
    parser.add_argument(
        "--reps",
        type=bounded(int, 1, 1_000_000),
        default=2000,
        help="bootstrap resamples for the interval estimates",
    )
    parser.add_argument(
        "--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="seed of the bootstrap"
    )
    return parser.parse_args(argv)


def usable(runs: list) -> list:
    """The runs of the two training scripts whose arguments can be grouped; the others of them
    skipped with one warning line each (runs of other scripts, e.g. the probe, silently)."""
    kept = []
    for run in runs:
        if run.kind is None:
            continue
        problem = run.problem()
        if problem:
            warn_skipped(run.where or run.name, problem)
            continue
        kept.append(run)
    return kept


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = (
        read_wandb_project(args.wandb_project)
        if args.wandb_project
        else read_runs_dir(args.runs_dir)
    )
    source = args.wandb_project or args.runs_dir
    runs = usable(runs)
    if not runs:
        raise UserError(f"{source}: no runs of ppo_procgen_mdr.py or ppo_patchloc_mdr.py found")
    groups = group_runs(runs)
    drawn = set()  # (kind, panel, method, variant) of the curves drawn
    table, rows, figures = [], [], []
    for (kind, dropout), (file, title, ylabel) in FIGURES.items():
        train_tag, test_tag, normalized_tag = METRICS[kind]
        chosen = figure_groups(groups, kind, dropout, train_tag, args.final_fraction)
        if not chosen:
            continue
        tags = [train_tag, test_tag] if dropout else [train_tag]
        figures.append((chosen, tags, title, ylabel, f"{file}.png"))
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
                drawn.add((kind, panel, method, variant))
                texts = []
                for tag in tags:
                    scores = finals(seeds, tag, args.final_fraction)
                    if scores:
                        mean, std = mean_std(scores)
                        texts.append(f"{mean:.2f} +- {std:.2f}{caution(len(scores))}")
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
                count = len(seeds)
                cells.append(" / ".join(texts) + f" ({variant}; {count} seed{'s' * (count != 1)})")
            table.append(f"| {panel} | " + " | ".join(cells) + " |")
        table.append("")
        if normalized_tag and not dropout:
            table += iqm_and_improvement(
                chosen, normalized_tag, args.final_fraction, args.reps, args.seed
            ) + [""]
    if not rows:
        scores = ", ".join(tag for tags in METRICS.values() for tag in tags if tag)
        raise UserError(f"{source}: the runs found log none of the scores ({scores})")
    used = sum(len(seeds) for key, seeds in groups.items() if key in drawn)
    header = [f"# Final scores ({len(runs)} runs from {source})", ""]
    header += [
        f"The figures draw {used} of the {len(runs)} runs: one variant per method and panel."
    ]
    left = [
        f"{panel}, {method}, {variant} ({len(seeds)} seed{'s' * (len(seeds) != 1)})"
        for (kind, panel, method, variant), seeds in groups.items()
        if (kind, panel, method, variant) not in drawn
    ]
    if left:
        reason = "another variant of the method was, or no figure shows it"
        header += [f"Not drawn ({reason}): " + "; ".join(sorted(left)) + "."]
    header += [""]
    os.makedirs(args.out_dir, exist_ok=True)
    for chosen, tags, title, ylabel, name in figures:
        draw(chosen, tags, title, ylabel, os.path.join(args.out_dir, name), args.points)
    with open(os.path.join(args.out_dir, "final_scores.md"), "w") as f:
        f.write("\n".join(header + table))
    with open(os.path.join(args.out_dir, "final_scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["figure", "panel", "method", "variant", "metric", "mean", "std", "seeds"])
        writer.writerows(rows)
    print(f"{len(runs)} runs -> {args.out_dir}/: " + ", ".join(sorted(os.listdir(args.out_dir))))
    return 0


def run(argv=None) -> int:
    """main() as a command: bad input (a UserError) is one line on stderr, exit status 1."""
    return run_command(main, argv, UserError, 1)


if __name__ == "__main__":
    sys.exit(run())
