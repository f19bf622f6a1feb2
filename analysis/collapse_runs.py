"""The reward-collapse probe's runs as the analysis sees them: run folders read, their arms, cells
and provenance, and the collapse definition (the first study's and the revised one). Both
analysis/collapse_stats.py (statistics) and analysis/collapse_figures.py (figures) import this
module; it imports neither.

The old definition is docs/collapse.md's ("Collapse definition (fixed before the decisive runs)"),
the revised one docs/collapse/study_c/PLAN.md's (Stage C's pre-registration).
"""

import csv
import json
import math
import os
import re
import sys
from collections import deque

import numpy as np

# --------------------------------------------------------------------------------------------------
# The collapse definition. A run has collapsed at the first update that starts a streak of
# consecutive updates in which, after learning has started (its smoothed reward was once >=
# LEARNING_STARTED), either
#   the smoothed reward stays below REWARD_FRACTION x its best so far for REWARD_UPDATES updates
#   (a reward collapse), or
#   the acting policy's entropy stays below ENTROPY_MAX for ENTROPY_UPDATES updates (an entropy
#   collapse); under the revised definition only while the smoothed reward is also below
#   ENTROPY_REWARD_FRACTION x its best so far (a confident policy that still earns is no collapse).
# Updates in which no episode ended (reward NaN) are skipped: they neither count nor break a streak.
SMOOTH_WINDOW = 10  # updates in the reward's moving average (the probe's --smooth-window default)
LEARNING_STARTED = 10.0  # percent of the optimal return; a uniformly random policy scores about -6
REWARD_FRACTION = 0.25  # "far below its best"
REWARD_UPDATES = 10  # a full moving-average window: a crash of a few updates cannot fill it
ENTROPY_MAX = 0.25  # nats, of ln 7 = 1.95 at uniform: about 96 % of the probability on one action
ENTROPY_UPDATES = 5  # per-update values, no smoothing: fewer updates make a streak
ENTROPY_REWARD_FRACTION = 0.5  # revised definition: "earning less than half of its best"
# the definition uses both; the report adds each alone as a sensitivity check
CRITERIA = ("reward", "entropy")
# "old": the first study's (docs/collapse.md), "revised": Stage C's (docs/collapse/study_c/PLAN.md)
DEFINITIONS = ("old", "revised")


def smoothed_rewards(rewards) -> tuple:
    """(indices of the updates in which an episode ended, the smoothed reward there: the mean of the
    last SMOOTH_WINDOW such updates, the best smoothed reward so far)."""
    rewards = np.asarray(rewards, dtype=float)
    indices = np.flatnonzero(np.isfinite(rewards))
    window = deque(maxlen=SMOOTH_WINDOW)
    smoothed = []
    for index in indices:
        window.append(rewards[index])
        smoothed.append(float(np.mean(window)))
    smoothed = np.array(smoothed)
    best = np.maximum.accumulate(smoothed) if len(smoothed) else smoothed
    return indices, smoothed, best


def collapse_onset(rewards, entropies, definition: str, criteria=CRITERIA) -> tuple:
    """(index of the collapse's first update, 'reward' or 'entropy'), or (None, None) if the run
    did not collapse, under `definition` ('old' or 'revised'). rewards: normalized reward per
    update (percent of optimal, NaN where no episode ended); entropies: the acting policy's entropy
    per update. The first streak of one of `criteria` to reach its length decides."""
    if definition not in DEFINITIONS:
        raise ValueError(f"definition {definition!r}: one of {', '.join(DEFINITIONS)}")
    entropies = np.asarray(entropies, dtype=float)
    streaks = {criterion: [] for criterion in criteria}  # only the criteria asked for can end it
    needed = {"reward": REWARD_UPDATES, "entropy": ENTROPY_UPDATES}
    for index, smoothed, best in zip(*smoothed_rewards(rewards)):
        started = best >= LEARNING_STARTED
        earning = definition == "old" or smoothed < ENTROPY_REWARD_FRACTION * best
        low = {
            "reward": started and smoothed < REWARD_FRACTION * best,
            "entropy": started and entropies[index] < ENTROPY_MAX and earning,
        }
        for criterion, streak in streaks.items():
            streak[:] = streak + [index] if low[criterion] else []
            if len(streak) == needed[criterion]:
                return int(streak[0]), criterion
    return None, None


def detect_collapse(rewards, entropies, definition: str) -> tuple:
    """(True, index of the collapse's first update) or (False, index of the last update: the run is
    censored there)."""
    onset, _ = collapse_onset(rewards, entropies, definition)
    return (True, onset) if onset is not None else (False, len(rewards) - 1)


def mark_collapses(runs: list, definition: str, criteria=CRITERIA) -> list:
    """Sets each run's collapse_index (None: no collapse) and collapse_criterion under `definition`
    and `criteria`; returns the runs."""
    for run in runs:
        onset = collapse_onset(
            run["normalized_reward"], run["acting_entropy"], definition, criteria
        )
        run["collapse_index"], run["collapse_criterion"] = onset
    return runs


