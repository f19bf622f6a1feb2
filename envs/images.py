"""Image sources for the patch-localization task, and the per-image pyramid.

Sources: procedural images, image files, and regions of whole-slide images (envs/slides.py). Every
source yields one square uint8 image of side 4V per image (V = view size), the finest pyramid
level: a zoom-2 window (a quarter of the image side) is then exactly V pixels wide. The two coarser
levels are 2x2 and 4x4 area averages of it, so every view at every zoom is a V x V slice.
"""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import tifffile
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
# Whole-slide formats read with OpenSlide (envs/slides.py); a pyramidal .tif/.tiff is a slide too.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif")
_SUFFIX_LIST = "/".join(IMAGE_SUFFIXES)
_SOURCE_LIST = f"{_SUFFIX_LIST} images or {'/'.join(SLIDE_SUFFIXES)} slides"
# Formats decoded whole (PNG, and TIFF layouts tifffile does not reduce) are refused above
# this many pixels (1.6 GB as RGB): Pillow's own decompression-bomb limit is lifted for the
# large slide tiles people have.
MAX_DECODED_PIXELS = 2**29


class PatchLocConfigError(ValueError):
    """A bad setting or input file; the message is one line saying what
    is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------------
# Pyramid
# --------------------------------------------------------------------------------------------------
def build_pyramid(top: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(4V, 4V, 3) uint8 -> levels (V, 2V, 4V sides), each level the
    previous one at half resolution."""
    levels = [top]
    for _ in range(2):
        a = levels[-1].astype(np.uint16)
        # 2x2 area average (rounded): an anti-aliased downsample, exact for a power-of-two pyramid.
        total = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
        levels.append(((total + 2) // 4).astype(np.uint8))
    return levels[2], levels[1], levels[0]


# --------------------------------------------------------------------------------------------------
# Procedural images
# --------------------------------------------------------------------------------------------------
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
    """A (side, side, 3) uint8 image with structure at several scales,
    generated directly at this side.

    A smooth colour background plus mid-frequency value noise (so no region is uniform),
    covered by random ellipses, rectangles, rings and striped shapes whose sizes span 1/50
    to 1/4 of the image (so every window, at every zoom, contains distinctive content that
    a policy can match by looking).
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


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------
class UnusableImage(Exception):
    """An image file that cannot make a task; `reason` names the kind
    (the key of the skip summary)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def list_image_files(folder: "os.PathLike[str] | str") -> list[Path]:
    """Image and slide files (IMAGE_SUFFIXES, SLIDE_SUFFIXES, any case) of a folder and its
    subfolders, sorted by relative path.

    Hidden files and folders (names starting with '.', e.g. macOS '._photo.jpg' companions) are left
    out. Raises if the folder is missing or holds no such file.
    """
    path = Path(folder)
    # Path("") is the current folder: never what an empty --image-source meant
    if not str(folder).strip():
        raise PatchLocConfigError(
            "image_source is empty; pass a folder of images or slides, or 'procedural' for "
            "built-in images"
        )
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise PatchLocConfigError(
            f"image folder '{path}' {what}; pass a folder of {_SOURCE_LIST}, or 'procedural' for "
            "built-in images"
        )
    suffixes = IMAGE_SUFFIXES + SLIDE_SUFFIXES
    files = []
    # Data sets linked in as subfolders count too
    for root, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [
            Path(root, n)
            for n in names
            if not n.startswith(".") and Path(n).suffix.lower() in suffixes
        ]
    if not files:
        raise PatchLocConfigError(
            f"image folder '{path}' holds no {_SOURCE_LIST} (subfolders included); add images or "
            "slides"
        )
    return sorted(files, key=lambda f: f.relative_to(path).as_posix())


@contextmanager
def _huge_images_allowed():
    """Lift Pillow's decompression-bomb limit while a file is opened: large slide
    tiles are legitimate, and what is decoded is bounded by MAX_DECODED_PIXELS after
    JPEG draft scaling instead."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _square(im: Image.Image, image_size: int, side: int) -> np.ndarray:
    """Center square of `im`, box-reduced by an integer factor (if 2+), resized
    to image_size, then to side."""
    w, h = im.size
    crop = min(w, h)
    factor = crop // image_size
    left, top = (w - crop) // 2, (h - crop) // 2
    # Palette, 16-bit, CMYK, alpha...: averaging needs plain channels
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    # Area-average first: cheap and alias-free, and LANCZOS then works on a small image
    if factor >= 2:
        crop -= crop % factor
        im = im.reduce(factor, box=(left, top, left + crop, top + crop))
        left, top, crop = 0, 0, crop // factor
    im = im.convert("RGB")
    im = im.resize(
        (image_size, image_size), Image.Resampling.LANCZOS, box=(left, top, left + crop, top + crop)
    )
    if image_size != side:
        im = im.resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def _tiff_center_reduced(file: Path, image_size: int) -> Optional[Image.Image]:
    """The center square of an 8-bit RGB/grey TIFF, area-averaged by an integer factor while its
    strips or tiles are decoded one at a time (the full-resolution image is never held), from
    the smallest pyramid level that is still large enough. None for a layout this does not
    handle (Pillow reads those)."""
    with tifffile.TiffFile(file) as tif:
        levels = sorted(
            (level.keyframe for level in tif.series[0].levels),
            key=lambda p: -p.imagelength * p.imagewidth,
        )
        if min(levels[0].imagelength, levels[0].imagewidth) < image_size:
            raise UnusableImage(f"smaller than {image_size} px")
        page = [p for p in levels if min(p.imagelength, p.imagewidth) >= image_size][-1]
        # JPEG tiles stored as YCbCr (how scanners and tifffile write them) come
        # out of the JPEG codec as RGB.
        rgb = page.photometric == tifffile.PHOTOMETRIC.RGB or (
            page.photometric == tifffile.PHOTOMETRIC.YCBCR
            and page.compression == tifffile.COMPRESSION.JPEG
        )
        grey = page.photometric == tifffile.PHOTOMETRIC.MINISBLACK
        if (
            page.dtype != np.uint8
            or not (rgb or grey)
            or page.planarconfig != tifffile.PLANARCONFIG.CONTIG
            or page.imagedepth != 1
        ):
            return None
        height, width = page.imagelength, page.imagewidth
        crop = min(height, width)
        factor = crop // image_size
        out_side = crop // factor
        y0, x0 = (height - crop) // 2, (width - crop) // 2
        y1, x1 = y0 + out_side * factor, x0 + out_side * factor
        channels = 1 if grey else 3
        sums = np.zeros((out_side, out_side, channels), dtype=np.uint64)
        # One segment decoded at a time (maxworkers=1) and reads of at
        # most 4 MB: memory stays bounded.
        for segment, (_, _, sy, sx, _), _ in page.segments(maxworkers=1, buffersize=2**22):
            if segment is None:  # an empty segment (not written): zeros, nothing to add
                continue
            segment = segment.reshape(segment.shape[-3:])
            ya, yb = max(sy, y0), min(sy + segment.shape[0], y1)
            xa, xb = max(sx, x0), min(sx + segment.shape[1], x1)
            if ya >= yb or xa >= xb:
                continue
            part = segment[ya - sy : yb - sy, xa - sx : xb - sx, :channels]
            rows, cols = (np.arange(ya, yb) - y0) // factor, (np.arange(xa, xb) - x0) // factor
            row_starts, col_starts = (
                np.flatnonzero(np.diff(rows, prepend=-1)),
                np.flatnonzero(np.diff(cols, prepend=-1)),
            )
            block = np.add.reduceat(
                np.add.reduceat(part, row_starts, axis=0, dtype=np.uint64), col_starts, axis=1
            )
            sums[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] += block
    area = factor * factor
    pixels = ((sums + area // 2) // area).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels)


def load_image(file: Path, image_size: int, side: int) -> np.ndarray:
    """Read an image file, center-crop it to a square, resize it to image_size, then to `side` (the
    top pyramid level). Any size: JPEGs are decoded at a reduced scale (1/2..1/8) and TIFF
    strips/tiles are averaged while they are decoded, so a 20,000 x 20,000 slide tile is never held
    at full resolution; other formats are decoded whole (up to MAX_DECODED_PIXELS), then
    area-reduced. An image is never upsampled.

    Raises UnusableImage (reason: unreadable, smaller than image_size, too large)
    for a file that cannot be used.
    """
    try:
        if file.suffix.lower() in (".tif", ".tiff"):
            try:
                reduced = _tiff_center_reduced(file, image_size)
            except UnusableImage:
                raise
            # Not a TIFF tifffile reads (or a codec it lacks): Pillow may still read it
            except Exception:
                reduced = None
            if reduced is not None:
                return _square(reduced, image_size, side)
        with _huge_images_allowed(), Image.open(file) as im:
            if min(im.size) < image_size:
                raise UnusableImage(f"smaller than {image_size} px")
            # JPEG: decode at the smallest scale >= image_size
            im.draft("RGB", (image_size, image_size))
            if im.width * im.height > MAX_DECODED_PIXELS:
                raise UnusableImage("too large to decode (save it as a tiled TIFF or a JPEG)")
            return _square(im, image_size, side)
    except UnusableImage:
        raise
    except (
        Exception
    ) as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise UnusableImage("unreadable") from exc
