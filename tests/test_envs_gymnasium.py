"""The patch-localization env the gymnasium way, and task sets from
image folders as people have them.

gymnasium.make / make_vec / check_env (render included), several targets per image with
held-out images kept apart, folders with tiny, corrupt, huge, TIFF and nested files, the
progress bar, and the default image size.
"""

import io
import logging
import re
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import tifffile
from gymnasium.utils.env_checker import check_env
from PIL import Image

import envs
import envs.images
import envs.patchloc
from envs import (
    ENV_ID,
    PatchLocConfigError,
    PatchLocEnv,
    PatchLocVecEnv,
    make_task_set,
    make_task_sets,
    procedural_image,
)
from envs.images import UnusableImage, load_image
from envs.lattice import optimal_returns

V = 16  # small views keep the tests fast; image_size defaults to 4V = 64


def assert_same_tasks(a, b):
    for z in range(3):
        np.testing.assert_array_equal(a.levels[z], b.levels[z])
    np.testing.assert_array_equal(a.target_states, b.target_states)
    np.testing.assert_array_equal(a.task_images, b.task_images)
    assert a.image_ids == b.image_ids and a.split == b.split


def textured(side, seed, block=1):
    """A (side, side, 3) image with structure at every scale; block > 1 makes it out of flat block x
    block squares (compresses to little, for huge test files)."""
    small = procedural_image(np.random.default_rng(seed), -(-side // block))
    return np.repeat(np.repeat(small, block, axis=0), block, axis=1)[:side, :side]


def save(folder, name, array, **kwargs):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".tif", ".tiff"):
        tifffile.imwrite(
            path, array, **{"photometric": "rgb" if array.ndim == 3 else "minisblack", **kwargs}
        )
    else:
        Image.fromarray(array).save(path, **kwargs)
    return path


# --------------------------------------------------------------------------------------------------
# gymnasium.make, make_vec, check_env
# --------------------------------------------------------------------------------------------------
def test_make_and_make_vec_with_defaults():
    assert gym.spec(ENV_ID).vector_entry_point == "envs.patchloc:PatchLocVecEnv"
    env = gym.make(ENV_ID)  # procedural images, 64 training tasks, 112-px views (the paper's)
    task_set = env.unwrapped.task_set
    assert (task_set.split, task_set.num_tasks, task_set.view_size, task_set.image_size) == (
        "train",
        64,
        112,
        448,
    )
    obs, info = env.reset(seed=0)
    assert obs.shape == (3, 112, 112, 3) and obs.dtype == np.uint8 and 0 <= info["task_id"] < 64
    obs, reward, terminated, truncated, info = env.step(envs.ZOOM_IN)
    assert env.observation_space.contains(obs) and isinstance(reward, float)

    vec = gym.make_vec(ENV_ID, num_envs=3)  # the native vector env, not 3 copies of the single one
    assert isinstance(vec, PatchLocVecEnv) and vec.num_envs == 3
    obs, infos = vec.reset(seed=0)
    assert obs.shape == (3, 3, 112, 112, 3)
    assert_same_tasks(vec.task_set, task_set)  # same defaults, same tasks
    vec.step(np.full(3, envs.ZOOM_IN))


def test_make_settings_are_make_task_sets_arguments():
    train, test = make_task_sets(5, 3, view_size=V, seed=3, targets_per_image=2)
    kwargs = dict(num_tasks=5, num_test_tasks=3, view_size=V, seed=3, targets_per_image=2)
    assert_same_tasks(gym.make(ENV_ID, **kwargs).unwrapped.task_set, train)
    assert_same_tasks(gym.make(ENV_ID, split="test", **kwargs).unwrapped.task_set, test)
    assert_same_tasks(gym.make_vec(ENV_ID, num_envs=2, split="test", **kwargs).task_set, test)
    # Or a task set made beforehand
    assert gym.make(ENV_ID, task_set=test).unwrapped.task_set is test
    env = gym.make(ENV_ID, task_set=test, max_steps=7)  # episode settings pass through
    assert env.unwrapped.config.max_steps == 7
    assert PatchLocEnv(view_size=V, num_tasks=2).task_set.num_tasks == 2  # no task set needed
    with pytest.raises(PatchLocConfigError, match="either a task_set or task-set settings"):
        PatchLocEnv(train, num_tasks=3)
    with pytest.raises(PatchLocConfigError, match="split must be 'train' or 'test'"):
        make_task_set("validation", view_size=V)
    with pytest.raises(PatchLocConfigError, match="render_mode must be None or one of"):
        PatchLocVecEnv(train, 2, render_mode="human")


def test_make_and_make_vec_with_a_folder(tmp_path):
    # 8 ordinary photos of mixed sizes and formats make 48 training + 16 held-out
    # tasks (8 targets per image).
    sizes = [
        (100, 80),
        (90, 130),
        (64, 64),
        (200, 120),
        (77, 96),
        (150, 150),
        (640, 427),
        (300, 300),
    ]
    for i, (w, h) in enumerate(sizes):
        save(
            tmp_path,
            f"photo{i}.{['jpg', 'png', 'tif'][i % 3]}",
            textured(max(w, h), 100 + i)[:h, :w],
        )
    kwargs = dict(
        image_source=tmp_path,
        num_tasks=48,
        num_test_tasks=16,
        targets_per_image=8,
        view_size=V,
        seed=1,
    )
    env = gym.make(ENV_ID, **kwargs)
    train = env.unwrapped.task_set
    assert (train.num_tasks, train.num_images) == (48, 6)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, V, V, 3)
    vec = gym.make_vec(ENV_ID, num_envs=4, split="test", **kwargs)
    assert (vec.task_set.num_tasks, vec.task_set.num_images) == (16, 2)
    # Held-out images stay held out
    assert not set(train.image_names) & set(vec.task_set.image_names)
    assert len(set(train.image_names) | set(vec.task_set.image_names)) == 8
    vec.reset(seed=0)
    vec.step(np.zeros(4, dtype=np.int64))


