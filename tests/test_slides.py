"""Whole-slide images as an image source (envs/slides.py), on slides the tests write themselves.

Tiled pyramidal TIFFs written with tifffile (JPEG tiles, as scanners write them): Aperio-style .svs
files with the MPP in their ImageDescription and generic pyramidal .tif files with it in their
resolution tags, each white glass with round tissue blobs at known places. Checked: regions and
targets lie on tissue; the level and MPP chosen; slide-level splits; tasks.json locates every task;
optimal returns stay exact; check_env; no slide is read whole; image folders and procedural task
sets bit-identical to the code before slides existed; each kind of bad input gets one line.
"""

import hashlib
import io
import json
import logging
import os
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import openslide
import pytest
import tifffile
from gymnasium.utils.env_checker import check_env
from PIL import Image

import envs.patchloc
import envs.slides
from envs import (
    ENV_ID,
    PatchLocConfigError,
    PatchLocEnv,
    draw_episode_steps,
    draw_episodes,
    make_task_sets,
    procedural_image,
    write_tasks_json,
)
from envs.images import _square
from envs.slides import READ_PIXELS, SlideSettings, SlideSource, is_slide, tissue_mask

V = 16  # image_size 4V = 64: a region is 64 pixels at slide_mpp
SIDE = (
    1024  # level-0 side of the test slides; levels 1024, 256 and 64 pixels (downsamples 1, 4, 16)
)
GLASS = np.array([242, 241, 245], np.float32)
STROMA = np.array([226, 150, 190], np.float32)
NUCLEUS = np.array([95, 55, 140], np.float32)