def definition_text(definition: str) -> str:
    """The definition in one paragraph, for the reports."""
    entropy = f"the acting entropy < {ENTROPY_MAX:g} nats"
    if definition == "revised":
        entropy += (
            f" while the smoothed reward is also < {ENTROPY_REWARD_FRACTION:g} x its best so far"
        )
    return (
        f"Collapse: after the smoothed reward (moving average over {SMOOTH_WINDOW} updates) was "
        f"once >= {LEARNING_STARTED:g} % of optimal, either the smoothed reward < "
        f"{REWARD_FRACTION:g} x its best so far for {REWARD_UPDATES} consecutive updates, or "
        f"{entropy} for {ENTROPY_UPDATES}; the collapse's update is "
        "the streak's first. Runs without one are censored at their last update."
    )


# --------------------------------------------------------------------------------------------------
# Runs, arms and cells

MODE_LABELS = {
    "bn": "BN",
    "eval": "Eval",
    "bn-mdr": "BN+MDR",
    "bn-e2": "BN, 2 epochs",
    "bn-mdr21": "BN+MDR(2,1)",
    "bn-mdr12": "BN+MDR(1,2)",
}
# Rows and legends in this order; arms not listed follow, alphabetically.
MODE_ORDER = (
    "bn",
    "bn-e2",
    "eval",
    "bn-mdr",
    "bn-mdr21",
    "bn-mdr12",
    "bn-recal",
    "bn-train",
    "bn-oldtrain",
    "brn",
    "brn-mdr",
    "bn-wn",
    "gn",
    "ln",
    "none",
    "dropout",
    "dropout-mdr",
)
DROPOUT_MODES = ("dropout", "dropout-mdr")  # the modes whose arm names their dropout probability
SETTINGS = ("clip_coef", "ent_coef", "bn_momentum", "view_batching")  # a cell = arm + these
SETTING_LABELS = {
    "clip_coef": "clip",
    "ent_coef": "ent",
    "bn_momentum": "bnm",
    "view_batching": "views",
}
SERIES = (
    "iteration",
    "global_step",
    "normalized_reward",
    "smoothed_reward",
    "delta_pi_minus",
    "entropy",
)
DEFAULT_EPOCHS = 3  # the probe's --update-epochs default
DEFAULT_MDR = (2, 1)  # the probe's default split of the MDR modes
# provenance entries that must agree between runs that are paired (summary.json "provenance")
PROVENANCE_FIELDS = ("commit", "cpu", "torch")


class ConfigError(Exception):
    """Bad input: printed as one line, no traceback."""


def mode_label(mode: str) -> str:
    return MODE_LABELS.get(mode, mode)


def mode_rank(arm: str) -> tuple:
    """Arms in MODE_ORDER of their mode (an arm with a dropout probability: of the mode before it,
    then by the probability); the others after, alphabetically."""
    mode, _, p = arm.partition(" p")
    if mode not in MODE_ORDER:
        return (len(MODE_ORDER), arm)
    return (MODE_ORDER.index(mode), p)


def arm_name(mode: str, alpha1, alpha2, dropout_p=None) -> str:
    """A run's arm: its mode, and what it changed of the update's epochs: '-e<E>' for a mode that
    trains all E epochs in train mode with E != DEFAULT_EPOCHS, the split for an MDR mode other
    than MDR(2,1) ('bn-mdr12'); a dropout mode's probability after it ('dropout p0.1', so that two
    probabilities are never one arm; 'dropout p?' where the run recorded none). The runs of the
    first studies (all at the defaults) keep their mode. alpha1/alpha2 None: not recorded (the
    defaults)."""
    if alpha1 is None or alpha2 is None:
        arm = mode
    elif alpha2 == 0:
        arm = mode if alpha1 == DEFAULT_EPOCHS else f"{mode}-e{alpha1}"
    else:
        arm = mode if (alpha1, alpha2) == DEFAULT_MDR else f"{mode}{alpha1}{alpha2}"
    if mode in DROPOUT_MODES:
        arm += f" p{format_setting(dropout_p)}"
    return arm


def read_float(value) -> float:
    return float(value) if value not in (None, "") else math.nan


class CorruptRun(Exception):
    """A run file that cannot be read: the run is skipped with one warning line."""


def read_metrics(path: str) -> list:
    """The rows of a metrics.csv as dicts; a last row that a killed run left half-written is
    dropped. CorruptRun (the reason) if the file is unreadable or lacks a column the analysis
    reads."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CorruptRun(f"unreadable ({error})") from None
    if rows and None in rows[-1].values():  # fewer fields than the header: cut off mid-line
        rows = rows[:-1]
    missing = [c for c in (*SERIES, "mode", "seed", "clip_coef", "ent_coef") if c not in header]
    if "acting_entropy" not in header and "entropy" in missing:
        missing.append("acting_entropy")
    if header and missing:
        raise CorruptRun(f"no column {', '.join(missing)}")
    return rows


def read_json_file(path: str):
    """The JSON value in `path`, None if there is no such file (a run that did not finish);
    CorruptRun (the reason) if it cannot be read or parsed."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CorruptRun(f"unreadable ({error})") from None