def test_check_env_and_render():
    env = gym.make(ENV_ID, num_tasks=6, view_size=V, render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)  # render checks included
    assert not [str(w.message) for w in caught]

    task_set = env.unwrapped.task_set
    # A target away from the image border
    task = next(i for i in range(6) if (task_set.targets[i, 1:] > 0).all())
    env.reset(seed=0, options={"task_id": task})
    frame = env.render()
    side = 4 * V
    assert frame.shape == (side, side, 3) and frame.dtype == np.uint8
    window_colour = task_set.outline_colours[task]
    # The window: whole image
    np.testing.assert_array_equal(frame[0, :], np.broadcast_to(window_colour, (side, 3)))
    y0, x0, y1, x1 = np.round(task_set.target_boxes[task] * side).astype(int)
    top_edge = frame[y0, x0:x1]
    assert (top_edge == top_edge[0]).all() and not (
        top_edge[0] == window_colour
    ).all()  # target: another colour
    inside = (slice(y0 + 1, y1 - 1), slice(x0 + 1, x1 - 1))
    # The image itself, unchanged
    np.testing.assert_array_equal(frame[inside], task_set.image(task)[inside])
    for action in env.unwrapped.optimal_actions(task)[:-1]:
        env.step(action)
    wy0, wx0, wy1, wx1 = np.round(env.unwrapped.window_box * side).astype(int)
    np.testing.assert_array_equal(
        env.render()[wy0, wx0:wx1], np.broadcast_to(window_colour, (wx1 - wx0, 3))
    )

    vec = gym.make_vec(ENV_ID, num_envs=2, num_tasks=6, view_size=V, render_mode="rgb_array")
    vec.reset(seed=0)
    frames = vec.render()
    assert len(frames) == 2 and all(f.shape == (side, side, 3) for f in frames)
    np.testing.assert_array_equal(frames[1], task_set.draw_frame(vec.tasks[1], 0))


