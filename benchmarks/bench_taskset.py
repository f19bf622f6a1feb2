"""Task-set build time and peak memory for a folder of large images (what a researcher's slide
tiles look like).

Writes --num-images synthetic tissue-like images (H&E-like stain colours: pale background, pink
stroma, purple nuclei) of --image-side pixels into a temp folder, once per format, then builds
make_task_sets over each folder in a fresh process pinned to one core, and reports seconds per image
and per task and how much the process's peak resident memory grew during the build (against the size
of one full-resolution image).

    python benchmarks/bench_taskset.py     # 8 images of 8,000 x 8,000, ~3 minutes
    python benchmarks/bench_taskset.py --formats tiff-jpeg --image-side 20000 --num-images 2

Formats: tiff-jpeg (tiled 512 x 512, JPEG q90: how scanners write slides), tiff-deflate (tiled,
lossless), tiff-lzw (strips of 64 rows), jpeg (q90), png (the one format decoded whole); procedural
(the built-in generator at 4V, no files: the reference).
"""

import argparse
import importlib
import json
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
}


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


def write_folders(root, formats, num_images, side, seed):
    folders = {name: "procedural" if name == "procedural" else root / name for name in formats}
    files = [name for name in formats if name != "procedural"]
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


def measure(folder, num_train, num_test, view_size, targets_per_image):
    """In this (fresh) process: build the task sets; seconds, peak-RSS growth over
    the RSS before, files' bytes."""
    os.sched_setaffinity(0, {0})
    # tifffile imports its codecs on first use: imported here, not part of what reading needs
    importlib.import_module("imagecodecs")

    with open("/proc/self/clear_refs", "w") as clear_refs:
        # Reset the peak (VmHWM) to the current RSS: imports' transient peaks do not count
        clear_refs.write("5")
    before = status_kib("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    train, test = make_task_sets(
        num_train, num_test, folder, None, view_size, seed=0, targets_per_image=targets_per_image
    )
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
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--image-side", type=int, default=8000)
    parser.add_argument("--view-size", type=int, default=112)
    parser.add_argument("--targets-per-image", type=int, default=16)
    parser.add_argument("--num-test-images", type=int, default=2, help="of --num-images, held out")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child process's folder
    args = parser.parse_args()
    k = args.targets_per_image
    num_train, num_test = (args.num_images - args.num_test_images) * k, args.num_test_images * k
    if args.measure:
        print(json.dumps(measure(args.measure, num_train, num_test, args.view_size, k)))
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

    print(
        f"# {date.today()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__},"
    )
    print(
        f"# Pillow {PIL.__version__}, tifffile {tifffile.__version__}, imagecodecs "
        f"{imagecodecs.__version__}"
    )
    print(
        f"# {args.num_images} images of {args.image_side} x {args.image_side}, view "
        f"{args.view_size}, image_size None ->"
    )
    print(
        f"# {4 * args.view_size}, {k} targets per image ({num_train} + {num_test} tasks); one core "
        "per build"
    )
    full_bytes = args.image_side**2 * 3
    with tempfile.TemporaryDirectory(prefix="bench_taskset_") as tmp:
        start = time.perf_counter()
        folders = write_folders(Path(tmp), args.formats, args.num_images, args.image_side, seed=0)
        print(
            f"# images written in {time.perf_counter() - start:.0f} s; one full-resolution image: "
            f"{full_bytes / 2**20:.0f} MiB"
        )
        print(
            "| format | files (MiB) | wall (s) | CPU (s) | CPU s / image | CPU ms / task | peak "
            "RSS growth (MiB) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, folder in folders.items():
            child = [sys.executable, __file__, "--measure", str(folder), *sys.argv[1:]]
            result = subprocess.run(child, capture_output=True, text=True, check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            cpu = r["cpu_seconds"]
            print(
                f"| {name} | {r['file_bytes'] / 2**20:.0f} | {r['seconds']:.1f} | {cpu:.1f} | "
                f"{cpu / r['images']:.2f} "
                f"| {1000 * cpu / r['tasks']:.0f} | {r['peak_rss_growth'] / 2**20:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