def read_summary(path: str) -> dict:
    """summary.json as a dict ({} if there is none: the run did not finish), its
    provenance_segments always a list ([] where the run recorded none); CorruptRun (the reason) if
    it cannot be read."""
    summary = read_json_file(path)
    if summary is None:
        return {}
    if not isinstance(summary, dict) or not isinstance(summary.get("args", {}), dict):
        raise CorruptRun("not a summary.json of ppo_collapse_probe.py (no args object)")
    segments = summary.get("provenance_segments")
    if segments is None:  # the last process's entry alone, or nothing (the first studies' runs)
        segments = [summary["provenance"]] if summary.get("provenance") else []
    if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
        raise CorruptRun("its provenance is not a list of objects")
    summary["provenance_segments"] = segments
    return summary


def read_hosts(path: str) -> list:
    """hosts.jsonl (sweeps/run_and_commit.sh: the machine of each start of a queued run) as a list
    of dicts, [] if there is none; CorruptRun (the file and the reason) if a line is not a JSON
    object."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CorruptRun(f"{path}: unreadable ({error})") from None
    if not all(isinstance(record, dict) for record in records):
        raise CorruptRun(f"{path}: a line is not a JSON object")
    return records


def host_text(record: dict) -> str:
    """A hosts.jsonl record as the scripts' provenance() names a CPU: model name, family, model,
    stepping and torch's kernels."""
    fields = [("cpu family", "cpu_family"), ("model", "model"), ("stepping", "stepping")]
    generation = ", ".join(f"{name} {record[key]}" for name, key in fields if record.get(key))
    name = record.get("model_name") or "unknown CPU"
    kernels = record.get("torch_cpu_capability") or "unknown"
    return f"{name}{f' ({generation})' if generation else ''}, {kernels} kernels"


def read_run(folder: str, name: str):
    """One run folder as a dict (see read_runs_and_skipped), None if its metrics.csv has no update
    yet; CorruptRun (the file and the reason) if it cannot be read."""
    metrics_path, summary_path = (os.path.join(folder, f) for f in ("metrics.csv", "summary.json"))
    try:
        rows = read_metrics(metrics_path)
    except CorruptRun as error:
        raise CorruptRun(f"{metrics_path}: {error}") from None
    if not rows:
        return None
    try:
        summary = read_summary(summary_path)
    except CorruptRun as error:
        raise CorruptRun(f"{summary_path}: {error}") from None
    hosts = read_hosts(os.path.join(folder, "hosts.jsonl"))
    run_args = summary.get("args", {})
    first = rows[0]
    try:
        alphas = [
            int(float(first[key])) if first.get(key) not in (None, "") else run_args.get(key)
            for key in ("alpha1", "alpha2")
        ]
        # a column of its own or the summary's args; None: a run from before the flag
        dropout_p = first.get("dropout_p")
        dropout_p = run_args.get("dropout_p") if dropout_p in (None, "") else dropout_p
        recorded = first["mode"] in DROPOUT_MODES and dropout_p is not None
        dropout_p = float(dropout_p) if recorded else None
        run = {
            "name": name,
            "status": summary.get("status", "completed") if summary else "unfinished",
            "mode": first["mode"],
            "seed": int(first["seed"]),
            "clip_coef": float(first["clip_coef"]),
            "ent_coef": float(first["ent_coef"]),
            "alpha1": alphas[0],
            "alpha2": alphas[1],
            # the dropout modes' probability (None for the other modes, or not recorded)
            "dropout_p": dropout_p,
            "bn_momentum": run_args.get("bn_momentum"),  # None: no summary.json (not finished)
            # runs before the flag: joint
            "view_batching": run_args.get("view_batching", "joint" if run_args else None),
            "args": run_args,
            "provenance": summary.get("provenance_segments", []),
            "hosts": hosts,  # [] for a run made outside the queue or before it recorded them
            "wall_time_s": summary.get("wall_time_s", read_float(rows[-1].get("wall_time"))),
            "collapse_index": None,  # set by mark_collapses
            "collapse_criterion": None,
        }
        run["arm"] = arm_name(run["mode"], *alphas, dropout_p)
        for column in SERIES:
            run[column] = np.array([read_float(row[column]) for row in rows])
        run["entropy_source"] = "acting_entropy" if "acting_entropy" in first else "entropy"
        run["acting_entropy"] = np.array([read_float(row[run["entropy_source"]]) for row in rows])
        # NaN in runs before the column
        signed = [read_float(row.get("trust_region_violation_signed")) for row in rows]
        run["trust_region_violation_signed"] = np.array(signed)
    except (ValueError, TypeError) as error:
        raise CorruptRun(f"{metrics_path}: a value that is not a number ({error})") from None
    if not run["mode"]:
        raise CorruptRun(f"{metrics_path}: no mode in its first row")
    return run


