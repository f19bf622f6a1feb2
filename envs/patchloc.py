"""Patch-localization task sets and environments (a single gymnasium.Env and a native batched
VectorEnv).

See envs/__init__.py for the task, envs/lattice.py for the window dynamics and the exact optimal
return, envs/images.py for the image sources, envs/slides.py for whole-slide images.
"""

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from envs.images import (
    PatchLocConfigError,
    UnusableImage,
    build_pyramid,
    list_image_files,
    load_image,
    procedural_image,
)
from envs.lattice import (
    ACTION_NAMES,
    INITIAL_STATE,
    IOU,
    NORMALIZED_BOXES,
    NUM_ACTIONS,
    STATES,
    STOP,
    TRANSITIONS,
    EpisodeConfig,
    optimal_actions,
    optimal_returns,
)
from envs.slides import (
    DEFAULT_MIN_TISSUE,
    DEFAULT_REGIONS_PER_SLIDE,
    SlideSource,
    describe_record,
    is_slide,
    mpp_warning,
    slide_regions,
    slide_settings,
)

try:  # gymnasium >= 1.1 declares the autoreset mode of a vector env in its metadata
    from gymnasium.vector import AutoresetMode

    _AUTORESET_MODE: Any = AutoresetMode.SAME_STEP
except ImportError:  # pragma: no cover - older gymnasium
    _AUTORESET_MODE = "same-step"

logger = logging.getLogger(__name__)

# Outline colours for the overview, bright and saturated; each task uses the one that
# stands out most from its image (a fixed magenta would vanish on H&E-stained
# histopathology, a fixed green on foliage).
OUTLINE_COLOURS = np.array(
    [
        [255, 0, 255],
        [0, 255, 0],
        [0, 255, 255],
        [255, 255, 0],
        [255, 0, 0],
        [0, 0, 255],
        [255, 255, 255],
    ],
    dtype=np.uint8,
)
_SPLITS = {"train": 0, "test": 1}
_FILE_ORDER_STREAM = 2  # seed stream of the folder permutation (the splits use 0 and 1)
# Per-image sub-streams: the target choice, and a slide's region order (the image itself, e.g. a
# procedural one, uses the image's main stream)
_TARGET_STREAM = 1
_REGION_STREAM = 2
_NAMED_PER_REASON = 3  # skipped files named in the summary, per reason
# A task-set build shows a progress bar (on a terminal) once it has taken this long
_PROGRESS_DELAY_S = 2.0
_CAPTION_HEIGHT = 12  # pixels of the caption strip under frames of task sets with slides