# --------------------------------------------------------------------------------------------------
# Several targets per image
# --------------------------------------------------------------------------------------------------
def test_several_targets_per_image_procedural():
    k = 4
    train, test = make_task_sets(10, 5, view_size=V, seed=1, targets_per_image=k)
    assert (train.num_images, test.num_images) == (3, 2)  # ceil(10 / 4), ceil(5 / 4)
    np.testing.assert_array_equal(train.task_images, np.arange(10) // k)
    assert train.nbytes == 3 * 21 * V * V * 3  # pyramids stored once per image
    for task_set in (train, test):
        for image in range(task_set.num_images):
            states = task_set.target_states[task_set.task_images == image]
            assert len(set(states)) == len(states)  # distinct targets on one image
    assert len(set(train.image_ids)) == 3 and not set(train.image_ids) & set(test.image_ids)
    # Image i and the first target on it are those of one target per image; task i
    # does not depend on the counts.
    one, _ = make_task_sets(3, 1, view_size=V, seed=1)
    np.testing.assert_array_equal(train.levels[2], one.levels[2])
    np.testing.assert_array_equal(train.target_states[::k], one.target_states)
    fewer, _ = make_task_sets(6, 1, view_size=V, seed=1, targets_per_image=k)
    np.testing.assert_array_equal(fewer.target_states, train.target_states[:6])
    # Exact optimal returns per task, reached by the oracle on the shared image.
    np.testing.assert_array_equal(train.optimal_returns(), optimal_returns(train.target_states))
    env = PatchLocEnv(train)
    for task in range(k):
        env.reset(options={"task_id": task})
        total = sum(env.step(a)[1] for a in env.optimal_actions(task))
        assert total == pytest.approx(train.optimal_returns()[task], abs=1e-9)
    # Zooms stay mixed with several targets per image.
    many, _ = make_task_sets(320, 1, view_size=V, seed=0, targets_per_image=8)
    assert 0.3 < (many.targets[:, 0] == 1).mean() < 0.7
    with pytest.raises(PatchLocConfigError, match="targets_per_image must be <= 25"):
        make_task_sets(2, 1, view_size=V, target_zooms=(1,), targets_per_image=26)


# --------------------------------------------------------------------------------------------------
# Folders as people have them
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Usable: 8 images (huge tiled TIFFs, deflate and scanner-style JPEG, striped TIFF, grey TIFF,
    nested JPEG, .PNG, RGBA and palette PNGs); skipped: 2 unreadable, 2 too small, 1 near-uniform;
    ignored: a hidden file and a text file."""
    folder = tmp_path_factory.mktemp("slides")
    # 6,000 x 6,000 in flat 100-px squares: ~1 MB as deflate TIFF
    huge = textured(6000, 1, block=100)
    usable = [
        save(folder, "huge.tif", huge, tile=(512, 512), compression="zlib", photometric="rgb"),
        save(
            folder, "scanner/huge_jpeg.tif", huge, tile=(512, 512), compression="jpeg"
        ),  # stored as YCbCr
        save(
            folder,
            "strips.tiff",
            textured(300, 2)[:, :250],
            rowsperstrip=16,
            compression="zlib",
            photometric="rgb",
        ),
        save(
            folder,
            "grey.tif",
            textured(120, 3)[..., 1],
            compression="zlib",
            photometric="minisblack",
        ),
        save(folder, "case_a/patient_1/tile.jpeg", textured(200, 4), quality=90),
        save(folder, "case_b/TILE.PNG", textured(90, 5)),
        save(folder, "rgba.png", np.dstack([textured(100, 6), np.full((100, 100), 200, np.uint8)])),
    ]
    palette = Image.fromarray(textured(128, 7)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(folder / "case_b" / "palette.png")
    usable.append(folder / "case_b" / "palette.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = save(folder, "case_a/truncated.jpg", textured(256, 8), quality=90)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    save(folder, "tiny.png", textured(32, 9))
    save(folder, "case_a/thin.tif", textured(200, 10)[:40], compression="zlib", photometric="rgb")
    save(folder, "blank.png", np.full((300, 300, 3), 236, np.uint8))  # a background tile
    (folder / "case_a" / "._tile.jpeg").write_bytes(b"macOS resource fork")  # hidden: never listed
    (folder / "notes.txt").write_text("scanner settings")
    return folder, huge, sorted(str(p) for p in usable)


def test_mixed_folder_skips_unusable_images_with_one_warning_line(mixed_folder, caplog):
    folder, huge, usable = mixed_folder
    with caplog.at_level(logging.WARNING, logger="envs"):
        # image_size None: 4V
        train, test = make_task_sets(6, 2, image_source=folder, view_size=V, seed=0)
    assert train.image_size == test.image_size == 4 * V
    # Every usable image used, in subfolders too
    assert sorted(train.image_names + test.image_names) == usable
    # Files after the last one needed are not opened: the line counts and
    # names those that were, by reason.
    [record] = caplog.records
    line = record.getMessage()
    unusable = {
        "unreadable": {"corrupt.jpg", "case_a/truncated.jpg"},
        "smaller than 64 px": {"tiny.png", "case_a/thin.tif"},
    }
    unusable["near-uniform (pixel std < 8)"] = {"blank.png"}
    counts = re.findall(r"(\d+) (.+?) \(([^()]*)\)(?:, |$)", line.split("': ", 1)[1])
    assert "\n" not in line and line.startswith(
        f"warning: skipped {sum(int(c) for c, _, _ in counts)} of 13 image files"
    )
    assert counts and all(
        set(names.split(", ")) <= unusable[reason] for _, reason, names in counts
    ), line
    # The huge TIFF was area-averaged tile by tile while decoding: the same as
    # Pillow's reduce of the whole image.
    task_set = train if str(folder / "huge.tif") in train.image_names else test
    image = task_set.image_names.index(str(folder / "huge.tif"))
    factor = 6000 // (4 * V)
    reduced = Image.fromarray(huge).reduce(
        factor, box=(0, 0, 6000 // factor * factor, 6000 // factor * factor)
    )
    ref = np.asarray(reduced.resize((4 * V, 4 * V), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(task_set.levels[2][image] - ref).max() <= 1
    # Too few usable images: the error says how many are needed and how many were usable.
    with pytest.raises(PatchLocConfigError) as err:
        make_task_sets(7, 2, image_source=folder, view_size=V, seed=0)
    msg = str(err.value)
    assert (
        "\n" not in msg
        and "has 8 usable images but 9 are needed (7 for 7 training tasks + 2 for 2 held-out" in msg
    )
    # All 13 files were opened: every unusable one is counted, by reason, most frequent first.
    assert msg.endswith(
        "; skipped 2 smaller than 64 px (case_a/thin.tif, tiny.png), 2 unreadable "
        "(case_a/truncated.jpg, corrupt.jpg), 1 near-uniform (pixel std < 8) (blank.png); add "
        "images, raise targets_per_image (--targets-per-image), lower image_size or ask for fewer "
        "tasks"
    )


def test_folder_held_out_images_do_not_depend_on_training_count(mixed_folder):
    folder, _, _ = mixed_folder
    _, test = make_task_sets(6, 2, image_source=folder, view_size=V, seed=0)
    fewer, test_again = make_task_sets(1, 2, image_source=folder, view_size=V, seed=0)
    assert_same_tasks(test_again, test)
    assert_same_tasks(make_task_set("test", 3, 2, image_source=folder, view_size=V, seed=0), test)


@pytest.mark.parametrize("name", ["huge.tif", "scanner/huge_jpeg.tif"])
def test_huge_tiff_is_never_held_at_full_resolution(mixed_folder, repo_root, name):
    folder, huge, _ = mixed_folder
    # A fresh process reads the image twice (the first time imports the codecs), resetting its peak
    # resident memory before the second: the peak then grows by what reading needs, whoever
    # allocates it (Pillow: the whole image).
    code = (
        "import sys; from pathlib import Path; from envs.images import load_image\n"
        "def kib(field):\n"
        "    status = open('/proc/self/status')\n"
        "    return int(next(l.split()[1] for l in status if l.startswith(field)))\n"
        "load_image(Path(sys.argv[1]), 64, 64)\n"
        "open('/proc/self/clear_refs', 'w').write('5'); before = kib('VmRSS:')\n"
        "top = load_image(Path(sys.argv[1]), 64, 64); print(top.shape, kib('VmHWM:') - before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder / name)],
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    shape, grown_kib = out.stdout.rsplit(" ", 1)
    assert shape == "(64, 64, 3)", out.stderr
    assert int(grown_kib) * 1024 < huge.nbytes / 4, (
        f"peak grew by {int(grown_kib) / 1024:.0f} MiB for a {huge.nbytes >> 20} MiB image"
    )


def test_pyramidal_tiff_is_read_from_the_smallest_level_large_enough(tmp_path):
    # Whole-slide TIFFs carry reduced copies (sub-IFDs); each level here is filled with its
    # own grey, to tell them apart.
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            np.full((1024, 1024, 3), 100, np.uint8),
            tile=(256, 256),
            compression="zlib",
            subifds=2,
            photometric="rgb",
        )
        for side, grey in ((512, 50), (256, 150)):
            tif.write(
                np.full((side, side, 3), grey, np.uint8),
                tile=(256, 256),
                compression="zlib",
                subfiletype=1,
                photometric="rgb",
            )
    assert [load_image(path, size, size).mean() for size in (200, 300, 600)] == [150, 50, 100]


def test_huge_images_pass_the_decompression_bomb_check_and_jpegs_decode_reduced(
    tmp_path, monkeypatch
):
    # Stands for Pillow's limit (89 M pixels): 800 K is "huge"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    jpeg = save(tmp_path, "slide.jpg", textured(1000, 11)[:800], quality=90)
    png = save(tmp_path, "slide.png", textured(1000, 12)[:800])
    with pytest.raises(Image.DecompressionBombError):
        Image.open(jpeg)
    assert load_image(jpeg, 64, 64).shape == load_image(png, 64, 64).shape == (64, 64, 3)
    assert Image.MAX_IMAGE_PIXELS == 100_000  # lifted only while reading
    # What is decoded is bounded instead: the JPEG at 1/8 scale (125 x 100) fits, the
    # PNG (decoded whole) does not.
    monkeypatch.setattr(envs.images, "MAX_DECODED_PIXELS", 50_000)
    assert load_image(jpeg, 64, 64).shape == (64, 64, 3)
    with pytest.raises(UnusableImage, match="too large to decode"):
        load_image(png, 64, 64)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(envs.patchloc, "_PROGRESS_DELAY_S", 0.0)  # as if the build were slow
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        make_task_sets(3, 2, view_size=V, seed=0)
        assert ("patch-loc task images" in stream.getvalue()) == shown
        assert (" 5/5 " in stream.getvalue()) == shown
