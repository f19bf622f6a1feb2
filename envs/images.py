"""Image sources for the patch-localization task, and the per-task image pyramid.

Every source yields one square uint8 image of side 4V per task (V = view size), the finest pyramid
level: a zoom-2 window (a quarter of the image side) is then exactly V pixels wide. The two coarser
levels are 2x2 and 4x4 area averages of it, so every view at every zoom is a V x V slice.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class PatchLocConfigError(ValueError):
    """A bad setting or input file; the message is one line saying what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------
# Pyramid
# ----------------------------------------------------------------------------------------------------
def build_pyramid(top: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(4V, 4V, 3) uint8 -> levels (V, 2V, 4V sides), each level the previous one at half resolution."""
    levels = [top]
    for _ in range(2):
        a = levels[-1].astype(np.uint16)
        # 2x2 area average (rounded): an anti-aliased downsample, exact for a power-of-two pyramid.
        total = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
        levels.append(((total + 2) // 4).astype(np.uint8))
    return levels[2], levels[1], levels[0]


# ----------------------------------------------------------------------------------------------------
# Procedural images
# ----------------------------------------------------------------------------------------------------
def _upsample(grid: np.ndarray, side: int) -> np.ndarray:
    """Bilinear upsampling of a small (g, g, C) grid to (side, side, C) float32: a smooth field."""
    g = grid.shape[0]
    pos = np.linspace(0.0, g - 1.0, side)
    i0 = np.minimum(pos.astype(np.int64), g - 2)
    weights = np.zeros((side, g), dtype=np.float32)  # separable: out = W @ grid @ W.T, per channel
    weights[np.arange(side), i0] = 1.0 - (pos - i0)
    weights[np.arange(side), i0 + 1] = pos - i0
    rows = np.tensordot(weights, grid.astype(np.float32), axes=(1, 0))  # (side, g, C)
    return np.matmul(weights, rows)  # (side, side, C), batched over the output rows


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random fairly saturated colour in [0, 1]^3 (random hue, varied value)."""
    hue = rng.uniform(0.0, 6.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue) % 6.0
    pure = 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)  # HSV -> RGB at full saturation
    sat, val = rng.uniform(0.4, 1.0), rng.uniform(0.25, 1.0)
    return val * (1.0 - sat + sat * pure)


def procedural_image(rng: np.random.Generator, side: int) -> np.ndarray:
    """A (side, side, 3) uint8 image with structure at several scales, generated directly at this side.

    A smooth colour background plus mid-frequency value noise (so no region is uniform), covered by
    random ellipses, rectangles, rings and striped shapes whose sizes span 1/50 to 1/4 of the image
    (so every window, at every zoom, contains distinctive content that a policy can match by looking).
    """
    img = _upsample(rng.uniform(0.1, 0.9, (4, 4, 3)), side)
    img += _upsample(rng.uniform(-0.12, 0.12, (12, 12, 3)), side)
    num_shapes = 70
    # Log-uniform radii, sorted descending so that small shapes are drawn on top of large ones.
    radii = np.sort(np.exp(rng.uniform(np.log(side / 50), np.log(side / 8), num_shapes)))[::-1]
    for radius in radii:
        cy, cx = rng.uniform(0, side, 2)
        r = int(np.ceil(radius * 1.5))
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, side)
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, side)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(theta) + (xx - cx) * np.sin(theta)  # shape-local rotated coordinates
        v = -(yy - cy) * np.sin(theta) + (xx - cx) * np.cos(theta)
        aspect = rng.uniform(0.4, 1.0)
        kind = rng.integers(4)
        if kind == 0:  # ellipse
            mask = (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1.0
        elif kind == 1:  # rectangle
            mask = (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)
        elif kind == 2:  # ring
            d = np.sqrt(u**2 + v**2)
            mask = (d <= radius) & (d >= radius * rng.uniform(0.4, 0.8))
        else:  # striped ellipse: a texture, not a flat fill
            mask = (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1.0
            mask &= np.sin(u * (2 * np.pi / max(radius * rng.uniform(0.2, 0.5), 2.0))) > 0
        alpha = rng.uniform(0.75, 1.0)
        region = img[y0:y1, x0:x1]
        region[mask] = (1.0 - alpha) * region[mask] + alpha * _random_colour(rng)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------
def list_image_files(folder: "os.PathLike[str] | str") -> list[Path]:
    """Sorted .jpg/.jpeg/.png files of a folder (not recursive); raises if the folder is missing or has none."""
    path = Path(folder)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise PatchLocConfigError(
            f"image folder '{path}' {what}; pass a folder of .jpg/.jpeg/.png images, or 'procedural' for built-in images"
        )
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PatchLocConfigError(f"image folder '{path}' contains no .jpg/.jpeg/.png files; add images or use 'procedural'")
    return files


def load_image(file: Path, image_size: int, side: int) -> np.ndarray:
    """Read an image, center-crop it to a square, resize it to image_size, then to `side` (the top pyramid level).

    The intermediate image_size step fixes the task's nominal resolution (an image is never upsampled);
    only the (side, side, 3) result is kept.
    """
    try:
        with Image.open(file) as im:
            width, height = im.size
            if min(width, height) < image_size:
                raise PatchLocConfigError(
                    f"image '{file}' is {width}x{height} pixels; its shorter side must be at least image_size={image_size} "
                    "(lower --image-size or remove the image)"
                )
            im.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale >= image_size (fast)
            im = im.convert("RGB")
            w, h = im.size
            crop = min(w, h)
            left, top = (w - crop) // 2, (h - crop) // 2
            im = im.resize((image_size, image_size), Image.Resampling.LANCZOS, box=(left, top, left + crop, top + crop))
            if image_size != side:
                im = im.resize((side, side), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except PatchLocConfigError:
        raise
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PatchLocConfigError(f"cannot read image file '{file}': {reason}; remove or replace it") from None


def split_files(files: Sequence[Path], num_train: int, num_test: int, rng: np.random.Generator) -> tuple[list, list]:
    """Disjoint train / held-out file lists, one image per task.

    Train takes the start of a seeded permutation and held-out the end, so the held-out set does not
    change when only the number of training tasks changes.
    """
    if len(files) < num_train + num_test:
        raise PatchLocConfigError(
            f"image folder '{files[0].parent}' has {len(files)} images but {num_train + num_test} are needed "
            f"({num_train} train + {num_test} held-out tasks, one image each); add images or ask for fewer tasks"
        )
    order = rng.permutation(len(files))
    return [files[i] for i in order[:num_train]], [files[i] for i in order[len(files) - num_test :]]