class TaskSet:
    """A fixed set of tasks (image pyramid + target window), shared by any number of envs.

    Several tasks may share an image (make_task_sets' targets_per_image); its pyramid is stored
    once.

    Attributes:
        split: "train" or "test".
        view_size: V, the side of every view in the observation.
        image_size: m, the nominal image side (folder images are resized to it before the
            pyramid).
        levels: three uint8 arrays; levels[z] has shape (num_images, V*2^z, V*2^z, 3) and holds
            the image at the resolution where a zoom-z window is exactly V pixels wide. levels[0]
            is the overview.
        task_images: (num_tasks,) index of each task's image in levels (task i //
            targets_per_image).
        target_states: (num_tasks,) lattice state index of each target window (see
            envs.lattice).
        targets: (num_tasks, 3) int (zoom, row, col) of each target; zoom is 1 (side m/2) or 2
            (side m/4).
        target_boxes: (num_tasks, 4) float (y0, x0, y1, x1) of each target, normalised to [0, 1]
            (y1, x1 exclusive); multiply by the side of image(i) for pixel coordinates.
        outline_colours: (num_tasks, 3) uint8 colour of the window outline drawn on the overview.
        image_names: one string per image (file path, a slide region's file@x=...,y=... at level 0,
            or procedural seed/split/index); image_ids: one per task.
        image_records: one dict per image saying where it came from (kind "procedural", "image"
            or "slide"; a slide region's file, level, region at level 0, MPP; see describe()).
        settings: the make_task_sets settings the set was built with (written to tasks.json).
        captions: None, or (task sets holding slide regions) one line per image naming its file
            and region, drawn under render()'s frames and draw_episodes' drawings.
    """

    def __init__(
        self,
        split: str,
        view_size: int,
        image_size: int,
        levels,
        task_images,
        target_states,
        image_colours,
        image_names,
        image_records=None,
        settings=None,
    ):
        self.split, self.view_size, self.image_size = split, view_size, image_size
        self.levels: tuple[np.ndarray, np.ndarray, np.ndarray] = tuple(levels)
        self.task_images = np.asarray(task_images, dtype=np.int64)
        self.target_states = np.asarray(target_states, dtype=np.int64)
        self.image_colours = np.asarray(image_colours, dtype=np.uint8)
        self.image_names: list[str] = list(image_names)
        self.image_records: list[dict] = list(image_records or [])
        self.settings: dict[str, Any] = dict(settings or {})
        # Per state: pyramid level and top-left pixel of its view (lattice step =
        # V/4 pixels at every level)...
        quarter = view_size // 4
        self.view_offsets = np.stack(
            [STATES[:, 0], STATES[:, 1] * quarter, STATES[:, 2] * quarter], axis=1
        )
        # ... and its outline on the overview: first and last row/column,
        # inclusive, in overview pixels.
        self.outline_pixels = _inclusive_pixel_boxes(view_size)

    def __len__(self) -> int:
        return len(self.target_states)

    @property
    def num_tasks(self) -> int:
        return len(self.target_states)

    @property
    def num_images(self) -> int:
        return len(self.levels[0])

    @property
    def targets(self) -> np.ndarray:
        return STATES[self.target_states]

    @property
    def target_boxes(self) -> np.ndarray:
        return NORMALIZED_BOXES[self.target_states]

    @property
    def outline_colours(self) -> np.ndarray:
        return self.image_colours[self.task_images]

    @property
    def image_ids(self) -> list[str]:
        return [self.image_names[i] for i in self.task_images]

    @cached_property
    def has_slides(self) -> bool:
        """Whether any image is a slide region (then frames get captions)."""
        return any(record.get("kind") == "slide" for record in self.image_records)

    @property
    def captions(self) -> Optional[list[str]]:
        if not self.has_slides:
            return None
        return [describe_record(record) for record in self.image_records]

    def caption(self, task_id: int) -> Optional[str]:
        """'task 3: slide.svs x=12288 y=4096 L1 2um/px' for a task set with slide regions, else
        None."""
        if not self.has_slides:
            return None
        return f"task {task_id}: {describe_record(self.image_records[self.task_images[task_id]])}"

    def describe(self) -> list[dict[str, Any]]:
        """One dict per task, to trace it to its image: task_id, image (index), the image's record
        (kind; file; for a slide region: level, level_downsample, level0_mpp, mpp of the task image,
        mpp_source, region_level0 {x, y, size} in level-0 pixels, tissue_fraction), and target:
        zoom, row, col on the lattice, box (y0, x0, y1, x1) normalised to the image like
        target_boxes, and for a slide region level0 {x, y, size}."""
        tasks = []
        for task in range(self.num_tasks):
            image = int(self.task_images[task])
            record = self.image_records[image] if self.image_records else {}
            state = self.target_states[task]
            zoom, row, col = (int(v) for v in STATES[state])
            box = [float(v) for v in NORMALIZED_BOXES[state]]
            target: dict[str, Any] = {"zoom": zoom, "row": row, "col": col, "box": box}
            if record.get("kind") == "slide":
                region = record["region_level0"]
                size = region["size"]
                target["level0"] = {
                    "x": round(region["x"] + box[1] * size, 3),
                    "y": round(region["y"] + box[0] * size, 3),
                    "size": round((box[3] - box[1]) * size, 3),
                }
            tasks.append({"task_id": task, "image": image, **record, "target": target})
        return tasks

    @property
    def nbytes(self) -> int:
        """Memory held by the pyramids (everything else is negligible)."""
        return sum(level.nbytes for level in self.levels)

    def image(self, task_id: int) -> np.ndarray:
        """The task's image at the finest stored resolution: uint8 (4V, 4V,
        3) (a view, do not modify)."""
        return self.levels[2][self.task_images[task_id]]

    def image_view(self, image: int, state: int) -> np.ndarray:
        """The V x V view of lattice window `state` (an index into
        envs.lattice.STATES) of image `image`: a slice."""
        zoom, y, x = self.view_offsets[state]
        return self.levels[zoom][image, y : y + self.view_size, x : x + self.view_size]

    def view(self, task_id: int, state: int) -> np.ndarray:
        """The V x V view of lattice window `state` on the task's image: a slice, not a copy."""
        return self.image_view(self.task_images[task_id], state)

    def target_patch(self, task_id: int) -> np.ndarray:
        """The V x V target patch shown as observation view 0."""
        return self.view(task_id, self.target_states[task_id])

    def draw_overview(self, out: np.ndarray, task_id: int, state: int) -> None:
        """Write the overview (levels[0]) with window `state` outlined (1-px
        rectangle) into `out` (V, V, 3)."""
        image = self.task_images[task_id]
        out[...] = self.levels[0][image]
        _draw_outline(out, self.outline_pixels[state], self.image_colours[image], 1)

    def draw_frame(self, task_id: int, state: int) -> np.ndarray:
        """The task's image (4V x 4V) with the target outlined and window `state` outlined on top,
        each in one of the two colours that stand out most from the image (the window in the
        overview's colour): (4V, 4V, 3); with a caption strip under it (4V + 12, 4V, 3) when the
        set holds slide regions (see caption())."""
        frame = self.image(task_id).copy()
        side = frame.shape[0]
        window_colour, target_colour = OUTLINE_COLOURS[
            _colour_ranking(self.levels[0][self.task_images[task_id]])[:2]
        ]
        pixel_boxes = _inclusive_pixel_boxes(side)
        thickness = max(1, side // 128)
        _draw_outline(frame, pixel_boxes[self.target_states[task_id]], target_colour, thickness)
        _draw_outline(frame, pixel_boxes[state], window_colour, thickness)
        return _with_caption(frame, self.caption(task_id))

    def initial_ious(self) -> np.ndarray:
        """IoU of the starting window (the full image) with each target: 0.25 for
        m/2 targets, 0.0625 for m/4."""
        return IOU[self.target_states, INITIAL_STATE]

    def optimal_returns(self, config: EpisodeConfig = EpisodeConfig()) -> np.ndarray:
        """(num_tasks,) exact optimal undiscounted return of each task
        (breadth-first search, envs.lattice)."""
        return optimal_returns(self.target_states, config)

    def optimal_actions(self, task_id: int, config: EpisodeConfig = EpisodeConfig()) -> list[int]:
        """An oracle action sequence achieving optimal_returns(config)[task_id]."""
        return optimal_actions(int(self.target_states[task_id]), config)


def _inclusive_pixel_boxes(side: int) -> np.ndarray:
    """(195, 4) first and last row/column (inclusive) of every lattice
    window on a side x side image."""
    edges = np.round(NORMALIZED_BOXES * side).astype(np.int64)
    return np.clip(edges - np.array([0, 0, 1, 1]), 0, side - 1)


@lru_cache(maxsize=1)
def _caption_font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _with_caption(frame: np.ndarray, caption: Optional[str]) -> np.ndarray:
    """`frame` with a black strip under it holding `caption` in white (as it fits); unchanged when
    caption is None."""
    if caption is None:
        return frame
    strip = Image.new("RGB", (frame.shape[1], _CAPTION_HEIGHT))
    ImageDraw.Draw(strip).text((2, 0), caption, fill=(255, 255, 255), font=_caption_font())
    return np.concatenate([frame, np.asarray(strip)], axis=0)


def _draw_outline(out: np.ndarray, box: np.ndarray, colour: np.ndarray, thickness: int) -> None:
    """Draw a rectangle outline `thickness` pixels wide, inside the inclusive pixel box
    (y0, x0, y1, x1), into out."""
    y0, x0, y1, x1 = box
    t = thickness
    out[y0 : y0 + t, x0 : x1 + 1] = colour
    out[y1 - t + 1 : y1 + 1, x0 : x1 + 1] = colour
    out[y0 : y1 + 1, x0 : x0 + t] = colour
    out[y0 : y1 + 1, x1 - t + 1 : x1 + 1] = colour


# --------------------------------------------------------------------------------------------------
# Task-set creation
# --------------------------------------------------------------------------------------------------
def _choose_targets(
    task_set: TaskSet,
    image: int,
    count: int,
    target_zooms: Sequence[int],
    min_std: float,
    rng,
    tissue: Optional[np.ndarray] = None,
    min_tissue: float = 0.0,
) -> list:
    """`count` distinct random lattice targets at target_zooms (zooms equally likely) whose patches
    are not near-uniform and, given per-window `tissue` fractions (slide regions), hold at least
    min_tissue; raises UnusableImage if the image has fewer such crops."""
    candidates = np.flatnonzero(np.isin(STATES[:, 0], target_zooms))
    counts = np.bincount(STATES[candidates, 0])
    # Weighted random order without replacement (Efraimidis-Spirakis keys log(u)/w): with weights
    # 1/count the first candidate has a uniformly random zoom, then a uniformly random position.
    keys = np.log(rng.random(len(candidates))) * counts[STATES[candidates, 0]]
    chosen = []
    for state in candidates[np.argsort(-keys)]:
        if tissue is not None and tissue[state] < min_tissue:
            continue
        patch = task_set.image_view(image, state).reshape(-1, 3)
        if patch.std(axis=0).mean() >= min_std:  # per channel: a flat coloured patch has std 0
            chosen.append(int(state))
            if len(chosen) == count:
                return chosen
    raise UnusableImage(f"near-uniform (pixel std < {min_std:g})")


def _colour_ranking(overview: np.ndarray) -> np.ndarray:
    """Indices of OUTLINE_COLOURS, the colour farthest from most of the overview's pixels (10th
    percentile distance) first."""
    pixels = overview[::2, ::2].reshape(-1, 1, 3).astype(np.float32)  # every other pixel is plenty
    # (V*V, colours)
    dist = np.linalg.norm(pixels - OUTLINE_COLOURS[None].astype(np.float32), axis=2)
    return np.argsort(-np.percentile(dist, 10, axis=0), kind="stable")


@dataclass
class _Candidate:
    """An image offered for one slot of a task set: its pyramid top and where it came from."""

    top: np.ndarray
    name: str
    record: dict
    per_source: int = 1  # images its source gives at most (a slide: regions_per_slide)
    tissue: Optional[np.ndarray] = None  # per-window tissue fraction (slide regions)


# Candidates of one source for the slot it starts at: a generator, given the random stream of that
# slot (seed, split, slot); it raises UnusableImage when the source cannot give what it must.
CandidatesOf = Callable[[Any, list], Iterator[_Candidate]]


def _fill(
    task_set: TaskSet,
    sources,
    candidates_of: CandidatesOf,
    seed,
    targets_per_image,
    target_zooms,
    min_target_std,
    min_tissue,
    progress,
    skipped,
):
    """Load images from `sources`, in order, into task_set's image slots and choose their targets,
    until every slot is filled; unusable sources are appended to skipped[reason]. Returns (slots
    filled, sources examined).

    A source gives up to per_source images (one image file; a slide's regions). An image whose
    targets cannot be chosen makes its file unusable; a slide region is passed over for the slide's
    next one, and a slide that runs out of regions is skipped whole (its slots are refilled).
    """
    split_stream = _SPLITS[task_set.split]
    filled = examined = 0
    for source in sources:
        if filled == task_set.num_images:
            break
        examined += 1
        first = filled
        # Random streams per image (seed, split, index[, purpose]): image i does not depend on the
        # task counts.
        candidates = candidates_of(source, [seed, split_stream, first])
        try:
            for candidate in candidates:
                for z, level in enumerate(build_pyramid(candidate.top)):
                    task_set.levels[z][filled] = level
                tasks = slice(
                    filled * targets_per_image,
                    min((filled + 1) * targets_per_image, task_set.num_tasks),
                )
                rng = np.random.default_rng([seed, split_stream, filled, _TARGET_STREAM])
                count = tasks.stop - tasks.start
                try:
                    task_set.target_states[tasks] = _choose_targets(
                        task_set,
                        filled,
                        count,
                        target_zooms,
                        min_target_std,
                        rng,
                        candidate.tissue,
                        min_tissue,
                    )
                except UnusableImage:
                    if candidate.tissue is None:
                        raise
                    continue  # a slide region: the slide's next region instead
                task_set.image_colours[filled] = OUTLINE_COLOURS[
                    _colour_ranking(task_set.levels[0][filled])[0]
                ]
                task_set.image_names.append(candidate.name)
                task_set.image_records.append(candidate.record)
                filled += 1
                progress.update()
                if filled == task_set.num_images or filled - first == candidate.per_source:
                    break
        except UnusableImage as unusable:
            progress.update(first - filled)
            del task_set.image_names[first:], task_set.image_records[first:]
            filled = first
            skipped.setdefault(unusable.reason, []).append(source)
            progress.set_postfix(skipped=sum(map(len, skipped.values())), refresh=False)
        finally:
            candidates.close()
    return filled, examined


def _skip_summary(skipped: dict, folder) -> str:
    """'3 unreadable (a.jpg, sub/b.png, c.tif, ...), 1 smaller than 448 px (d.jpg)'."""
    parts = []
    for reason, files in sorted(skipped.items(), key=lambda item: (-len(item[1]), item[0])):
        names = sorted(os.path.relpath(f, folder) for f in files)
        names = names[:_NAMED_PER_REASON] + ["..."] * (len(names) > _NAMED_PER_REASON)
        parts.append(f"{len(files)} {reason} ({', '.join(names)})")
    return ", ".join(parts)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PatchLocConfigError(f"{name} must be an integer >= {minimum} (got {value!r})")


def _build_task_sets(
    num_train_tasks,
    num_test_tasks,
    image_source,
    image_size,
    view_size,
    seed,
    target_zooms,
    min_target_std,
    targets_per_image,
    slide_mpp,
    slide_level,
    regions_per_slide,
    min_tissue,
    splits,
) -> dict[str, TaskSet]:
    """make_task_sets, building only `splits` (a folder's held-out images are always chosen:
    training avoids them)."""
    _check_int("num_train_tasks", num_train_tasks, 1)
    _check_int("num_test_tasks", num_test_tasks, 1)
    _check_int("seed", seed, 0)
    _check_int("view_size", view_size, 4)
    if view_size % 4:
        raise PatchLocConfigError(
            f"view_size must be a multiple of 4 (got {view_size}): windows move on a lattice of a "
            "quarter of the view"
        )
    if image_size is None:
        image_size = 4 * view_size
    _check_int("image_size", image_size, 1)
    if image_size < 4 * view_size:
        raise PatchLocConfigError(
            f"image_size ({image_size}) must be >= 4 * view_size ({4 * view_size}) so that a "
            "zoom-2 window (image_size/4 pixels) covers at least view_size pixels; raise "
            "image_size or lower view_size"
        )
    target_zooms = tuple(sorted(set(int(z) for z in target_zooms)))
    if not target_zooms or not set(target_zooms) <= {1, 2}:
        raise PatchLocConfigError(
            f"target_zooms must be a non-empty subset of (1, 2) (got {target_zooms})"
        )
    max_targets = int(np.isin(STATES[:, 0], target_zooms).sum())
    _check_int("targets_per_image", targets_per_image, 1)
    if targets_per_image > max_targets:
        raise PatchLocConfigError(
            f"targets_per_image must be <= {max_targets}, the lattice windows at target_zooms "
            f"{target_zooms} (got {targets_per_image})"
        )
    slide = slide_settings(slide_mpp, slide_level, regions_per_slide, min_tissue)
    procedural = str(image_source) == "procedural"
    settings = {
        "image_source": str(image_source),
        "image_source_path": None if procedural else os.path.abspath(image_source),
        "image_size": int(image_size),
        "view_size": int(view_size),
        "seed": int(seed),
        "target_zooms": list(target_zooms),
        "min_target_std": float(min_target_std),
        "targets_per_image": int(targets_per_image),
        "num_train_tasks": int(num_train_tasks),
        "num_test_tasks": int(num_test_tasks),
        "slide_mpp": slide.mpp,
        "slide_level": slide.level,
        "regions_per_slide": slide.regions_per_slide,
        "min_tissue": slide.min_tissue,
    }
    side = 4 * view_size
    num_tasks = {"train": num_train_tasks, "test": num_test_tasks}
    task_sets = {}
    for split, n in num_tasks.items():
        num_images = -(-n // targets_per_image)
        levels = [
            np.empty((num_images, view_size << z, view_size << z, 3), dtype=np.uint8)
            for z in range(3)
        ]
        task_images = np.arange(n) // targets_per_image
        colours = np.zeros((num_images, 3), dtype=np.uint8)
        targets = np.zeros(n, np.int64)
        task_sets[split] = TaskSet(
            split, view_size, image_size, levels, task_images, targets, colours, [], [], settings
        )
    built = [
        split
        for split in ("test", "train")
        if split in splits or (split == "test" and not procedural)
    ]
    fill_args = (seed, targets_per_image, target_zooms, min_target_std, slide.min_tissue)
    skipped: dict[str, list] = {}
    progress = tqdm(
        total=sum(task_sets[s].num_images for s in built),
        desc="patch-loc task images",
        unit="image",
        delay=_PROGRESS_DELAY_S,  # only for a build that takes a while
        disable=not sys.stderr.isatty(),
    )
    with progress:
        if procedural:

            def procedural_candidates(name, stream):
                top = procedural_image(np.random.default_rng(stream), side)
                yield _Candidate(top, name, {"kind": "procedural", "name": name})

            for split in built:
                names = [
                    f"procedural:seed={seed}:{split}:{i}"
                    for i in range(task_sets[split].num_images)
                ]
                filled, _ = _fill(
                    task_sets[split], names, procedural_candidates, *fill_args, progress, skipped
                )
                if filled < task_sets[split].num_images:
                    raise PatchLocConfigError(
                        f"procedural image '{names[filled]}' is near-uniform at "
                        f"min_target_std={min_target_std}; lower it"
                    )
            return {split: task_sets[split] for split in splits}

        slides_seen = []

        def file_candidates(file, stream):
            if not is_slide(file):
                record = {"kind": "image", "file": os.path.relpath(file, image_source)}
                yield _Candidate(load_image(file, image_size, side), str(file), record)
                return
            slides_seen.append(file)
            source = SlideSource(file, image_source, slide, image_size, side)
            try:
                for region in slide_regions(
                    source, np.random.default_rng(stream + [_REGION_STREAM])
                ):
                    at = region.record["region_level0"]
                    name = f"{file}@x={at['x']},y={at['y']}"
                    yield _Candidate(
                        region.top, name, region.record, slide.regions_per_slide, region.tissue
                    )
            finally:
                source.close()
            # Only reached when the slide ran out of regions before the task set was full.
            raise UnusableImage(source.too_little_tissue)

        files = list_image_files(image_source)
        order = np.random.default_rng([seed, _FILE_ORDER_STREAM]).permutation(len(files))
        # Held-out images come from the end of a seeded permutation and training images from its
        # start, so the held-out set does not change with the number of training tasks; an
        # unusable file is replaced by the next one inwards (held-out: the file before its block,
        # then earlier ones). A slide gives several images: the held-out set then needs fewer files
        # than its block, and training takes every file it did not examine (slide-level split).
        first_test = max(len(files) - task_sets["test"].num_images, 0)
        test_order = np.concatenate([order[first_test:], order[:first_test][::-1]])
        usable, examined = _fill(
            task_sets["test"],
            [files[i] for i in test_order],
            file_candidates,
            *fill_args,
            progress,
            skipped,
        )
        if usable == task_sets["test"].num_images and "train" in built:
            held_out = set(test_order[:examined].tolist())
            train_files = [files[i] for i in order if i not in held_out]
            filled, _ = _fill(
                task_sets["train"], train_files, file_candidates, *fill_args, progress, skipped
            )
            usable += filled
    needed = {split: task_sets[split].num_images for split in ("train", "test")}
    summary = _skip_summary(skipped, image_source)
    if usable < sum(needed[s] for s in built):
        slide_fix = (
            ", raise regions_per_slide (--regions-per-slide) or lower min_tissue (--min-tissue)"
            if slides_seen
            else ""
        )
        raise PatchLocConfigError(
            f"image folder '{image_source}' has {usable} usable images but {sum(needed.values())} "
            f"are needed ({needed['train']} for {num_train_tasks} training tasks + "
            f"{needed['test']} for {num_test_tasks} held-out tasks, "
            f"targets_per_image={targets_per_image}"
            + (f", {slide.regions_per_slide} regions per slide" if slides_seen else "")
            + ")"
            + (f"; skipped {summary}" if summary else "")
            + "; add images, raise targets_per_image (--targets-per-image)"
            + slide_fix
            + ", lower image_size or ask for fewer tasks"
        )
    if skipped:
        logger.warning(
            "warning: skipped %d of %d image files in '%s': %s",
            sum(map(len, skipped.values())),
            len(files),
            image_source,
            summary,
        )
    assumed: dict[str, list] = {}
    for split in built:
        for name, record in zip(task_sets[split].image_names, task_sets[split].image_records):
            if record.get("mpp_source", "").startswith("assumed"):
                files_of = assumed.setdefault(record["mpp_source"], [])
                file = name.rsplit("@", 1)[0]
                if file not in files_of:
                    files_of.append(file)
    if assumed:
        logger.warning(mpp_warning(assumed, image_source, slide))
    return {split: task_sets[split] for split in splits}


def make_task_sets(
    num_train_tasks: int,
    num_test_tasks: int,
    image_source: Union[str, "os.PathLike[str]"] = "procedural",
    image_size: Optional[int] = None,
    view_size: int = 112,
    seed: int = 0,
    target_zooms: Sequence[int] = (1, 2),
    min_target_std: float = 8.0,
    targets_per_image: int = 1,
    slide_mpp: Optional[float] = None,
    slide_level: Optional[int] = None,
    regions_per_slide: int = DEFAULT_REGIONS_PER_SLIDE,
    min_tissue: float = DEFAULT_MIN_TISSUE,
) -> tuple[TaskSet, TaskSet]:
    """Create the training and the held-out task sets; they never share an image, nor a slide.

    Args:
        num_train_tasks, num_test_tasks: tasks per set (>= 1 each).
        image_source: "procedural" (built-in generator, no download) or a folder of images
            (.jpg/.jpeg/.png/.tif/.tiff, any size), whole-slide images (.svs .ndpi .mrxs .scn .bif,
            pyramidal .tif/.tiff; envs/slides.py), or both, subfolders included. An image is
            center-cropped to a square and resized to image_size; a slide gives regions_per_slide
            regions of tissue. Unreadable, too small or near-uniform files (and slides without
            enough tissue) are skipped (one warning line counts them by reason); it is an error
            only when too few usable images remain.
        image_size: m, the side images are processed at; must be >= 4 * view_size so that a
            zoom-2 window (m/4 pixels) is never upsampled. None: 4 * view_size. Procedural
            images are generated directly at 4V.
        view_size: V, the side of each of the three observation views; a multiple of 4 (lattice
            step V/4).
        seed: same seed -> identical tasks and images. Per image, the stream is (seed, split,
            index), so task i does not depend on how many tasks were asked for.
        target_zooms: zoom levels of the targets: 1 (side m/2), 2 (side m/4), equally likely.
        min_target_std: target crops whose pixel std (per channel, averaged; 0-255 scale) is
            below this are rejected as near-uniform.
        targets_per_image: k, tasks per image (distinct targets): task i is on image i // k, so a
            set of n tasks needs ceil(n / k) images. k = 1 gives the same tasks as before this
            option existed. For a slide, k tasks per region.
        slide_mpp: micrometres per pixel of a slide region at image_size (None: 2.0, a 5x view;
            see envs/slides.py); read from the pyramid level nearest to it that is not coarser.
        slide_level: instead of slide_mpp, the pyramid level regions are read from, image_size
            pixels of it (for slides without MPP metadata).
        regions_per_slide: task images per slide (non-overlapping regions of tissue); a slide that
            cannot hold that many is skipped.
        min_tissue: tissue fraction a region, and each target in it, needs (0..1; the tissue mask
            is Otsu's threshold on the saturation, as CLAM does).
    Raises:
        PatchLocConfigError (a ValueError) with a one-line message on any bad setting or too few
        usable images.
    """
    sets = _build_task_sets(
        num_train_tasks,
        num_test_tasks,
        image_source,
        image_size,
        view_size,
        seed,
        target_zooms,
        min_target_std,
        targets_per_image,
        slide_mpp,
        slide_level,
        regions_per_slide,
        min_tissue,
        ("train", "test"),
    )
    return sets["train"], sets["test"]


def make_task_set(
    split: str = "train",
    num_tasks: int = 64,
    num_test_tasks: int = 16,
    image_source: Union[str, "os.PathLike[str]"] = "procedural",
    targets_per_image: int = 1,
    image_size: Optional[int] = None,
    view_size: int = 112,
    seed: int = 0,
    target_zooms: Sequence[int] = (1, 2),
    min_target_std: float = 8.0,
    slide_mpp: Optional[float] = None,
    slide_level: Optional[int] = None,
    regions_per_slide: int = DEFAULT_REGIONS_PER_SLIDE,
    min_tissue: float = DEFAULT_MIN_TISSUE,
) -> TaskSet:
    """One split of make_task_sets(num_tasks, num_test_tasks, ...): the same tasks, without
    building the other split (except a folder's held-out images, which training must avoid). These
    are the task-set settings that PatchLocEnv, PatchLocVecEnv and gymnasium.make("PatchLoc-v0",
    ...) accept in place of a task_set."""
    if split not in _SPLITS:
        raise PatchLocConfigError(f"split must be 'train' or 'test' (got {split!r})")
    sets = _build_task_sets(
        num_tasks,
        num_test_tasks,
        image_source,
        image_size,
        view_size,
        seed,
        target_zooms,
        min_target_std,
        targets_per_image,
        slide_mpp,
        slide_level,
        regions_per_slide,
        min_tissue,
        (split,),
    )
    return sets[split]


def write_tasks_json(path: Union[str, "os.PathLike[str]"], *task_sets: TaskSet) -> None:
    """Write `path` (e.g. RUN_DIR/tasks.json): the settings the task sets were built with and, per
    split, every task's description (TaskSet.describe: its file, a slide region's level, position
    and size at level 0 and MPP, the target box), so that every result can be traced to the tissue.

    Written to a temporary file beside it, then renamed: a crash never leaves half a file. Raises
    PatchLocConfigError (one line, naming the path) if it cannot be written.
        write_tasks_json(os.path.join(run_dir, "tasks.json"), train_tasks, test_tasks)
    """
    path = Path(path)
    data = {
        "format": "patchloc-tasks/1",
        "settings": task_sets[0].settings if task_sets else {},
        "splits": {task_set.split: task_set.describe() for task_set in task_sets},
    }
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise PatchLocConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def _resolve_task_set(task_set: Optional[TaskSet], settings: dict[str, Any]) -> TaskSet:
    if task_set is None:
        return make_task_set(**settings)
    if settings:
        raise PatchLocConfigError(
            f"pass either a task_set or task-set settings ({', '.join(settings)}), not both"
        )
    return task_set


# --------------------------------------------------------------------------------------------------
# Environments
# --------------------------------------------------------------------------------------------------
class _Batch:
    """State of N episodes as flat arrays, and the observation buffer they render into.

    Shared by PatchLocEnv (N = 1) and PatchLocVecEnv so the dynamics and reward are written once.
    """

    def __init__(self, task_set: TaskSet, config: EpisodeConfig, num_envs: int):
        self.task_set, self.config = task_set, config
        self.tasks = np.zeros(num_envs, dtype=np.int64)
        self.target_states = np.zeros(num_envs, dtype=np.int64)
        self.states = np.full(num_envs, INITIAL_STATE, dtype=np.int64)
        self.ious = np.zeros(num_envs)
        self.steps = np.zeros(num_envs, dtype=np.int64)
        self.returns = np.zeros(num_envs)  # float64 accumulator: exact enough to telescope
        v = task_set.view_size
        self.obs = np.zeros((num_envs, 3, v, v, 3), dtype=np.uint8)

    def start(self, env_ids: np.ndarray, task_ids: np.ndarray) -> None:
        """Begin new episodes of these tasks in these envs (window =
        full image); renders their obs."""
        self.tasks[env_ids] = task_ids
        self.target_states[env_ids] = self.task_set.target_states[task_ids]
        self.states[env_ids] = INITIAL_STATE
        self.ious[env_ids] = IOU[self.target_states[env_ids], INITIAL_STATE]
        self.steps[env_ids] = 0
        self.returns[env_ids] = 0.0
        self.render(env_ids, target=True)

    def render(self, env_ids, target: bool = False) -> None:
        """Write views 1 (outlined overview) and 2 (current window) of these envs into self.obs;
        view 0 (the target patch, constant during an episode) too if `target`."""
        for i in env_ids:
            task, state = self.tasks[i], self.states[i]
            if target:
                self.obs[i, 0] = self.task_set.target_patch(task)
            self.task_set.draw_overview(self.obs[i, 1], task, state)
            self.obs[i, 2] = self.task_set.view(task, state)

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Advance every env by one action (table look-ups); does not render. Returns (reward,
        terminated, truncated, success, stopped)."""
        cfg = self.config
        self.states = TRANSITIONS[self.states, actions]
        ious = IOU[self.target_states, self.states]
        success = ious >= cfg.success_iou
        stopped = actions == STOP
        # Reward = IoU improvement (so returns telescope) + bonus on success - penalty on stop.
        reward = ious - self.ious + cfg.success_bonus * success - cfg.stop_penalty * stopped
        self.ious = ious
        self.steps += 1
        self.returns += reward
        terminated = success | stopped
        truncated = (self.steps >= cfg.max_steps) & ~terminated
        return reward, terminated, truncated, success, stopped


def _check_actions(actions, num_envs: int) -> np.ndarray:
    """Actions as an int64 array of num_envs (0: one action of a single env), or a one-line
    ValueError: like gymnasium's Discrete, only integers (Python or numpy, not bool) in 0..6."""
    array = np.asarray(actions)
    expected = "one action" if num_envs == 0 else f"{num_envs} actions (one per env)"
    shape_ok = array.shape == () if num_envs == 0 else array.size == num_envs
    kind_ok = array.dtype.kind in "iu" and not isinstance(actions, (bool, np.bool_))
    if shape_ok and kind_ok and array.size and 0 <= array.min() and array.max() < NUM_ACTIONS:
        return array.astype(np.int64).reshape(-1)
    shown = np.array2string(array, separator=", ", threshold=8, max_line_width=sys.maxsize)
    raise ValueError(
        f"expected {expected}: integers in 0..{NUM_ACTIONS - 1} ({', '.join(ACTION_NAMES)}); "
        f"got {shown} ({array.dtype}, shape {array.shape})"
    )


def _episode_config(
    task_set: TaskSet, max_steps, success_iou, success_bonus, stop_penalty
) -> EpisodeConfig:
    _check_int("max_steps", max_steps, 1)
    start_iou = float(task_set.initial_ious().max())
    if not start_iou < success_iou <= 1.0:
        raise PatchLocConfigError(
            f"success_iou must be in ({start_iou:g}, 1] (got {success_iou}): the starting "
            f"full-image window already has IoU {start_iou:g} with the largest targets"
        )
    return EpisodeConfig(
        int(max_steps), float(success_iou), float(success_bonus), float(stop_penalty)
    )


_ENV_ARGS_DOC = """
    Episode and reward (constructor arguments; returns telescope to
    IoU_final - IoU_initial + success_bonus * [success] - stop_penalty * [stopped]):
        max_steps (20): steps before truncation.
        success_iou (0.5): the episode ends in success as soon as IoU(window, target) >= this,
            detected by the env. Each step is rewarded with its IoU improvement.
        success_bonus (1.0): added on success.
        stop_penalty (0.2): subtracted when the agent gives up with `stop`.
    Why this reward (measured on a small prototype, SPEC section 7): a step cost plus a bonus only
    on a successful *stop* taught PPO to stop at once; +1/-1 on stop taught it never to stop; with
    success detected by the env (this design) the return rose steadily. The exact optimal return
    of each task (breadth-first search over the 195 lattice windows within max_steps) is
    `optimal_returns`.
"""


_TASKS_DOC = """
    Tasks: task_set (from make_task_sets), or, when it is None, task-set settings passed on to
    make_task_set: split ("train"), num_tasks (64), num_test_tasks (16), image_source ("procedural"
    or a folder of images and/or slides), targets_per_image (1), image_size (None: 4 x view_size),
    view_size (112), seed (0), target_zooms, min_target_std, slide_mpp (None: 2.0 um/px),
    slide_level (None), regions_per_slide (32), min_tissue (0.5).
    render_mode "rgb_array": render() returns the image (4V x 4V) with the target and the window
    outlined, and for slide regions a caption strip under it naming the task, slide and region.
"""


class PatchLocEnv(gym.Env):
    __doc__ = (
        """Single patch-localization env over a TaskSet; gymnasium.make("PatchLoc-v0", ...) makes
    one.

    Observation: uint8 (3, V, V, 3): target patch, overview with the window outlined, current view.
    Actions: Discrete(7): up, down, left, right, zoom in, zoom out, stop (see envs.lattice).
    reset(seed=None, options={"task_id": i}) starts task i (random from np_random if not given);
    info holds "task_id", "iou" and "optimal_return" (plus "success" and "stopped" after a step).
    """
        + _TASKS_DOC
        + _ENV_ARGS_DOC
    )

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        task_set: Optional[TaskSet] = None,
        max_steps: int = 20,
        success_iou: float = 0.5,
        success_bonus: float = 1.0,
        stop_penalty: float = 0.2,
        render_mode: Optional[str] = None,
        **task_set_settings,
    ):
        task_set = _resolve_task_set(task_set, task_set_settings)
        self.task_set = task_set
        self.config = _episode_config(task_set, max_steps, success_iou, success_bonus, stop_penalty)
        self.optimal_returns = task_set.optimal_returns(self.config)
        v = task_set.view_size
        self.observation_space = gym.spaces.Box(0, 255, (3, v, v, 3), dtype=np.uint8)
        self.action_space = gym.spaces.Discrete(NUM_ACTIONS)
        self.render_mode = _check_render_mode(render_mode, self.metadata)
        self._batch = _Batch(task_set, self.config, 1)

    def _info(self) -> dict[str, Any]:
        task = int(self._batch.tasks[0])
        return {
            "task_id": task,
            "iou": float(self._batch.ious[0]),
            "optimal_return": float(self.optimal_returns[task]),
        }

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        super().reset(seed=seed)
        task = (options or {}).get("task_id")
        if task is None:
            task = self.np_random.integers(self.task_set.num_tasks)
        elif not 0 <= task < self.task_set.num_tasks:
            raise PatchLocConfigError(
                f"options['task_id'] must be in 0..{self.task_set.num_tasks - 1} (got {task})"
            )
        self._batch.start(np.zeros(1, dtype=np.int64), np.array([task]))
        return self._batch.obs[0].copy(), self._info()

    def step(self, action):
        reward, terminated, truncated, success, stopped = self._batch.step(
            _check_actions(action, 0)
        )
        self._batch.render([0])
        info = self._info()
        info.update(success=bool(success[0]), stopped=bool(stopped[0]))
        return (
            self._batch.obs[0].copy(),
            float(reward[0]),
            bool(terminated[0]),
            bool(truncated[0]),
            info,
        )

    def render(self) -> Optional[np.ndarray]:
        """render_mode "rgb_array": the image with the target and the current window outlined,
        uint8 (4V, 4V, 3), or (4V + 12, 4V, 3) with a caption strip for slide regions
        (TaskSet.draw_frame)."""
        if self.render_mode is None:
            gym.logger.warn(
                "PatchLocEnv.render() was called without a render_mode; pass "
                "render_mode='rgb_array'"
            )
            return None
        return self.task_set.draw_frame(self._batch.tasks[0], self._batch.states[0])

    @property
    def window(self) -> tuple[int, int, int]:
        """Current window as (zoom, row, col) on the lattice."""
        return tuple(int(v) for v in STATES[self._batch.states[0]])

    @property
    def window_box(self) -> np.ndarray:
        """Current window (y0, x0, y1, x1) normalised to [0, 1] like TaskSet.target_boxes."""
        return NORMALIZED_BOXES[self._batch.states[0]].copy()

    def optimal_actions(self, task_id: int) -> list[int]:
        """An oracle action sequence achieving optimal_returns[task_id]
        under this env's parameters."""
        return self.task_set.optimal_actions(task_id, self.config)


# --------------------------------------------------------------------------------------------------
# Policy helpers: the held-out protocol, an episode's window path, drawn (the script's images and
# --capture-video)
# --------------------------------------------------------------------------------------------------
Policy = Callable[[np.ndarray], np.ndarray]  # a batch of observations (N, 3, V, V, 3) -> N actions


def run_tasks(
    task_set: TaskSet,
    num_tasks: int,
    act: Policy,
    num_envs: int = 50,
    max_steps: int = 20,
    seed: Optional[int] = None,
) -> dict[str, np.ndarray]:
    """Tasks 0..num_tasks-1 of `task_set`, each played exactly once by `act` in min(num_envs,
    num_tasks) envs (the held-out evaluation protocol): per-episode arrays of the return r,
    normalized_r (return / exact optimum), success."""
    envs = PatchLocVecEnv(task_set, min(num_envs, num_tasks), max_steps=max_steps)
    next_obs, _ = envs.reset(seed=seed, options={"task_ids": np.arange(num_tasks)})
    results = {"r": [], "normalized_r": [], "success": []}
    while len(results["r"]) < num_tasks:
        next_obs, _, _, _, infos = envs.step(act(next_obs))
        if "episode" in infos:
            # Later episodes draw random tasks
            counted = infos["_episode"] & infos["episode"]["from_queue"]
            for key in results:
                results[key].extend(infos["episode"][key][counted])
    envs.close()
    return {key: np.asarray(values) for key, values in results.items()}


def episode_windows(
    task_set: TaskSet, task_id: int, act: Policy, max_steps: int = 20, seed: Optional[int] = None
) -> list:
    """The window boxes (normalised, like TaskSet.target_boxes) of one episode of task `task_id`
    played by `act`, from the full image to the last step."""
    env = PatchLocEnv(task_set, max_steps=max_steps)
    obs, _ = env.reset(seed=seed, options={"task_id": task_id})
    boxes, done = [env.window_box], False
    while not done:
        obs, _, terminated, truncated, _ = env.step(int(act(obs[None])[0]))
        boxes.append(env.window_box)
        done = terminated or truncated
    return boxes


def draw_episodes(
    task_set: TaskSet,
    task_ids: Sequence[int],
    act: Policy,
    max_steps: int = 20,
    seed: Optional[int] = None,
) -> np.ndarray:
    """One episode per task of `task_ids` played by `act`, each drawn by draw_episode, side by
    side: (4V, n 4V, 3) uint8; with a caption strip under each (task, slide and region; 12 more
    rows) when the set holds slide regions."""
    drawings = []
    for task_id in task_ids:
        boxes = episode_windows(task_set, task_id, act, max_steps, seed)
        drawing = draw_episode(task_set.image(task_id), boxes, task_set.target_boxes[task_id])
        drawings.append(_with_caption(drawing, task_set.caption(task_id)))
    return np.concatenate(drawings, axis=1)


def draw_episode_steps(
    task_set: TaskSet, task_id: int, act: Policy, max_steps: int = 20, seed: Optional[int] = None
) -> list[np.ndarray]:
    """One episode of task `task_id` played by `act`, drawn after every step (the path so far):
    the frames of a video (captioned like draw_episodes' drawings)."""
    boxes = episode_windows(task_set, task_id, act, max_steps, seed)
    image, target = task_set.image(task_id), task_set.target_boxes[task_id]
    caption = task_set.caption(task_id)
    return [
        _with_caption(draw_episode(image, boxes[: t + 1], target), caption)
        for t in range(len(boxes))
    ]


def draw_episode(
    image: np.ndarray, window_boxes: Sequence[np.ndarray], target_box: np.ndarray
) -> np.ndarray:
    """The full image with the target (green) and the window's path, one
    outline per step (blue -> yellow)."""
    canvas = image.copy()
    side = canvas.shape[0]

    def outline(box, colour, width):
        y0, x0, y1, x1 = (np.asarray(box) * side).round().astype(int)
        canvas[y0 : y0 + width, x0:x1] = colour
        canvas[y1 - width : y1, x0:x1] = colour
        canvas[y0:y1, x0 : x0 + width] = colour
        canvas[y0:y1, x1 - width : x1] = colour

    outline(target_box, (0, 255, 0), width=max(2, side // 100))
    for t, box in enumerate(window_boxes):
        frac = t / max(len(window_boxes) - 1, 1)
        outline(
            box,
            (int(255 * frac), int(255 * frac), int(255 * (1 - frac))),
            width=max(1, side // 200),
        )
    return canvas


def _check_render_mode(render_mode: Optional[str], metadata: dict) -> Optional[str]:
    if render_mode is not None and render_mode not in metadata["render_modes"]:
        raise PatchLocConfigError(
            f"render_mode must be None or one of {metadata['render_modes']} (got {render_mode!r})"
        )
    return render_mode


class PatchLocVecEnv(gym.vector.VectorEnv):
    __doc__ = (
        """Native batched patch-localization env: num_envs episodes in flat numpy arrays, same-step
    auto-reset. gymnasium.make_vec("PatchLoc-v0", num_envs=N, ...) makes one.

    step(actions) -> obs (N, 3, V, V, 3) uint8, rewards float32 (N,), terminations, truncations,
    infos. When an episode ends the returned obs is already the first obs of the env's next episode
    (tasks drawn uniformly from the TaskSet with np_random, seeded by reset(seed=...)); infos then
    holds
        infos["episode"] = {"r": float32, "l": int32, "normalized_r": float32 (r / optimal return),
                            "success": bool, "stopped": bool, "final_iou": float32,
                            "task_id": int64,
                            "from_queue": bool (the task came from reset's task_ids)}
                           (arrays of N)
        infos["_episode"] = bool mask of the envs whose episode ended (other entries are 0),
        infos["final_obs"] = object array of the last obs of those episodes (None elsewhere),
        "_final_obs".
    reset(seed=None, options={"task_ids": ids}) starts env i on task ids[i]; extra ids
    (len(ids) > N) are queued and handed out, in order, at the next auto-resets (then tasks are
    random again): run each held-out task once by passing all its ids and counting episodes with
    from_queue.
    window_boxes() -> (N, 4) current windows (y0, x0, y1, x1) normalised to [0, 1]
    (TaskSet.target_boxes).
    get_state() / set_state(state): numpy arrays to checkpoint and resume exactly.
    copy (True): return a copy of the internal observation buffer (False: the buffer itself,
    overwritten by the next step).
    render() (render_mode "rgb_array"): a tuple of N frames, as PatchLocEnv.render().
    """
        + _TASKS_DOC
        + _ENV_ARGS_DOC
    )

    metadata = {"autoreset_mode": _AUTORESET_MODE, "render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        task_set: Optional[TaskSet] = None,
        num_envs: int = 1,
        max_steps: int = 20,
        success_iou: float = 0.5,
        success_bonus: float = 1.0,
        stop_penalty: float = 0.2,
        copy: bool = True,
        render_mode: Optional[str] = None,
        **task_set_settings,
    ):
        _check_int("num_envs", num_envs, 1)
        self.render_mode = _check_render_mode(render_mode, self.metadata)
        task_set = _resolve_task_set(task_set, task_set_settings)
        self.task_set, self.num_envs, self.copy = task_set, int(num_envs), copy
        self.config = _episode_config(task_set, max_steps, success_iou, success_bonus, stop_penalty)
        self.optimal_returns = task_set.optimal_returns(self.config)
        v = task_set.view_size
        self.single_observation_space = gym.spaces.Box(0, 255, (3, v, v, 3), dtype=np.uint8)
        self.single_action_space = gym.spaces.Discrete(NUM_ACTIONS)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._batch = _Batch(task_set, self.config, self.num_envs)
        self._all = np.arange(self.num_envs)
        self._queue = np.zeros(0, dtype=np.int64)
        self._from_queue = np.zeros(self.num_envs, dtype=bool)

    def _observations(self) -> np.ndarray:
        return self._batch.obs.copy() if self.copy else self._batch.obs

    def _draw_tasks(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Next `count` tasks: from the queue first, then uniformly at random."""
        queued, self._queue = self._queue[:count], self._queue[count:]
        fresh = self.np_random.integers(self.task_set.num_tasks, size=count - len(queued))
        return np.concatenate([queued, fresh]), np.arange(count) < len(queued)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        super().reset(seed=seed)  # (re)seeds self.np_random
        task_ids = (options or {}).get("task_ids")
        self._queue = np.zeros(0, dtype=np.int64)
        if task_ids is not None:
            task_ids = np.asarray(task_ids, dtype=np.int64).reshape(-1)
            if (
                len(task_ids) < self.num_envs
                or task_ids.min() < 0
                or task_ids.max() >= self.task_set.num_tasks
            ):
                raise PatchLocConfigError(
                    f"options['task_ids'] needs at least {self.num_envs} ids in "
                    f"0..{self.task_set.num_tasks - 1} (got {len(task_ids)} ids)"
                )
            self._queue = task_ids
        tasks, self._from_queue = self._draw_tasks(self.num_envs)
        self._batch.start(self._all, tasks)
        return self._observations(), {"task_id": tasks.copy()}

    def step(self, actions):
        batch = self._batch
        reward, terminated, truncated, success, stopped = batch.step(
            _check_actions(actions, self.num_envs)
        )
        done = terminated | truncated
        infos: dict[str, Any] = {}
        if done.any():
            ended = np.flatnonzero(done)
            # Episode statistics, gymnasium convention: arrays over all envs + a "_episode" mask.
            optimal = self.optimal_returns[batch.tasks]
            normalized = np.divide(
                batch.returns, optimal, out=np.full(self.num_envs, np.nan), where=optimal > 0
            )
            infos["episode"] = {
                "r": np.where(done, batch.returns, 0.0).astype(np.float32),
                "l": np.where(done, batch.steps, 0).astype(np.int32),
                "normalized_r": np.where(done, normalized, 0.0).astype(np.float32),
                "success": success.copy(),
                "stopped": stopped & done,
                "final_iou": np.where(done, batch.ious, 0.0).astype(np.float32),
                "task_id": np.where(done, batch.tasks, 0),
                "from_queue": self._from_queue & done,
            }
            infos["_episode"] = done
            batch.render(ended)  # the final observation, kept for bootstrapping truncated episodes
            final_obs = np.full(self.num_envs, None, dtype=object)
            for i in ended:
                final_obs[i] = batch.obs[i].copy()
            infos["final_obs"], infos["_final_obs"] = final_obs, done
            tasks, self._from_queue[ended] = self._draw_tasks(len(ended))
            batch.start(ended, tasks)  # same-step auto-reset (renders the new episodes' first obs)
            batch.render(np.flatnonzero(~done))
        else:
            batch.render(self._all)
        return self._observations(), reward.astype(np.float32), terminated, truncated, infos

    def render(self) -> Optional[tuple[np.ndarray, ...]]:
        """render_mode "rgb_array": one frame per env, the image with the target and the window
        outlined (4V, 4V, 3), captioned for slide regions (TaskSet.draw_frame)."""
        if self.render_mode is None:
            gym.logger.warn(
                "PatchLocVecEnv.render() was called without a render_mode; pass "
                "render_mode='rgb_array'"
            )
            return None
        return tuple(
            self.task_set.draw_frame(task, state)
            for task, state in zip(self._batch.tasks, self._batch.states)
        )

    @property
    def tasks(self) -> np.ndarray:
        """(N,) task id of each env's current episode."""
        return self._batch.tasks.copy()

    def windows(self) -> np.ndarray:
        """(N, 3) int current windows as (zoom, row, col) on the lattice."""
        return STATES[self._batch.states].copy()

    def window_boxes(self) -> np.ndarray:
        """(N, 4) float current windows (y0, x0, y1, x1) normalised to [0, 1], y1/x1
        exclusive (as target_boxes)."""
        return NORMALIZED_BOXES[self._batch.states].copy()

    def optimal_actions(self, task_id: int) -> list[int]:
        """An oracle action sequence achieving optimal_returns[task_id]
        under this env's parameters."""
        return self.task_set.optimal_actions(task_id, self.config)

    def get_state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume exactly (episodes in progress, task queue, task RNG), as
        numpy arrays of int64 / float64 / bool, so that a checkpoint can store them as tensors
        (torch.load(weights_only=True))."""
        rng = self.np_random.bit_generator.state
        if rng["bit_generator"] != "PCG64":
            raise TypeError(
                "get_state supports the PCG64 generator of gymnasium's seeding, not "
                f"{rng['bit_generator']}"
            )
        words = [
            rng["state"]["state"] >> 64,
            rng["state"]["state"],
            rng["state"]["inc"] >> 64,
            rng["state"]["inc"],
        ]
        words = [w & (2**64 - 1) for w in words] + [rng["has_uint32"], rng["uinteger"]]
        b = self._batch
        return {
            "tasks": b.tasks.copy(),
            "states": b.states.copy(),
            "steps": b.steps.copy(),
            "returns": b.returns.copy(),
            "from_queue": self._from_queue.copy(),
            "queue": self._queue.copy(),
            "rng": np.array(words, dtype=np.uint64).view(np.int64),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore get_state() from an env with the same TaskSet and num_envs: the
        next step continues exactly."""
        b, n = self._batch, self.num_envs
        tasks = np.asarray(state["tasks"], dtype=np.int64)
        if tasks.shape != (n,) or tasks.max() >= self.task_set.num_tasks:
            raise PatchLocConfigError(
                f"saved env state is for {len(tasks)} envs over >= {tasks.max() + 1} tasks, not "
                f"{n} envs over {self.task_set.num_tasks}; resume with the settings of the saved "
                "run"
            )
        b.tasks[:], b.target_states[:] = tasks, self.task_set.target_states[tasks]
        b.states[:], b.steps[:], b.returns[:] = state["states"], state["steps"], state["returns"]
        b.ious = IOU[b.target_states, b.states]
        self._from_queue = np.asarray(state["from_queue"], dtype=bool).copy()
        self._queue = np.asarray(state["queue"], dtype=np.int64).copy()
        words = [int(w) for w in np.asarray(state["rng"], dtype=np.int64).view(np.uint64)]
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": (words[0] << 64) | words[1], "inc": (words[2] << 64) | words[3]},
            "has_uint32": words[4],
            "uinteger": words[5],
        }
        self.np_random = rng
        b.render(self._all, target=True)