def read_runs_and_skipped(runs_dir: str, option: str = "--runs-dir", allow_none=False) -> tuple:
    """(runs, skipped): every metrics.csv under runs_dir (recursively) that can be read as a run
    dict, and (file, reason) for each that cannot (each also a warning line on stderr). A run dict:
    name (folder relative to runs_dir), status (summary.json's, 'unfinished' without one), mode,
    arm, seed, alpha1/alpha2, the cell settings, args (summary.json's), provenance (its segments,
    [] if not recorded), hosts (hosts.jsonl's records, [] without one), wall_time_s, one array per
    SERIES column and acting_entropy: the eval-mode acting policy's entropy where the run logged
    it, else the loss's (train-mode) entropy, which is all that old runs have (entropy_source says
    which). No run at all is a ConfigError unless allow_none (a study that has not begun)."""
    if not os.path.isdir(runs_dir):
        raise ConfigError(f"{option} {runs_dir}: no such folder")
    runs, skipped = [], []
    for root, dirs, files in os.walk(runs_dir):
        dirs.sort()
        if "metrics.csv" not in files:
            continue
        name = os.path.relpath(root, runs_dir)
        try:
            run = read_run(root, name)
        except CorruptRun as error:
            print(f"warning: skipped {error}", file=sys.stderr)
            skipped.append(str(error))
            continue
        if run is not None:
            runs.append(run)
    if not runs and not allow_none:
        raise ConfigError(f"{option} {runs_dir}: no runs found (no non-empty metrics.csv below it)")
    return runs, skipped


def read_runs(runs_dir: str, option: str = "--runs-dir") -> list:
    """The runs of read_runs_and_skipped."""
    return read_runs_and_skipped(runs_dir, option)[0]


def finished(runs: list) -> tuple:
    """(completed runs, the others): the others are named in the reports, never analysed."""
    return (
        [run for run in runs if run["status"] == "completed"],
        [run for run in runs if run["status"] != "completed"],
    )


def format_setting(value) -> str:
    if value is None:
        return "?"
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell_key(run) -> tuple:
    return (run["arm"],) + tuple(run[setting] for setting in SETTINGS)


def sort_key(key: tuple) -> tuple:
    """Cells ordered by arm (MODE_ORDER), then by settings (None, i.e. unknown, first)."""
    return (mode_rank(key[0]),) + tuple((value is not None, str(value)) for value in key[1:])


def group_runs(runs: list, key=cell_key) -> dict:
    """{key: runs sorted by seed}, keys in sort_key order."""
    groups = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return {k: sorted(groups[k], key=lambda run: run["seed"]) for k in sorted(groups, key=sort_key)}


def varying_settings(runs: list) -> list:
    """The settings that differ between runs (the only ones worth naming in a label)."""
    return [
        setting for setting in SETTINGS if len({format_setting(run[setting]) for run in runs}) > 1
    ]


def cell_label(key: tuple, shown: list) -> str:
    settings = dict(zip(SETTINGS, key[1:]))
    return ", ".join(
        [mode_label(key[0])] + [f"{SETTING_LABELS[s]} {format_setting(settings[s])}" for s in shown]
    )


# --------------------------------------------------------------------------------------------------
# Selecting runs (the command lines' --cell, --modes, --seeds)


def matches(setting, value: str) -> bool:
    if isinstance(setting, float):
        try:
            return math.isclose(setting, float(value))
        except ValueError:
            return False
    return format_setting(setting) == value


def select_cells(runs: list, cell: str) -> list:
    """Runs whose settings match every key=value of `cell` (keys: mode, i.e. the arm, p, the
    dropout probability, and the SETTING_LABELS values)."""
    keys = {"mode": "arm", **{label: setting for setting, label in SETTING_LABELS.items()}}
    keys["p"] = "dropout_p"
    selected = runs
    for item in filter(None, cell.split(",")):
        name, _, value = item.partition("=")
        if name not in keys or not value:
            raise ConfigError(
                f"--cell {cell}: '{item}' is not key=value with key one of {', '.join(keys)}"
            )
        setting = keys[name]
        selected = [run for run in selected if matches(run[setting], value)]
    if not selected:
        found = [cell_label(key, SETTINGS) for key in group_runs(runs)]
        raise ConfigError(f"--cell {cell}: no runs match (cells found: {'; '.join(found)})")
    return selected


def select_modes(runs: list, modes: str) -> list:
    """Runs of the comma-separated arms `modes` (all runs if empty); one without runs is an
    error."""
    wanted = [mode for mode in modes.split(",") if mode]
    missing = sorted(set(wanted) - {run["arm"] for run in runs})
    if missing:
        found = ", ".join(sorted({run["arm"] for run in runs}))
        raise ConfigError(
            f"--modes {modes}: no runs of {', '.join(missing)} (modes found: {found})"
        )
    return [run for run in runs if not wanted or run["arm"] in wanted]


def parse_seeds(seeds: str) -> list:
    """[(low, high)] of "1-4", "1,2,5" or a mix."""
    ranges = []
    for item in seeds.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or int(high or low) < int(low):
            raise ConfigError(f"--seeds {seeds}: '{item}' is not a seed or a range like 1-4")
        ranges.append((int(low), int(high or low)))
    return ranges