def tissue_at(y, x, blobs):
    """Whether level-0 points (y, x) (broadcast arrays) lie in a blob (cy, cx, radius)."""
    inside = np.zeros(np.broadcast(y, x).shape, dtype=bool)
    for cy, cx, radius in blobs:
        inside |= (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    return inside


def draw_level(n, downsample, blobs, seed):
    """One pyramid level, drawn at its own resolution: pink stroma with purple nuclei in the blobs,
    white glass with a little noise elsewhere."""
    y = ((np.arange(n, dtype=np.float32) + 0.5) * downsample)[:, None]
    x = ((np.arange(n, dtype=np.float32) + 0.5) * downsample)[None, :]
    inside = tissue_at(y, x, blobs)
    nuclei = np.sin(y / 9.0) * np.sin(x / 11.0) > 0.55
    texture = 0.85 + 0.15 * np.sin(y / 23.0 + x / 17.0)
    noise = np.random.default_rng(seed).integers(-1, 2, (n, n), dtype=np.int16)
    image = np.empty((n, n, 3), np.uint8)
    for c in range(3):
        tissue = np.where(nuclei, NUCLEUS[c], np.clip(STROMA[c] * texture, 0, 255))
        image[..., c] = np.where(inside, tissue, GLASS[c] + noise)
    return image


def write_slide(path, blobs, mpp="0.5", vendor="aperio", downsamples=(1, 4, 16), side=SIDE):
    """A tiled pyramidal TIFF slide with JPEG tiles: Aperio-style (.svs, `|MPP = mpp` in the
    ImageDescription, left out if mpp is None) or generic (resolution tags in centimetres)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for i, downsample in enumerate(downsamples):
            n = side // downsample
            tile = (256, 256) if n >= 256 else (64, 64)
            options = dict(tile=tile, photometric="rgb", compression="jpeg", metadata=None)
            level = draw_level(n, downsample, blobs, seed=i)
            if vendor == "aperio":
                description = (
                    f"Aperio Image Library v12.0.15\r\n{side}x{side} [0,100 {side}x{side}] "
                    f"({tile[0]}x{tile[1]}) JPEG/RGB Q=75|AppMag = 20"
                    + ("" if mpp is None else f"|MPP = {mpp}")
                )
                tif.write(level, description=description, **options)
            else:
                if mpp is not None:
                    options.update(resolution=(1e4 / float(mpp),) * 2, resolutionunit="CENTIMETER")
                tif.write(level, subfiletype=0 if i == 0 else 1, **options)
    return path


# Six slides (level-0 blobs), four Aperio and two generic, one in a subfolder each kind.
SLIDES = {
    "s0.svs": [(300, 300, 230), (740, 720, 230)],
    "s1.svs": [(512, 512, 400)],
    "s2.svs": [(280, 760, 220), (760, 280, 220)],
    "sub/s3.tif": [(500, 450, 380)],
    "sub/s4.svs": [(512, 300, 250), (512, 760, 200)],
    "s5.tif": [(400, 400, 350)],
}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    for name, blobs in SLIDES.items():
        write_slide(folder / name, blobs, vendor="aperio" if name.endswith(".svs") else "generic")
    return folder


def tissue_fraction(region, blobs):
    """Fraction of a level-0 square {x, y, size} inside the blobs, from a 32 x 32 grid of points."""
    offsets = (np.arange(32) + 0.5) / 32 * region["size"]
    return tissue_at(region["y"] + offsets[:, None], region["x"] + offsets[None, :], blobs).mean()


def read_back(folder, task):
    """A task's image read again from its slide with only what tasks.json says about it."""
    region = task["region_level0"]
    with openslide.OpenSlide(str(folder / task["file"])) as slide:
        size = task["region_size_at_level"]
        rgba = slide.read_region((region["x"], region["y"]), task["level"], (size, size))
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return _square(canvas.convert("RGB"), 4 * V, 4 * V)


def one_warning(caplog, text):
    """The one warning record containing `text`, checked to be a single line."""
    found = [r.getMessage() for r in caplog.records if text in r.getMessage()]
    assert len(found) == 1, [r.getMessage() for r in caplog.records]
    assert "\n" not in found[0]
    return found[0]


# --------------------------------------------------------------------------------------------------
# Regions and targets on tissue, level and MPP, slide-level splits
# --------------------------------------------------------------------------------------------------
def test_regions_and_targets_lie_on_tissue(slides):
    train, test = make_task_sets(
        12, 6, slides, view_size=V, seed=0, targets_per_image=2, regions_per_slide=3
    )
    for task_set in (train, test):
        described = task_set.describe()
        for task in described:
            blobs = SLIDES[task["file"]]
            assert task["kind"] == "slide" and task["tissue_fraction"] >= 0.5
            # Blobs cover the region and the target as the slide was drawn (min_tissue 0.5; the
            # masks are estimates, so a margin).
            assert tissue_fraction(task["region_level0"], blobs) >= 0.4
            assert tissue_fraction(task["target"]["level0"], blobs) >= 0.4
            image = task_set.image(task["task_id"])
            stained = envs.slides.saturation(image) >= 20  # the task image shows that tissue
            assert abs(stained.mean() - tissue_fraction(task["region_level0"], blobs)) < 0.15
        # Regions of one slide never overlap.
        for i, a in enumerate(described):
            for b in described[i + 1 :]:
                if a["file"] == b["file"] and a["image"] != b["image"]:
                    ra, rb = a["region_level0"], b["region_level0"]
                    assert (
                        abs(ra["x"] - rb["x"]) >= ra["size"] or abs(ra["y"] - rb["y"]) >= ra["size"]
                    )


def test_thumbnail_mask_finds_the_blobs():
    """Otsu on the saturation of a thumbnail: the blob area to within a few percent."""
    blobs = [(300, 300, 230), (740, 720, 230)]
    thumbnail = draw_level(256, 4, blobs, seed=0)
    mask, threshold = tissue_mask(thumbnail)
    truth = tissue_at(*np.mgrid[2:1024:4, 2:1024:4], blobs)
    assert 20 <= threshold <= 50
    assert (mask != truth).mean() < 0.02
    glass = draw_level(256, 4, [], seed=0)
    assert not tissue_mask(glass)[0].any()


@pytest.mark.parametrize(
    "name, mpp, settings, level, level_side, task_mpp",
    [
        (
            "a.svs",
            "0.5",
            SlideSettings(2.0, None, 1),
            1,
            64,
            2.0,
        ),  # downsample 4 is level 1 exactly
        ("a.svs", "0.5", SlideSettings(1.0, None, 1), 0, 128, 1.0),  # level 0, 128 px resized to 64
        ("a.svs", "0.5", SlideSettings(3.0, None, 1), 1, 96, 3.0),  # the level below downsample 6
        ("a.svs", "0.5", SlideSettings(8.0, None, 1), 2, 64, 8.0),
        ("a.svs", "0.502", SlideSettings(2.0, None, 1), 1, 64, 2.008),  # within 1 %: still level 1
        (
            "g.tif",
            "0.25",
            SlideSettings(2.0, None, 1),
            1,
            128,
            2.0,
        ),  # generic TIFF, MPP from resolution
        ("g.tif", "0.25", SlideSettings(None, 2, 1), 2, 64, 4.0),  # slide_level: as it is
        ("n.svs", None, SlideSettings(None, 1, 1), 1, 64, None),  # no MPP, level given
        (
            "n.svs",
            None,
            SlideSettings(2.0, None, 1),
            1,
            128,
            2.0,
        ),  # no MPP: level 0 assumed 0.25 um/px
    ],
)
def test_level_and_mpp_chosen(tmp_path, name, mpp, settings, level, level_side, task_mpp):
    vendor = "aperio" if name.endswith(".svs") else "generic"
    path = write_slide(tmp_path / name, [(512, 512, 480)], mpp=mpp, vendor=vendor)
    source = SlideSource(path, tmp_path, settings, 4 * V, 4 * V)
    assert (source.level, source.level_side) == (level, level_side)
    assert source.mpp == pytest.approx(task_mpp) if task_mpp else source.mpp is None
    region = source.read(source.regions(np.random.default_rng(0))[0])
    assert region.top.shape == (4 * V, 4 * V, 3)
    assert region.record["region_level0"]["size"] == level_side * 4**level
    assert (
        region.record["mpp_source"]
        == {
            "0.5": "metadata",
            "0.502": "metadata",
            "0.25": "metadata",
            None: "unknown" if settings.level is not None else "assumed: missing",
        }[mpp]
    )
    source.close()


def test_held_out_slides_are_never_used_for_training(slides):
    train, test = make_task_sets(9, 6, slides, view_size=V, seed=1, regions_per_slide=3)
    train_files = {t["file"] for t in train.describe()}
    test_files = {t["file"] for t in test.describe()}
    assert len(test_files) == 2 and len(train_files) == 3 and not train_files & test_files
    # The held-out slides do not depend on the number of training tasks.
    _, same_test = make_task_sets(3, 6, slides, view_size=V, seed=1, regions_per_slide=3)
    assert same_test.image_names == test.image_names
    np.testing.assert_array_equal(same_test.levels[2], test.levels[2])
    # Task i of a slide set is on image i // targets_per_image, 3 images per slide in order.
    assert [t["image"] for t in test.describe()] == list(range(6))


def test_folder_of_slides_and_images(slides, tmp_path):
    """Slides and ordinary images together: an ordinary TIFF (one tiled level, or strips) is read
    as an image, a pyramidal one as a slide."""
    folder = tmp_path / "mixed"
    for name in ("s0.svs", "s1.svs", "sub/s3.tif"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes((slides / name).read_bytes())
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "tiled.tif", procedural_image(rng, 512), tile=(256, 256))
    tifffile.imwrite(folder / "strips.tif", procedural_image(rng, 300), photometric="rgb")
    Image.fromarray(procedural_image(rng, 200)).save(folder / "photo.png")
    assert [is_slide(folder / n) for n in ("s0.svs", "sub/s3.tif", "tiled.tif", "strips.tif")] == [
        True,
        True,
        False,
        False,
    ]
    train, test = make_task_sets(7, 2, folder, view_size=V, seed=0, regions_per_slide=2)
    kinds = sorted((r["kind"], r["file"]) for r in train.image_records + test.image_records)
    assert kinds == sorted(
        [("image", "photo.png"), ("image", "strips.tif"), ("image", "tiled.tif")]
        + [("slide", name) for name in ("s0.svs", "s1.svs", "sub/s3.tif") for _ in range(2)]
    )


# --------------------------------------------------------------------------------------------------
# tasks.json, captions, the env
# --------------------------------------------------------------------------------------------------
def test_tasks_json_locates_every_task(slides, tmp_path):
    train, test = make_task_sets(
        8, 4, slides, view_size=V, seed=2, targets_per_image=2, regions_per_slide=2
    )
    path = tmp_path / "run" / "tasks.json"
    path.parent.mkdir()
    write_tasks_json(path, train, test)
    written = json.loads(path.read_text())
    assert written["settings"]["image_source"] == str(slides)
    assert written["settings"]["slide_mpp"] == 2.0 and written["settings"]["regions_per_slide"] == 2
    assert sorted(os.listdir(path.parent)) == ["tasks.json"]  # no partial file left
    for task_set in (train, test):
        tasks = written["splits"][task_set.split]
        assert [t["task_id"] for t in tasks] == list(range(task_set.num_tasks))
        for task in tasks:
            i = task["task_id"]
            assert task["image"] == task_set.task_images[i]
            np.testing.assert_array_equal(task["target"]["box"], task_set.target_boxes[i])
            assert [task["target"][k] for k in ("zoom", "row", "col")] == list(task_set.targets[i])
            assert task["level"] == 1 and task["mpp"] == pytest.approx(2.0)
            # The file, level and region it names give back the task's image, pixel for pixel.
            np.testing.assert_array_equal(read_back(slides, task), task_set.image(i))
            region, target = task["region_level0"], task["target"]["level0"]
            box = task_set.target_boxes[i] * region["size"]
            assert target["x"] == pytest.approx(region["x"] + box[1], abs=1e-3)
            assert target["size"] == pytest.approx(box[3] - box[1], abs=1e-3)


def test_write_tasks_json_error_is_one_line(tmp_path):
    train, test = make_task_sets(2, 1, view_size=V)
    with pytest.raises(PatchLocConfigError, match="cannot write") as err:
        write_tasks_json(tmp_path / "missing" / "tasks.json", train, test)
    assert "\n" not in str(err.value) and not (tmp_path / "missing").exists()
    write_tasks_json(tmp_path / "tasks.json", train, test)  # procedural sets describe themselves
    tasks = json.loads((tmp_path / "tasks.json").read_text())["splits"]["train"]
    assert tasks[1]["kind"] == "procedural" and tasks[1]["name"] == "procedural:seed=0:train:1"


def test_env_on_slides_passes_check_env_and_shows_the_region(slides):
    env = gym.make(
        ENV_ID,
        image_source=slides,
        num_tasks=4,
        num_test_tasks=2,
        regions_per_slide=2,
        view_size=V,
        render_mode="rgb_array",
    )
    check_env(env.unwrapped)
    env.reset(seed=0, options={"task_id": 3})
    frame = env.render()
    side = 4 * V
    assert frame.shape == (side + 12, side, 3)  # the image, then a caption strip
    task_set = env.unwrapped.task_set
    # Off every outline (lattice edges are at multiples of side / 16 = 4 pixels): the image itself.
    np.testing.assert_array_equal(frame[33, 33], task_set.image(3)[33, 33])
    assert frame[side:].any()  # the caption is written
    caption = task_set.caption(3)
    record = task_set.image_records[task_set.task_images[3]]
    assert caption.startswith("task 3: ") and record["file"] in caption
    assert f"x={record['region_level0']['x']}" in caption

    def act(obs):
        return np.full(len(obs), 4)  # zoom in

    drawing = draw_episodes(task_set, range(3), act)
    assert drawing.shape == (side + 12, 3 * side, 3)
    frames = draw_episode_steps(task_set, 0, act)
    assert {f.shape for f in frames} == {(side + 12, side, 3)}


def test_optimal_returns_stay_exact_on_slides(slides):
    train, _ = make_task_sets(
        6, 3, slides, view_size=V, seed=3, targets_per_image=3, regions_per_slide=2
    )
    env = PatchLocEnv(train)
    for task in range(train.num_tasks):
        env.reset(options={"task_id": task})
        total, done = 0.0, False
        for action in env.optimal_actions(task):
            _, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        assert done and total == pytest.approx(env.optimal_returns[task], abs=1e-12)


def test_no_slide_is_read_whole(slides, monkeypatch):
    """Only thumbnails (the coarsest level) and regions are read, in bounded reads."""
    reads = []
    read_region = openslide.OpenSlide.read_region

    def recording(self, location, level, size):
        reads.append((level, size[0] * size[1]))
        return read_region(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", recording)
    train, test = make_task_sets(12, 6, slides, view_size=V, seed=0, regions_per_slide=3)
    assert all(pixels <= READ_PIXELS for _, pixels in reads)
    # Level 0 (1024 x 1024) is never read: regions come from level 1 (256 x 256), one read of 64 x
    # 64 pixels each, thumbnails from level 2 (64 x 64), once per slide.
    assert {level for level, _ in reads} == {1, 2}
    region_reads = [pixels for level, pixels in reads if level == 1]
    assert (
        set(region_reads) == {64 * 64} and len(region_reads) >= train.num_images + test.num_images
    )
    assert sum(region_reads) < 0.5 * len(SLIDES) * 256**2
    assert [pixels for level, pixels in reads if level == 2] == [64 * 64] * len(SLIDES)


def test_mpp_without_metadata_is_assumed_with_one_warning_line(tmp_path, caplog):
    for name, mpp in (("missing.svs", None), ("absurd.svs", "0"), ("huge.svs", "1e6")):
        write_slide(tmp_path / name, [(512, 512, 480)], mpp=mpp)
    write_slide(tmp_path / "good.svs", [(512, 512, 480)])
    with caplog.at_level(logging.WARNING):
        train, test = make_task_sets(3, 1, tmp_path, view_size=V, seed=0, regions_per_slide=1)
    line = one_warning(caplog, "no usable MPP metadata")
    assert line.startswith("warning: 3 slides in ")
    assert "2 absurd (absurd.svs, huge.svs), 1 missing (missing.svs)" in line
    assert "0.25 um/px" in line and "downsample 8 for slide_mpp 2" in line and "slide_level" in line
    sources = {r["file"]: r["mpp_source"] for r in train.image_records + test.image_records}
    assert sources == {
        "missing.svs": "assumed: missing",
        "absurd.svs": "assumed: absurd",
        "huge.svs": "assumed: absurd",
        "good.svs": "metadata",
    }


# --------------------------------------------------------------------------------------------------
# Bad input: one warning line counting the skipped files by reason, or a one-line error
# --------------------------------------------------------------------------------------------------
def bad_folder(slides, tmp_path):
    """Two good slides, and one of each kind of bad slide file."""
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("s0.svs", "s1.svs"):
        (folder / name).write_bytes((slides / name).read_bytes())
    data = (slides / "s2.svs").read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 2])
    (folder / "scan.mrxs").write_bytes(b"[GENERAL]\n")  # its folder "scan/" is missing
    write_slide(folder / "glass.svs", [])
    write_slide(folder / "speck.svs", [(100, 100, 60)])  # too little tissue for 2 regions
    return folder


