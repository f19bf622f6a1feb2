"""Task-set build time and peak memory for a folder of large images or whole-slide images (what a
researcher's slide tiles and slides look like).

Writes --num-images synthetic tissue-like images (H&E-like stain colours: pale background, pink
stroma, purple nuclei) of --image-side pixels into a temp folder, once per format, then builds
make_task_sets over each folder in a fresh process pinned to one core, and reports seconds per image
and per task and how much the process's peak resident memory grew during the build (against the size
of one full-resolution image).

    python benchmarks/bench_taskset.py     # 8 images of 8,000 x 8,000, ~3 minutes
    python benchmarks/bench_taskset.py --formats tiff-jpeg --image-side 20000 --num-images 2
    # 1,024 tasks from 8 slides of 40,000 x 40,000 (6 training, 2 held out; 32 regions x 4 targets
    # each); writing the slides takes minutes and ~2 GB of disk (--workdir keeps them for a rerun)
    python benchmarks/bench_taskset.py --formats slide-svs --image-side 40000 --num-images 8 \
        --num-test-images 2 --regions-per-slide 32 --targets-per-image 4

Formats: tiff-jpeg (tiled 512 x 512, JPEG q90: how scanners write slides), tiff-deflate (tiled,
lossless), tiff-lzw (strips of 64 rows), jpeg (q90), png (the one format decoded whole); procedural
(the built-in generator at 4V, no files: the reference); slide-svs (not in the default set): an
Aperio-style pyramidal .svs per image, JPEG tiles of 512 x 512, levels at downsamples 1, 4, 16...
down to under 1,024 pixels, --slide-level0-mpp in its description, drawn tile by tile (never held
whole) and read as slides (regions of tissue at --slide-mpp, envs/slides.py).
"""

import argparse
import importlib
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import PIL
import tifffile
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from envs import make_task_sets

FORMATS = {
    "tiff-jpeg": ("tif", dict(tile=(512, 512), compression="jpeg", compressionargs={"level": 90})),
    "tiff-deflate": ("tif", dict(tile=(512, 512), compression="zlib")),
    "tiff-lzw": ("tif", dict(rowsperstrip=64, compression="lzw")),
    "jpeg": ("jpg", dict(quality=90)),
    "png": ("png", dict(compress_level=1)),
    "procedural": (None, None),
    "slide-svs": ("svs", None),
}
IMAGE_FORMATS = [name for name in FORMATS if name != "slide-svs"]  # the default set
SLIDE_TILE = 512