def select_seeds(runs: list, seeds: str) -> list:
    """Runs whose seed is in `seeds` ("1-4", "1,2,5" or a mix; all runs if empty)."""
    if not seeds:
        return runs
    ranges = parse_seeds(seeds)
    selected = [run for run in runs if any(low <= run["seed"] <= high for low, high in ranges)]
    if not selected:
        raise ConfigError(f"--seeds {seeds}: no runs with these seeds")
    return selected


# --------------------------------------------------------------------------------------------------
# Provenance: where each run was computed (summary.json "provenance_segments", one per process)


def provenance_key(segment: dict) -> tuple:
    return tuple(segment.get(field) for field in PROVENANCE_FIELDS)


def provenance_text(key: tuple) -> str:
    commit, cpu, torch = key
    return (
        f"commit {commit[:7] if commit else 'unknown (not a git checkout)'}, {cpu}, torch {torch}"
    )


def run_provenance(run):
    """The run's (commit, cpu, torch); None if it recorded none (the first studies' runs). A run
    whose processes disagree (resumed on another commit or machine) is a ConfigError."""
    keys = {provenance_key(segment) for segment in run["provenance"]}
    if len(keys) > 1:
        parts = [
            f"from update {segment.get('from_iteration', '?')}: "
            + provenance_text(provenance_key(segment))
            for segment in run["provenance"]
        ]
        raise ConfigError(
            f"{run['name']} was resumed on another commit or machine ({'; '.join(parts)}); "
            "rerun it, or pass --allow-mixed"
        )
    return next(iter(keys), None)


def check_provenance(groups: list, allow_mixed: bool) -> None:
    """Each group (runs paired with each other) must come from one commit, CPU model and torch
    version: a ConfigError naming the runs otherwise, unless allow_mixed. Runs that recorded no
    provenance are accepted (unknown)."""
    if allow_mixed:
        return
    for group in groups:
        by_key = {}
        for run in group:
            key = run_provenance(run)
            if key is not None:
                by_key.setdefault(key, []).append(run["name"])
        if len(by_key) > 1:
            parts = []
            for key, names in by_key.items():
                shown = ", ".join(sorted(names)[:3]) + (
                    f" and {len(names) - 3} more" if len(names) > 3 else ""
                )
                parts.append(f"{shown} ({provenance_text(key)})")
            raise ConfigError(
                "runs that are paired come from different commits or machines: "
                + " vs ".join(parts)
                + "; pass --allow-mixed to pair them anyway"
            )


def provenance_summary(runs: list, allow_mixed: bool = False) -> str:
    """One sentence: where the runs were computed, how many of them recorded nothing (unknown),
    which came from a tree with uncommitted changes, and whether runs of different provenance were
    paired (allow_mixed)."""
    by_key, unknown, dirty = {}, [], []
    for run in runs:
        keys = [provenance_key(segment) for segment in run["provenance"]]
        if not keys:
            unknown.append(run["name"])
        for key in dict.fromkeys(keys):
            by_key.setdefault(key, []).append(run["name"])
        if any(segment.get("dirty") for segment in run["provenance"]):
            dirty.append(run["name"])
    parts = [f"{len(names)} from {provenance_text(key)}" for key, names in by_key.items()]
    if unknown:
        parts.append(f"{len(unknown)} unknown (made before runs recorded it)")
    text = f"Provenance of the {len(runs)} runs: " + "; ".join(parts) + "."
    if dirty:
        text += " From a tree with uncommitted changes: " + ", ".join(sorted(dirty)) + "."
    if allow_mixed and len(by_key) > 1:
        text += " Runs of different provenance were paired (--allow-mixed)."
    return text + hosts_summary(runs)


def hosts_summary(runs: list) -> str:
    """'' if no run has a hosts.jsonl; else a sentence: how many runs started on each CPU kind (a
    run resumed on another kind counts under both, joined by "then"), and which recorded fewer
    starts than the processes its summary.json lists (started before the queue recorded them)."""
    recorded = [run for run in runs if run.get("hosts")]
    if not recorded:
        return ""
    by_kinds, partial = {}, []
    for run in recorded:
        kinds = " then ".join(dict.fromkeys(host_text(record) for record in run["hosts"]))
        by_kinds.setdefault(kinds, []).append(run["name"])
        if len(run["hosts"]) < len(run["provenance"]):
            partial.append(run["name"])
    parts = [f"{len(names)} on {kinds}" for kinds, names in by_kinds.items()]
    text = (
        f" Machines of their starts (hosts.jsonl, {len(recorded)} runs): " + "; ".join(parts) + "."
    )
    if partial:
        text += " Not every start recorded (the first ones ran before the queue recorded them): "
        text += ", ".join(sorted(partial)) + "."
    if len(recorded) < len(runs):
        missing = len(runs) - len(recorded)
        text += f" {missing} {'run has' if missing == 1 else 'runs have'} no hosts.jsonl."
    return text


# --------------------------------------------------------------------------------------------------
# CPU kinds (docs/dropout/PLAN.md, 2026-12-04): which kind of CPU ran each start of a run. A kind is
# (cpu family, model, torch's CPU capability): runs of one seed differ across kinds.