def test_bad_slides_are_skipped_with_one_warning_line(slides, tmp_path, caplog):
    folder = bad_folder(slides, tmp_path)
    with caplog.at_level(logging.WARNING):
        # Seed 3 orders the files so that every bad one is examined before the second good slide
        # (the 2 good ones give the 4 images); files after the last one needed are not opened.
        train, test = make_task_sets(2, 2, folder, view_size=V, seed=3, regions_per_slide=2)
    line = one_warning(caplog, "skipped")
    assert line.startswith(f"warning: skipped 4 of 6 image files in '{folder}': ")
    for part in (
        "1 .mrxs without its data folder (the folder of the same name) (scan.mrxs)",
        "1 no tissue (glass only) (glass.svs)",
        "1 tissue for fewer than 2 regions (regions_per_slide) at min_tissue 0.5 (speck.svs)",
        "1 unreadable (truncated.svs)",
    ):
        assert part in line
    assert {r["file"] for r in train.image_records + test.image_records} == {"s0.svs", "s1.svs"}


def one_line_error(match, *args, **kwargs):
    with pytest.raises(PatchLocConfigError, match=match) as err:
        make_task_sets(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_too_few_usable_slides_is_a_one_line_error(slides, tmp_path):
    folder = bad_folder(slides, tmp_path)
    message = one_line_error(
        "has 4 usable images but 6 are needed", 4, 2, folder, view_size=V, regions_per_slide=2
    )
    assert "targets_per_image=1, 2 regions per slide); skipped 1 .mrxs without" in message
    assert (
        "1 no tissue (glass only) (glass.svs)" in message and "1 unreadable (truncated" in message
    )
    assert "raise regions_per_slide (--regions-per-slide) or lower min_tissue" in message


def test_folder_of_only_unreadable_slides(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"not a slide")
    (tmp_path / "b.ndpi").write_bytes(b"\x00" * 100)
    (tmp_path / "c.mrxs").write_bytes(b"")
    (tmp_path / "c").mkdir()  # a data folder, but nothing OpenSlide can read
    (tmp_path / "d.scn").write_bytes(b"II*\x00")
    message = one_line_error("has 0 usable images but 2 are needed", 1, 1, tmp_path, view_size=V)
    assert "skipped 4 unreadable (a.svs, b.ndpi, c.mrxs, ...)" in message


def test_a_slide_whose_tiles_do_not_decode_is_unreadable(slides, tmp_path):
    """It opens and its thumbnail (level 2) reads, but its level-1 tiles are zeroed."""
    data = bytearray((slides / "s1.svs").read_bytes())
    with tifffile.TiffFile(slides / "s1.svs") as tif:
        page = tif.pages[1]
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            data[offset + 20 : offset + count - 2] = bytes(count - 22)
    (tmp_path / "tiles.svs").write_bytes(bytes(data))
    message = one_line_error(
        "has 0 usable images", 1, 1, tmp_path, view_size=V, regions_per_slide=1
    )
    assert "skipped 1 unreadable (tiles.svs)" in message


def test_progress_bar_counts_slide_regions(slides, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(envs.patchloc, "_PROGRESS_DELAY_S", 0.0)  # as if the build were slow
    monkeypatch.setattr(sys, "stderr", Terminal())
    make_task_sets(4, 2, slides, view_size=V, seed=0, regions_per_slide=2)
    assert "patch-loc task images" in sys.stderr.getvalue() and " 6/6 " in sys.stderr.getvalue()


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(slide_mpp=0.25), r"skipped 6 level 0 coarser than slide_mpp 0.25 um/px \(reading it"),
        (dict(regions_per_slide=100), "skipped 6 tissue for fewer than 100 regions"),
        (dict(slide_level=5), r"skipped 6 no level 5 \(slide_level\)"),
        (dict(min_tissue=1.0, regions_per_slide=8), "tissue for fewer than 8 regions"),
    ],
)
def test_settings_no_slide_can_meet_are_one_line_errors(slides, settings, match):
    one_line_error(match, 2, 1, slides, view_size=V, **settings)


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(regions_per_slide=0), r"regions_per_slide must be an integer >= 1 \(got 0\)"),
        (dict(regions_per_slide=2.5), "regions_per_slide must be an integer"),
        (dict(slide_mpp=-1), "slide_mpp must be a positive number"),
        (dict(slide_mpp=float("nan")), "slide_mpp must be a positive number"),
        (dict(slide_mpp="2"), "slide_mpp must be a positive number"),
        (dict(slide_mpp=2, slide_level=1), "give slide_mpp .* or slide_level .*, not both"),
        (dict(slide_level=-1), "slide_level must be an integer >= 0"),
        (dict(min_tissue=1.5), r"min_tissue must be a fraction in \[0, 1\]"),
    ],
)
def test_bad_slide_settings_are_one_line_errors(settings, match):
    one_line_error(match, 2, 1, view_size=V, **settings)  # checked for every image source