def smooth_field(rng, side, cells):
    """A smooth random uint8 field of side x side: a cells x cells random
    grid, bicubic-upsampled (in C)."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((side, side), Image.Resampling.BICUBIC))


def tissue_image(rng, side):
    """(side, side, 3) uint8: tissue islands of pink stroma dotted with purple nuclei
    (~side/600 px) on pale glass."""
    islands, texture = smooth_field(rng, side, 6), smooth_field(rng, side, side // 40)
    dots = np.zeros((side // 8, side // 8), np.uint8)  # nuclei drawn at 1/8 scale, then blurred up
    dots.flat[rng.integers(dots.size, size=dots.size // 25)] = 255
    nuclei = np.asarray(Image.fromarray(dots).resize((side, side), Image.Resampling.BICUBIC))
    glass, stroma, nucleus = (
        np.array(c, np.float32) for c in ((242, 238, 244), (228, 150, 190), (90, 50, 135))
    )
    image = np.empty((side, side, 3), np.uint8)
    for y in range(0, side, 256):  # in bands: small temporaries, a few seconds for 8,000 x 8,000
        rows = slice(y, y + 256)
        # Soft-edged islands
        tissue = np.clip((islands[rows, :, None] / np.float32(255) - 0.4) * 8.0, 0.0, 1.0)
        dark = np.clip(nuclei[rows, :, None] / np.float32(120), 0.0, 1.0)
        stained = (
            stroma * (0.8 + 0.35 / 255 * texture[rows, :, None]) * (1.0 - dark) + nucleus * dark
        )
        image[rows] = np.clip(glass * (1.0 - tissue) + stained * tissue, 0, 255)
    return image


def slide_tiles(seed, side, downsample):
    """The 512 x 512 tiles (row-major, edges padded) of one pyramid level of a synthetic
    slide, drawn at the level's own resolution from fields defined in level-0 pixels (so
    levels agree and no level is ever held whole): soft-edged tissue islands (a fifth to a third
    of the slide) of pink stroma with purple nuclei (8 pixels across, in one of three 16-pixel
    cells) on pale glass, plus noise."""
    grid = np.random.default_rng([seed, 0]).random((9, 9))
    level = np.quantile(grid, 0.6)  # tissue where the field is above: a fifth to a third of a slide
    glass, stroma, nucleus = (
        np.array(c, np.float32) for c in ((242, 238, 244), (228, 150, 190), (90, 50, 135))
    )

    def islands(y, x):  # bilinear interpolation of the grid, spread over the slide (arrays)
        gy, gx = np.minimum(y / side * 8, 7.999), np.minimum(x / side * 8, 7.999)
        iy, ix = gy.astype(np.int64), gx.astype(np.int64)
        fy, fx = gy - iy, gx - ix
        top = grid[iy, ix] * (1 - fx) + grid[iy, ix + 1] * fx
        return top * (1 - fy) + (grid[iy + 1, ix] * (1 - fx) + grid[iy + 1, ix + 1] * fx) * fy

    def stain(y0, x0):  # a tile of tissue at (y0, x0), level-0 pixels
        y = y0 + (np.arange(SLIDE_TILE) + 0.5) * downsample
        x = x0 + (np.arange(SLIDE_TILE) + 0.5) * downsample
        cells = (y // 16).astype(np.int64)[:, None] * 73856093 ^ (
            (x // 16).astype(np.int64)[None, :] * 19349663
        )
        near = ((y % 16 - 8) ** 2)[:, None] + ((x % 16 - 8) ** 2)[None, :] < 16
        dark = ((cells % 1000 < 333) & near)[..., None]
        texture = 0.85 + 0.15 * np.outer(np.sin(y / 29.0), np.cos(x / 23.0)).astype(np.float32)
        return np.where(dark, nucleus, stroma * texture[..., None]) - glass

    # Eight tiles of tissue drawn once and reused (hashed by position): writing stays fast.
    stains = [stain(i * 7919 * downsample, i * 104729 * downsample) for i in range(8)]
    n = side // downsample
    coarse = np.linspace(0, SLIDE_TILE, 17)  # the field on every 32nd pixel of a tile...
    # ... interpolated linearly in between (it is smooth at that scale): field = W @ points @ W.T
    weights = np.stack(
        [np.interp(np.arange(SLIDE_TILE) + 0.5, coarse, unit) for unit in np.eye(17)], axis=1
    )
    for row in range(0, n, SLIDE_TILE):
        for col in range(0, n, SLIDE_TILE):
            y0, x0 = row * downsample, col * downsample
            points = islands(
                (y0 + coarse * downsample)[:, None], (x0 + coarse * downsample)[None, :]
            )
            noise = np.random.default_rng([seed, downsample, row, col]).integers(
                -3, 4, (SLIDE_TILE, SLIDE_TILE, 1), dtype=np.int16
            )
            if points.max() <= level:  # all glass
                yield np.clip(glass.astype(np.int16) + noise, 0, 255).astype(np.uint8)
                continue
            field = weights @ points @ weights.T
            tissue = np.clip((field - level) * 10.0, 0.0, 1.0).astype(np.float32)[..., None]
            pixels = glass + stains[(row * 31 + col * 17) // SLIDE_TILE % 8] * tissue + noise
            yield np.clip(pixels, 0, 255).astype(np.uint8)


def write_slide(path, seed, side, level0_mpp):
    """An Aperio-style pyramidal .svs (see the module docstring), written tile by tile."""
    downsamples = [4**i for i in range(8) if side // 4**i >= 1024 or i == 0]
    downsamples.append(downsamples[-1] * 4)
    description = (
        f"Aperio Image Library v12.0.15\r\n{side}x{side} [0,100 {side}x{side}] "
        f"({SLIDE_TILE}x{SLIDE_TILE}) JPEG/RGB Q=90|AppMag = 20|MPP = {level0_mpp}"
    )
    with tifffile.TiffWriter(path, bigtiff=side > 60000) as tif:
        for downsample in downsamples:
            n = side // downsample
            tif.write(
                slide_tiles(seed, side, downsample),
                shape=(n, n, 3),
                dtype=np.uint8,
                tile=(SLIDE_TILE, SLIDE_TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                description=description,
                metadata=None,
            )


def write_slides(folder, num_images, side, seed, level0_mpp, workers):
    """The slide-svs folder, slides written in parallel; slides already there (same name: side and
    seed in it) are kept, so that --workdir makes a rerun skip the writing."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(num_images):
        path = folder / f"slide{i:03d}_side{side}_seed{seed}.svs"
        if not path.exists():
            jobs.append((path.with_suffix(".partial"), [seed, i], side, level0_mpp))
    with multiprocessing.get_context("spawn").Pool(max(1, min(workers, len(jobs) or 1))) as pool:
        for done, path in enumerate(pool.imap_unordered(_write_slide_job, jobs), 1):
            os.replace(path, path.with_suffix(".svs"))
            print(f"  wrote slide {done}/{len(jobs)}", file=sys.stderr)
    return folder