KIND_CHECKS_FILE = "cpu_kinds.jsonl"  # sweeps/check_cpu_kind.py's records, at a runs folder's top
KIND_FIELDS = ("cpu_family", "model", "torch_cpu_capability")
# the scripts' provenance() CPU string from 2026-12-04 on names the kind itself
CPU_STRING_KIND = re.compile(
    r"\(cpu family (\S+), model (\S+)(?:, stepping \S+)?\), (\S+) kernels$"
)


def record_kind(record: dict):
    """A hosts.jsonl (or check) record's kind, None if it lacks a field or torch could not name its
    kernels."""
    kind = tuple(record.get(field) for field in KIND_FIELDS)
    if any(value in (None, "", "unknown") for value in kind):
        return None
    return tuple(str(value) for value in kind)


def segment_kind(segment: dict):
    """A provenance segment's kind where its CPU string names one (scripts from 2026-12-04)."""
    found = CPU_STRING_KIND.search(str(segment.get("cpu") or ""))
    return found.groups() if found else None


def kind_text(kind: tuple) -> str:
    family, model, capability = kind
    return f"family {family} model {model} ({capability})"


def read_kind_checks(runs_dir: str) -> dict:
    """runs_dir's cpu_kinds.jsonl as {run name as its records give it: [its records, in order]},
    {} without one; a ConfigError (the file and the reason) if a line is not a check record."""
    path = os.path.join(runs_dir, KIND_CHECKS_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{path}: unreadable ({error})") from None
    checks = {}
    for record in records:
        if not (
            isinstance(record, dict)
            and isinstance(record.get("run"), str)
            and isinstance(record.get("same"), bool)
            and isinstance(record.get("commit"), str)
            and isinstance(record.get("host"), dict)
            and record_kind(record["host"])
        ):
            raise ConfigError(
                f"{path}: a line is not a record of sweeps/check_cpu_kind.py (run, same, commit, "
                "host)"
            )
        checks.setdefault(record["run"], []).append(record)
    return checks


def run_checks(checks: dict, name: str) -> list:
    """The check records of the run folder `name` (relative to the runs folder): its own, and
    those whose run name ends with it (a record names the run as its command list does)."""
    return [
        record
        for run, records in checks.items()
        if run == name or run.endswith("/" + name)
        for record in records
    ]


def checked_kind(run: dict, records: list) -> tuple:
    """(the kind on which the checks reproduced the run's first updates or None, the kinds on which
    they did not, why they cannot be used or ''). A check of another commit than the run's first
    start proves nothing; two kinds that both reproduce it, or one that does and does not,
    contradict each other (the runs of one seed are bit-identical on one kind only)."""
    segments = run["provenance"]
    commit = segments[0].get("commit") if segments else None
    for record in records:
        if record["commit"] != commit:
            return (
                None,
                set(),
                (
                    f"its check reran commit {record['commit'][:7]}, not the run's "
                    f"{str(commit)[:7]} ({KIND_CHECKS_FILE})"
                ),
            )
    same = {record_kind(record["host"]) for record in records if record["same"]}
    differ = {record_kind(record["host"]) for record in records if not record["same"]}
    if len(same) > 1 or same & differ:
        shown = " and ".join(kind_text(kind) for kind in sorted(same | differ))
        return None, set(), f"its checks on {shown} contradict each other ({KIND_CHECKS_FILE})"
    return next(iter(same), None), differ, ""


def recorded_kinds(run: dict) -> tuple:
    """([each start's kind or None], why the records cannot be aligned or ''). hosts.jsonl's
    records are the last starts (the first ones may have run before the queue recorded them, i.e.
    before 2026-12-04 02:31 UTC) and win over a segment's CPU string, which must not disagree. A
    start stopped before its first checkpoint leaves a record but no segment (its updates were
    redone): with more records than segments, which records made the rows is unknown, so they
    must all name one kind."""
    segments, hosts = run["provenance"], run.get("hosts") or []
    if len(hosts) > len(segments):
        kinds = {record_kind(record) for record in hosts}
        kinds |= {segment_kind(segment) for segment in segments} - {None}
        if len(kinds) == 1 and None not in kinds:
            return [next(iter(kinds))] * len(segments), ""
        return [None] * len(segments), (
            f"hosts.jsonl records {len(hosts)} starts, summary.json {len(segments)}, and not "
            "all on one known kind"
        )
    unrecorded = len(segments) - len(hosts)
    kinds = []
    for index, segment in enumerate(segments):
        stated = segment_kind(segment)
        recorded = record_kind(hosts[index - unrecorded]) if index >= unrecorded else None
        if stated and recorded and stated != recorded:
            return [None] * len(segments), (
                f"start {index + 1}: hosts.jsonl says {kind_text(recorded)}, its CPU string "
                f"{kind_text(stated)}"
            )
        kinds.append(recorded or stated)
    return kinds, ""


def start_kinds(run: dict, checks=()) -> tuple:
    """(the set of CPU kinds of every start of the run, ''), or (None, why) when a start's kind is
    unknown. A start's kind comes from hosts.jsonl or its provenance segment's CPU string
    (recorded_kinds), and, for an unrecorded first start, from the checks
    (sweeps/check_cpu_kind.py, read_kind_checks) that reproduced the run's first updates on a
    known kind; a check that contradicts a recorded first start leaves the run's kinds unknown."""
    if not run["provenance"]:
        return None, "no record of its starts"
    checks = list(checks)
    kinds, why = recorded_kinds(run)
    if not why:
        reproduced, differ, why = checked_kind(run, checks)
    if why:
        return None, why
    if kinds[0] is not None and (reproduced not in (None, kinds[0]) or kinds[0] in differ):
        verdict = f"reproduced on {kind_text(reproduced)}" if reproduced else "not reproduced"
        return None, (
            f"its first start is recorded on {kind_text(kinds[0])}, but its check {verdict} "
            f"({KIND_CHECKS_FILE})"
        )
    kinds[0] = kinds[0] or reproduced
    unknown = [index for index, kind in enumerate(kinds) if kind is None]
    if not unknown:
        return set(kinds), ""
    if unknown == [0] and differ:
        shown = " and ".join(kind_text(kind) for kind in sorted(differ))
        updates = max(record.get("updates", 0) for record in checks)
        return None, (
            f"its first start is unrecorded, and its first {updates or '?'} updates rerun on "
            f"{shown} differ ({KIND_CHECKS_FILE})"
        )
    unrecorded = len(run["provenance"]) - len(run.get("hosts") or [])
    parts = []
    for missing, what in (
        ([i for i in unknown if i < unrecorded], "unrecorded"),
        ([i for i in unknown if i >= unrecorded], "recorded without its CPU kind"),
    ):
        if missing:
            parts.append(f"start {', '.join(str(i + 1) for i in missing)} of {len(kinds)} {what}")
    unchecked = f" and not checked ({KIND_CHECKS_FILE})" if unknown[0] == 0 and not checks else ""
    return None, "; ".join(parts) + unchecked


def kinds_cell(run: dict, checks: dict) -> str:
    """The CPU kinds of every start of a run, for a report's table of runs ('family 25 model 17
    (AVX512)', two joined by ' and '), or 'unknown: why' (start_kinds with the run's checks)."""
    kinds, why = start_kinds(run, run_checks(checks, run["name"]))
    if kinds is None:
        return f"unknown: {why}"
    return " and ".join(kind_text(kind) for kind in sorted(kinds))


# --------------------------------------------------------------------------------------------------
# Stage C (docs/collapse/study_c/PLAN.md): its arms, its two families of runs, its fixed regime

STAGE_C_ARMS = {  # (mode, alpha1 train-mode epochs, alpha2 eval-mode epochs) -> the plan's arm
    ("bn", 3, 0): "bn",
    ("bn", 2, 0): "bn-e2",
    ("bn-mdr", 2, 1): "bn-mdr21",
    ("bn-mdr", 1, 2): "bn-mdr12",
}
# a family: the runs of one folder of the study (its task images), with their arms and paired seeds
STAGE_C_FAMILIES = {
    "procedural": (("bn", "bn-e2", "bn-mdr21", "bn-mdr12"), range(11, 27)),
    "photos": (("bn", "bn-mdr21"), range(11, 19)),
}
# what every run of the plan has (its summary.json args); 25600 steps = 200 updates of 128
STAGE_C_REGIME = {
    "clip_coef": 0.2,
    "ent_coef": 0.01,
    "bn_momentum": 0.1,
    "view_batching": "separate",
    "total_timesteps": 25600,
}
STAGE_C_PHOTO_TARGETS = 2  # --targets-per-image of the photo runs


def stage_c_runs(runs: list) -> list:
    """Sets each run's arm (the plan's name) and family (its first folder: procedural or photos);
    returns the runs. A ConfigError for a run the plan does not have: outside the two folders, of
    an unknown arm, with a seed outside its family's, a second run of one arm and seed, or a
    finished run of another regime."""
    seen = {}
    for run in runs:
        family = run["name"].split(os.sep)[0]
        if family not in STAGE_C_FAMILIES:
            folders = " or ".join(f"{name}/" for name in STAGE_C_FAMILIES)
            raise ConfigError(f"{run['name']}: not a run of Stage C's plan (not under {folders})")
        arms, seeds = STAGE_C_FAMILIES[family]
        arm = STAGE_C_ARMS.get((run["mode"], run["alpha1"], run["alpha2"]))
        if arm not in arms:
            raise ConfigError(
                f"{run['name']}: --mode {run['mode']} with {run['alpha1']} train-mode and "
                f"{run['alpha2']} eval-mode epochs is not an arm of the plan's {family} runs "
                f"({', '.join(arms)})"
            )
        if run["seed"] not in seeds:
            raise ConfigError(
                f"{run['name']}: seed {run['seed']} is not one of the plan's {family} seeds "
                f"({seeds[0]}-{seeds[-1]})"
            )
        twin = seen.setdefault((family, arm, run["seed"]), run["name"])
        if twin != run["name"]:
            raise ConfigError(f"{twin} and {run['name']}: two runs of {arm}, seed {run['seed']}")
        if run["status"] != "unfinished":
            check_stage_c_regime(run, family)
        run["arm"], run["family"] = arm, family
    return runs


def check_stage_c_regime(run, family: str) -> None:
    """A finished run of Stage C has the plan's settings (its summary.json args)."""
    found = {key: run["args"].get(key, run.get(key)) for key in STAGE_C_REGIME}
    wrong = [key for key, value in STAGE_C_REGIME.items() if not matches(found[key], str(value))]
    if family == "procedural" and run["args"].get("image_source") != "procedural":
        wrong.append("image_source")
    if family == "photos" and (
        run["args"].get("image_source") == "procedural"
        or run["args"].get("targets_per_image") != STAGE_C_PHOTO_TARGETS
    ):
        wrong += ["image_source", "targets_per_image"]
    if wrong:
        got = ", ".join(f"{key} {run['args'].get(key, run.get(key))}" for key in wrong)
        plan = ", ".join(f"{key} {value}" for key, value in STAGE_C_REGIME.items())
        raise ConfigError(f"{run['name']}: {got}: not the plan's regime ({plan}; {family} images)")


# --------------------------------------------------------------------------------------------------
# The dropout study's Study 1 (docs/dropout/PLAN.md): its arms, probabilities, seeds and regime

DROPOUT_ARMS = {  # (mode, alpha1, alpha2) -> the plan's arm, before its probability
    ("none", 3, 0): "none",
    ("dropout", 3, 0): "dropout",
    ("dropout-mdr", 2, 1): "dropout-mdr",
}
DROPOUT_STEPS = {0.1: 1, 0.2: 2}  # the plan's dropout probabilities -> the step that runs them
DROPOUT_SEEDS = range(31, 43)  # fresh paired seeds 31-42
# what every run of the plan has (its summary.json args): Stage C's regime, BN momentum aside
DROPOUT_REGIME = {key: value for key, value in STAGE_C_REGIME.items() if key != "bn_momentum"}


def with_p(arm: str, p) -> str:
    """The plan's arm at dropout probability p: 'dropout p0.1'; none has no probability."""
    return arm if arm == "none" else f"{arm} p{format_setting(p)}"


def dropout_study_runs(runs: list) -> list:
    """Sets each run's arm ('none', 'dropout p0.1', 'dropout-mdr p0.2', ...) and returns the runs.
    A ConfigError for a run the plan does not have: of another mode or epoch split, at another
    probability, with a seed outside 31-42, a second run of one arm and seed, or a finished run of
    another regime. A run that has not finished and recorded no probability yet (its summary.json
    is written at the end) keeps 'p?': it is named, never analysed."""
    seen = {}
    for run in runs:
        arm = DROPOUT_ARMS.get((run["mode"], run["alpha1"], run["alpha2"]))
        if arm is None:
            arms = ", ".join(f"--mode {mode} ({a1},{a2})" for mode, a1, a2 in DROPOUT_ARMS)
            raise ConfigError(
                f"{run['name']}: --mode {run['mode']} with {run['alpha1']} train-mode and "
                f"{run['alpha2']} eval-mode epochs is not an arm of the plan ({arms})"
            )
        p = run["dropout_p"]
        known = arm == "none" or (
            p is not None and any(math.isclose(p, planned) for planned in DROPOUT_STEPS)
        )
        if not known and (p is not None or run["status"] != "unfinished"):
            planned = " or ".join(f"{planned:g}" for planned in DROPOUT_STEPS)
            raise ConfigError(
                f"{run['name']}: dropout probability {format_setting(p)} is not the plan's "
                f"({planned})"
            )
        if run["seed"] not in DROPOUT_SEEDS:
            raise ConfigError(
                f"{run['name']}: seed {run['seed']} is not one of the plan's seeds "
                f"({DROPOUT_SEEDS[0]}-{DROPOUT_SEEDS[-1]})"
            )
        run["arm"] = with_p(arm, p)
        # two killed runs that recorded no probability yet may be of two probabilities
        twin = seen.setdefault((run["arm"], run["seed"]), run["name"]) if known else run["name"]
        if twin != run["name"]:
            raise ConfigError(
                f"{twin} and {run['name']}: two runs of {run['arm']}, seed {run['seed']}"
            )
        if run["status"] != "unfinished":
            check_dropout_regime(run)
    return runs


def check_dropout_regime(run) -> None:
    """A finished run of the dropout study has the plan's settings (its summary.json args)."""
    found = {key: run["args"].get(key, run.get(key)) for key in DROPOUT_REGIME}
    wrong = [key for key, value in DROPOUT_REGIME.items() if not matches(found[key], str(value))]
    if run["args"].get("image_source") != "procedural":
        wrong.append("image_source")
    if wrong:
        got = ", ".join(f"{key} {run['args'].get(key, run.get(key))}" for key in wrong)
        plan = ", ".join(f"{key} {value}" for key, value in DROPOUT_REGIME.items())
        raise ConfigError(
            f"{run['name']}: {got}: not the plan's regime ({plan}; procedural images)"
        )