# --------------------------------------------------------------------------------------------------
# Image folders and procedural task sets: bit-identical to the code before slides (f8a5da3)
# --------------------------------------------------------------------------------------------------
def task_set_digest(task_set):
    h = hashlib.sha256()
    for level in task_set.levels:
        h.update(np.ascontiguousarray(level).tobytes())
    h.update(task_set.target_states.astype(np.int64).tobytes())
    h.update(np.asarray(task_set.optimal_returns(), dtype=np.float64).tobytes())
    h.update(task_set.outline_colours.tobytes())
    return h.hexdigest()[:16]


def write_photo_folder(root):
    """Ten images read with integer arithmetic only (sides 64, 128 or 192 for image_size 64: exact
    copies or integer area reductions, PNG or striped TIFF), so the digests do not depend on the
    CPU; plus a near-uniform, a too small and an unreadable file."""
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i, side in enumerate([64, 128, 192, 64, 128, 64, 64, 128, 64, 64]):
        image = procedural_image(rng, side)
        folder = root / "sub" if i % 3 == 0 else root
        if i % 4 == 1:
            tifffile.imwrite(folder / f"photo{i}.tif", image, photometric="rgb", rowsperstrip=16)
        else:
            Image.fromarray(image).save(folder / f"photo{i}.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(root / "blank.png")
    Image.fromarray(procedural_image(rng, 32)).save(root / "tiny.png")
    (root / "corrupt.png").write_bytes(b"not a png")


@pytest.mark.parametrize(
    "num_train, num_test, k, digests, train_files",
    [
        (6, 2, 1, ("e668df3076f4cd66", "5104a2c4de93fb0d"), "sub/photo0 photo7 sub/photo6"),
        (5, 3, 1, ("2e1fae2778622f7c", "1102f72dcc270f36"), "sub/photo0 photo7 sub/photo6"),
        (10, 4, 3, ("0148fcb1f689139b", "e7f7f429095f3912"), "sub/photo0 photo7 sub/photo6"),
        (3, 1, 2, ("0b3f5b4ed7332322", "c69cb208fa30295a"), "sub/photo0 photo7"),
    ],
)
def test_image_folders_unchanged(tmp_path, caplog, num_train, num_test, k, digests, train_files):
    """Pinned with the code before slides existed (f8a5da3), warning line included."""
    write_photo_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        train, test = make_task_sets(
            num_train, num_test, tmp_path, view_size=V, seed=1, targets_per_image=k
        )
    assert (task_set_digest(train), task_set_digest(test)) == digests
    names = [os.path.splitext(os.path.relpath(n, tmp_path))[0] for n in train.image_names]
    assert names[:3] == train_files.split()
    assert [r["kind"] for r in train.image_records] == ["image"] * train.num_images
    if (num_train, num_test) == (5, 3):
        assert one_warning(caplog, "skipped") == (
            f"warning: skipped 2 of 13 image files in '{tmp_path}': 1 near-uniform (pixel std < 8) "
            "(blank.png), 1 unreadable (corrupt.png)"
        )
    assert train.captions is None and train.draw_frame(0, 0).shape == (4 * V, 4 * V, 3)


def test_procedural_task_sets_unchanged():
    """Pinned with the code before slides existed (as tests/test_envs.py pins older code)."""
    train, test = make_task_sets(6, 3, view_size=16, seed=3, targets_per_image=2)
    assert (task_set_digest(train), task_set_digest(test)) == PROCEDURAL_DIGESTS
    assert train.captions is None


PROCEDURAL_DIGESTS = ("392e26d2bb2a60b7", "3ce7bb620712dc0e")  # computed with f8a5da3