def _write_slide_job(job):
    path, seed, side, level0_mpp = job
    write_slide(path, seed, side, level0_mpp)
    return path


def write_folders(root, formats, num_images, side, seed, level0_mpp, workers):
    folders = {name: "procedural" if name == "procedural" else root / name for name in formats}
    if "slide-svs" in formats:
        write_slides(folders["slide-svs"], num_images, side, seed, level0_mpp, workers)
    files = [name for name in formats if name not in ("procedural", "slide-svs")]
    for name in files:
        folders[name].mkdir(parents=True, exist_ok=True)
    for i in range(num_images if files else 0):
        image = tissue_image(np.random.default_rng([seed, i]), side)
        for name in files:
            suffix, options = FORMATS[name]
            path = folders[name] / f"slide{i:03d}.{suffix}"
            if suffix == "tif":
                tifffile.imwrite(path, image, photometric="rgb", **options)
            else:
                Image.fromarray(image).save(path, **options)
        print(f"  wrote image {i + 1}/{num_images}", file=sys.stderr)
    return folders


def status_kib(field):
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in KiB."""
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith(field + ":")))


def measure(folder, num_train, num_test, view_size, targets_per_image, slide_settings):
    """In this (fresh) process: build the task sets; seconds, peak-RSS growth over the RSS before,
    files' bytes."""
    os.sched_setaffinity(0, {0})
    # tifffile imports its codecs on first use: imported here, not part of what reading needs
    importlib.import_module("imagecodecs")

    with open("/proc/self/clear_refs", "w") as clear_refs:
        # Reset the peak (VmHWM) to the current RSS: imports' transient peaks do not count
        clear_refs.write("5")
    before = status_kib("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    train, test = make_task_sets(
        num_train,
        num_test,
        folder,
        None,
        view_size,
        seed=0,
        targets_per_image=targets_per_image,
        **slide_settings,
    )
    names = train.image_names + test.image_names
    return {
        "seconds": time.perf_counter() - start,
        # What a shared machine's load does not inflate
        "cpu_seconds": time.process_time() - start_cpu,
        "images": train.num_images + test.num_images,
        "tasks": train.num_tasks + test.num_tasks,
        "peak_rss_growth": (status_kib("VmHWM") - before) * 1024,
        "pyramids": train.nbytes + test.nbytes,
        "file_bytes": 0
        if folder == "procedural"
        else sum(f.stat().st_size for f in Path(folder).iterdir()),
        "files": 0 if folder == "procedural" else len({n.rsplit("@", 1)[0] for n in names}),
    }


