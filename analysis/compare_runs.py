"""Did a code change alter training? Compare the logged values of two runs tag by tag, step by step.

    python analysis/compare_runs.py runs/before runs/after \
        [--ignore charts/SPS perf/] [--tolerance 0]

Each run is a TensorBoard folder (the training scripts) or a folder with a metrics.csv (the collapse
probe). Prints one line per tag: SAME, DIFF (with the first step that differs) or ONLY IN A/B; exits
0 when every shared tag is equal within --tolerance (absolute), 1 otherwise, and 2 with one line on
stderr for bad input (a missing folder, an unreadable metrics.csv). Used to check that the issue-11
restructure changed no value (docs/benchmarks.md, "Readability restructure: same values before and
after").
"""

import argparse
import csv
import math
import os
import sys

from cli import ArgumentParser, run_command

# tags that measure the machine, not training (the default --ignore)
TIMING_TAGS = ("charts/SPS", "perf/", "sps", "wall_time")


class BadInput(Exception):
    """Printed as one line on stderr, exit status 2."""


def tolerance(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def is_number(value) -> bool:
    """A CSV cell that is a number: digits with at most one '.', '-' and 'e' each, or 'nan' (None,
    a cell missing from a short row, is not)."""
    if not isinstance(value, str):
        return False
    return value.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit() or (
        value == "nan"
    )


def load(folder: str) -> dict:
    """{tag: [(step, value), ...]} from metrics.csv (columns as tags, global_step as step) or
    TensorBoard events; BadInput for a metrics.csv that cannot be read."""
    csv_path = os.path.join(folder, "metrics.csv")
    if os.path.isfile(csv_path):
        try:
            with open(csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows and "global_step" not in rows[0]:
                raise BadInput(f"{csv_path}: no global_step column")
            tags = (
                [
                    key
                    for key in rows[0]
                    if key not in ("global_step", None) and all(is_number(row[key]) for row in rows)
                ]
                if rows
                else []
            )
            return {
                tag: [(int(float(row["global_step"])), float(row[tag])) for row in rows]
                for tag in tags
            }
        except (OSError, UnicodeDecodeError, csv.Error, TypeError, ValueError) as error:
            raise BadInput(f"{csv_path}: unreadable ({error})") from None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(folder, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def compare(a: dict, b: dict, ignore=(), tolerance=0.0) -> list:
    """[(status, tag, detail)] for every tag of a or b not starting with one of `ignore`."""
    rows = []
    for tag in sorted(set(a) | set(b)):
        if tag.startswith(tuple(ignore)):
            continue
        if tag not in a or tag not in b:
            rows.append(("ONLY IN " + ("B" if tag in b else "A"), tag, ""))
            continue
        if [step for step, _ in a[tag]] != [step for step, _ in b[tag]]:
            rows.append(("DIFF", tag, f"steps differ: {len(a[tag])} vs {len(b[tag])} values"))
            continue
        for (step, x), (_, y) in zip(a[tag], b[tag]):
            if not (x == y or (math.isnan(x) and math.isnan(y)) or abs(x - y) <= tolerance):
                rows.append(("DIFF", tag, f"first at step {step}: {x!r} vs {y!r}"))
                break
        else:
            rows.append(("SAME", tag, f"{len(a[tag])} values"))
    return rows


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument(
        "--ignore",
        nargs="*",
        default=list(TIMING_TAGS),
        help="tag prefixes",
    )
    parser.add_argument(
        "--tolerance",
        type=tolerance,
        default=0.0,
        help="absolute tolerance, >= 0 (default: bitwise equal)",
    )
    args = parser.parse_args(argv)
    for folder in (args.run_a, args.run_b):
        if not os.path.isdir(folder):
            raise BadInput(
                f"{folder}: no such folder (a run folder with TensorBoard events or a metrics.csv)"
            )
    a, b = load(args.run_a), load(args.run_b)
    if not a or not b:
        raise BadInput(f"no logged values in {args.run_a if not a else args.run_b}")
    rows = compare(a, b, args.ignore, args.tolerance)
    for status, tag, detail in rows:
        print(f"{status:10} {tag}  {detail}")
    return int(any(status == "DIFF" for status, _, _ in rows))


def run(argv=None) -> int:
    """main() as a command: bad input is one line on stderr, exit status 2."""
    return run_command(main, argv, BadInput, 2)


if __name__ == "__main__":
    sys.exit(run())