def task_counts(args, name):
    """(training tasks, held-out tasks) for a format: targets per image, or per region x regions per
    slide for slides."""
    per_file = args.targets_per_image * (args.regions_per_slide if name == "slide-svs" else 1)
    return (args.num_images - args.num_test_images) * per_file, args.num_test_images * per_file


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", default=IMAGE_FORMATS, choices=list(FORMATS))
    parser.add_argument("--num-images", type=int, default=8, help="images (slides) per format")
    parser.add_argument("--image-side", type=int, default=8000, help="pixels (a slide's level 0)")
    parser.add_argument("--view-size", type=int, default=112)
    parser.add_argument("--targets-per-image", type=int, default=16, help="per image or region")
    parser.add_argument("--num-test-images", type=int, default=2, help="of --num-images, held out")
    parser.add_argument("--regions-per-slide", type=int, default=32, help="slide-svs")
    parser.add_argument("--slide-mpp", type=float, default=2.0, help="slide-svs: um/px of a region")
    parser.add_argument(
        "--slide-level0-mpp", type=float, default=0.5, help="slide-svs: um/px written (20x scan)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="write the files here and keep them (default: a temp folder)"
    )
    parser.add_argument(
        "--write-workers", type=int, default=os.cpu_count(), help="processes writing slides"
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child's folder
    parser.add_argument("--measure-format", help=argparse.SUPPRESS)  # ... and its format
    args = parser.parse_args()
    if args.measure:
        num_train, num_test = task_counts(args, args.measure_format)
        slides = args.measure_format == "slide-svs"
        settings = dict(slide_mpp=args.slide_mpp, regions_per_slide=args.regions_per_slide)
        result = measure(
            args.measure,
            num_train,
            num_test,
            args.view_size,
            args.targets_per_image,
            settings if slides else {},
        )
        print(json.dumps(result))
        return

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "?",
    )
    import imagecodecs  # only for the version line
    import openslide

    print(
        f"# {date.today()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__},"
    )
    print(
        f"# Pillow {PIL.__version__}, tifffile {tifffile.__version__}, imagecodecs "
        f"{imagecodecs.__version__}, OpenSlide {openslide.__library_version__}"
    )
    k = args.targets_per_image
    print(
        f"# {args.num_images} images of {args.image_side} x {args.image_side} "
        f"({args.num_test_images} held out), view {args.view_size}, image_size None -> "
        f"{4 * args.view_size}, {k} targets per image"
    )
    if "slide-svs" in args.formats:
        num_train, num_test = task_counts(args, "slide-svs")
        print(
            f"# slides: level 0 at {args.slide_level0_mpp:g} um/px, regions at {args.slide_mpp:g} "
            f"um/px, {args.regions_per_slide} regions x {k} targets per slide ({num_train} + "
            f"{num_test} tasks)"
        )
    print("# one core per build")
    full_bytes = args.image_side**2 * 3
    with tempfile.TemporaryDirectory(prefix="bench_taskset_") as tmp:
        root = args.workdir or Path(tmp)
        start = time.perf_counter()
        folders = write_folders(
            root,
            args.formats,
            args.num_images,
            args.image_side,
            0,
            args.slide_level0_mpp,
            args.write_workers,
        )
        print(
            f"# files written in {time.perf_counter() - start:.0f} s; one full-resolution image: "
            f"{full_bytes / 2**20:.0f} MiB"
        )
        print(
            "| format | files (MiB) | tasks | wall (s) | CPU (s) | CPU s / image | CPU ms / task | "
            "peak RSS growth (MiB) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, folder in folders.items():
            child = [sys.executable, __file__, *sys.argv[1:]]
            child += ["--measure", str(folder), "--measure-format", name]
            result = subprocess.run(child, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"{name}: the build failed: {result.stderr.strip().splitlines()[-1]}")
            r = json.loads(result.stdout.strip().splitlines()[-1])
            cpu = r["cpu_seconds"]
            images = r["files"] or r["images"]
            print(
                f"| {name} | {r['file_bytes'] / 2**20:.0f} | {r['tasks']} | {r['seconds']:.1f} | "
                f"{cpu:.1f} | {cpu / images:.2f} | {1000 * cpu / r['tasks']:.0f} | "
                f"{r['peak_rss_growth'] / 2**20:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
