"""Whole-slide images as an image source: square regions of tissue at a chosen magnification.

A folder given as image_source may hold slides, ordinary images, or both, in subfolders too. Slides
are read with OpenSlide (openslide-python, with the library itself from openslide-bin): Aperio .svs,
Hamamatsu .ndpi, 3DHISTECH .mrxs (the file plus the folder of the same name beside it), Leica .scn,
Ventana .bif, and pyramidal .tif/.tiff.

Which TIFFs are slides: a .tif/.tiff is a slide when OpenSlide recognises a scanner's format in it
(Aperio, Philips, Ventana...), or when it is a tiled TIFF holding at least two resolution levels as
separate directories (OpenSlide's generic-tiff with a pyramid, as scanners and `vips tiffsave
--pyramid` write them). Any other TIFF (strips, a single tiled level, reduced copies kept as
sub-IFDs) is an ordinary image and is read as before: its center square, resized.

Resolution: each task's image is a square region of image_size pixels at `slide_mpp` micrometres
per pixel, read from the coarsest pyramid level that is not coarser than that (a 1 % tolerance
absorbs rounding in the levels' downsamples), then resized to image_size; with `slide_level` the
region is image_size pixels of that level instead, unresized. A slide is never upsampled: one whose
level 0 is coarser than slide_mpp is skipped. A slide without usable MPP metadata (missing, or
outside 0.05-50 um/px, or non-square pixels) is read as if its level 0 were ASSUMED_LEVEL0_MPP
(0.25 um/px, a 40x scan), with one warning line for all such slides; slide_level avoids the guess.

Tissue: CLAM's method (Lu et al., "Data-efficient and weakly supervised computational pathology on
whole-slide images", arXiv:2004.09666): the HSV saturation of a thumbnail (at most THUMBNAIL_SIDE
pixels a side, read from the slide's coarsest level), median-filtered (7 x 7) and thresholded with
Otsu's method, then a morphological closing. The threshold is clipped to SATURATION_RANGE (0-255
scale): the floor keeps pure glass (saturation under 10, JPEG noise included) from being split in
two, the cap keeps a slide that is nearly all tissue from being split between pale stroma and dark
nuclei. A region needs a tissue fraction >= min_tissue, on the thumbnail and again on the region
itself (the slide's threshold applied to the region's 2V-pixel level, median-filtered 5 x 5); so
does every target (on top of the near-uniform rule of ordinary images).

Regions: candidate squares on a grid of a quarter of the region side, taken in a seeded random order
and kept when they hold enough tissue and do not overlap a region already kept; a slide that cannot
hold regions_per_slide such regions is skipped (counted in the build's one-line warning).

Never a whole slide: only the thumbnail (from the coarsest level, read in bands and area-averaged
while reading if it is large) and the regions (in bands of at most READ_PIXELS pixels, area-averaged
by an integer factor while reading when a region is much larger than image_size) are read.
"""

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from envs.images import SLIDE_SUFFIXES, PatchLocConfigError, UnusableImage, _square
from envs.lattice import NORMALIZED_BOXES

TIFF_SUFFIXES = (".tif", ".tiff")  # slides when pyramidal (see the module docstring)
# 2 um/px (a 5x objective's view): the default 448-pixel region then spans 0.9 mm, enough for
# tissue architecture (glands, vessels, tumour-stroma borders) in the overview, while the finest
# views (112 pixels = 224 um) still resolve nuclei (3-5 pixels); every scanner's level 0 (0.25 um/px
# at 40x, 0.5 at 20x) is finer, so nothing is upsampled, and slides store a level near it.
DEFAULT_SLIDE_MPP = 2.0
DEFAULT_REGIONS_PER_SLIDE = 32
DEFAULT_MIN_TISSUE = 0.5
ASSUMED_LEVEL0_MPP = 0.25  # a 40x scan: what a slide without usable MPP metadata is read as
MPP_RANGE = (0.05, 50.0)  # plausible level-0 um/px; anything else is broken metadata
LEVEL_TOLERANCE = 1.01  # a level this much coarser than asked still counts (rounded downsamples)
THUMBNAIL_SIDE = 1024
# A thumbnail is read from the coarsest level, or the scanner's own thumbnail when that level has
# more pixels than this (8,192 x 8,192); a slide with neither is skipped rather than read whole.
MAX_THUMBNAIL_SOURCE_PIXELS = 2**26
SATURATION_RANGE = (20, 50)
READ_PIXELS = 2**22  # pixels per read_region call (16 MB as RGBA): memory stays bounded


@dataclass(frozen=True)
class SlideSettings:
    """How regions are read from slides (make_task_sets' slide_mpp, slide_level, regions_per_slide,
    min_tissue); `mpp` is None when `level` is given."""

    mpp: Optional[float] = DEFAULT_SLIDE_MPP
    level: Optional[int] = None
    regions_per_slide: int = DEFAULT_REGIONS_PER_SLIDE
    min_tissue: float = DEFAULT_MIN_TISSUE


def slide_settings(slide_mpp, slide_level, regions_per_slide, min_tissue) -> SlideSettings:
    """Check the slide settings (one-line PatchLocConfigError on a bad one) and combine them."""
    if slide_level is not None:
        if isinstance(slide_level, bool) or not isinstance(slide_level, (int, np.integer)):
            raise PatchLocConfigError(f"slide_level must be an integer >= 0 (got {slide_level!r})")
        if slide_level < 0:
            raise PatchLocConfigError(f"slide_level must be an integer >= 0 (got {slide_level!r})")
        if slide_mpp is not None:
            raise PatchLocConfigError(
                f"give slide_mpp ({slide_mpp}) or slide_level ({slide_level}), not both: "
                "slide_level "
                "reads that pyramid level as it is"
            )
    elif slide_mpp is None:
        slide_mpp = DEFAULT_SLIDE_MPP
    if slide_mpp is not None:
        number = isinstance(slide_mpp, (int, float, np.number)) and not isinstance(slide_mpp, bool)
        if not number or not math.isfinite(slide_mpp) or slide_mpp <= 0:
            raise PatchLocConfigError(
                f"slide_mpp must be a positive number of micrometres per pixel, e.g. 2 (got "
                f"{slide_mpp!r})"
            )
        slide_mpp = float(slide_mpp)
    if isinstance(regions_per_slide, bool) or not isinstance(regions_per_slide, (int, np.integer)):
        raise PatchLocConfigError(
            f"regions_per_slide must be an integer >= 1 (got {regions_per_slide!r})"
        )
    if regions_per_slide < 1:
        raise PatchLocConfigError(
            f"regions_per_slide must be an integer >= 1 (got {regions_per_slide!r}): each slide "
            "used gives that many task images"
        )
    number = isinstance(min_tissue, (int, float, np.number)) and not isinstance(min_tissue, bool)
    if not number or not 0.0 <= min_tissue <= 1.0:
        raise PatchLocConfigError(
            f"min_tissue must be a fraction in [0, 1] (got {min_tissue!r}), e.g. 0.5 for regions "
            "at "
            "least half tissue"
        )
    level = None if slide_level is None else int(slide_level)
    return SlideSettings(slide_mpp, level, int(regions_per_slide), float(min_tissue))


def _openslide():
    """The openslide module, imported on first use (procedural and ordinary images do not need
    it)."""
    try:
        import openslide
    except (ImportError, OSError) as exc:
        raise PatchLocConfigError(
            f"reading whole-slide images needs OpenSlide ({exc}); install it with "
            "`pip install openslide-python openslide-bin`"
        ) from None
    return openslide


def is_slide(file: Path) -> bool:
    """Whether `file` is read as a slide: a slide suffix, or a TIFF OpenSlide reads as a scanner's
    format or as a pyramid of at least two levels (see the module docstring)."""
    suffix = file.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES:
        return False
    try:
        openslide = _openslide()
    except PatchLocConfigError:  # without OpenSlide a TIFF is read as an ordinary image
        return False
    try:
        vendor = openslide.OpenSlide.detect_format(str(file))
        if vendor is None:
            return False
        if vendor != "generic-tiff":
            return True
        with openslide.OpenSlide(str(file)) as slide:
            return slide.level_count >= 2
    except Exception:  # unreadable for OpenSlide: the ordinary-image path reports it
        return False


def _level0_mpp(properties) -> tuple[Optional[float], Optional[str]]:
    """(MPP of level 0, None) from the slide's metadata, or (None, why it is not usable)."""
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            values.append(float(properties[key]))
        except KeyError:
            pass
        except ValueError:
            return None, "absurd"
    if not values:
        return None, "missing"
    low, high = MPP_RANGE
    if not all(math.isfinite(v) and low <= v <= high for v in values):
        return None, "absurd"
    if max(values) > 1.1 * min(values):  # non-square pixels: a region would be distorted
        return None, "absurd"
    return float(np.mean(values)), None


def _background(properties) -> tuple[int, int, int]:
    """The slide's background colour (openslide.background-color, hex), white if not given."""
    colour = properties.get("openslide.background-color", "FFFFFF")
    try:
        return tuple(int(colour[i : i + 2], 16) for i in (0, 2, 4))
    except ValueError:
        return 255, 255, 255


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of uint8 RGB pixels on the 0-255 scale (0 where the pixel is black)."""
    high = rgb.max(axis=-1).astype(np.int32)
    low = rgb.min(axis=-1).astype(np.int32)
    return ((high - low) * 255 // np.maximum(high, 1)).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising the
    between-class variance of < t, >= t."""
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    below = np.cumsum(counts)  # pixels with value < t for t = 1..256
    below_sum = np.cumsum(counts * levels)
    total, total_sum = below[-1], below_sum[-1]
    above = total - below
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_below = below_sum / below
        mean_above = (total_sum - below_sum) / above
        between = below * above * (mean_below - mean_above) ** 2
    between[~np.isfinite(between)] = -1.0
    return int(np.argmax(between)) + 1


def tissue_mask(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """(mask, threshold) of a thumbnail: median-filtered saturation >= Otsu's threshold (clipped to
    SATURATION_RANGE), closed with a 5 x 5 square; see the module docstring."""
    sat = ndimage.median_filter(saturation(rgb), size=7)
    low, high = SATURATION_RANGE
    threshold = int(np.clip(otsu_threshold(sat), low, high))
    # Edge padding: the closing then neither erodes tissue at the border nor grows glass into it.
    padded = np.pad(sat >= threshold, 3, mode="edge")
    mask = ndimage.binary_closing(padded, structure=np.ones((5, 5), dtype=bool))[3:-3, 3:-3]
    return mask, threshold


def region_tissue(level1: np.ndarray, threshold: int) -> np.ndarray:
    """(195,) tissue fraction of every lattice window of a region, from its 2V-pixel level."""
    mask = ndimage.median_filter(saturation(level1), size=5) >= threshold
    side = mask.shape[0]
    integral = np.zeros((side + 1, side + 1))
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    y0, x0, y1, x1 = np.round(NORMALIZED_BOXES * side).astype(np.int64).T
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / np.maximum((y1 - y0) * (x1 - x0), 1)


def _read_rgb(slide, location, level, size, background) -> Image.Image:
    """read_region as RGB: transparent pixels (outside the scanned
    area) in the background colour."""
    region = slide.read_region(location, level, size)
    canvas = Image.new("RGBA", region.size, background + (255,))
    canvas.alpha_composite(region)
    return canvas.convert("RGB")


def _read_reduced(slide, level, x0, y0, width, height, factor, background) -> Image.Image:
    """The (width x height)-pixel area of `level` whose top-left is (x0, y0) at level 0,
    area-averaged by `factor` while it is read in bands of at most READ_PIXELS pixels; width and
    height are multiples of factor."""
    downsample = slide.level_downsamples[level]
    rows = max(factor, READ_PIXELS // max(width, 1) // factor * factor)
    out = Image.new("RGB", (width // factor, height // factor))
    for top in range(0, height, rows):
        band_rows = min(rows, height - top)
        location = (int(x0), int(round(y0 + top * downsample)))
        band = _read_rgb(slide, location, level, (width, band_rows), background)
        out.paste(band.reduce(factor) if factor > 1 else band, (0, top // factor))
    return out


@dataclass
class SlideRegion:
    """One task image read from a slide: the pyramid top, its per-window tissue fractions, and what
    tasks.json records about it."""

    top: np.ndarray
    tissue: np.ndarray
    record: dict


class SlideSource:
    """An open slide, its thumbnail tissue mask and its candidate
    regions (see the module docstring).

    Raises UnusableImage (the reason names the kind, for the skip summary) for a slide that cannot
    give regions_per_slide regions. `mpp_problem` is "missing" or "absurd" when the MPP was assumed.
    """

    def __init__(self, file: Path, folder, settings: SlideSettings, image_size: int, side: int):
        self.file, self.settings, self.image_size, self.side = file, settings, image_size, side
        self.name = os.path.relpath(file, folder)
        if file.suffix.lower() == ".mrxs" and not file.with_suffix("").is_dir():
            raise UnusableImage(".mrxs without its data folder (the folder of the same name)")
        openslide = _openslide()
        try:
            self.slide = openslide.OpenSlide(str(file))
        except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
            raise UnusableImage("unreadable") from exc
        try:
            self._choose_level()
            self._find_tissue()
        except UnusableImage:
            self.close()
            raise
        except Exception as exc:  # a thumbnail that does not decode
            self.close()
            raise UnusableImage("unreadable") from exc

    def close(self) -> None:
        self.slide.close()

    def _choose_level(self) -> None:
        """The pyramid level regions are read from, and the region's side there and at level 0."""
        slide, settings = self.slide, self.settings
        properties = slide.properties
        self.vendor = properties.get("openslide.vendor")
        self.background = _background(properties)
        self.level0_mpp, self.mpp_problem = _level0_mpp(properties)
        downsamples = slide.level_downsamples
        if settings.level is not None:
            if settings.level >= slide.level_count:
                raise UnusableImage(f"no level {settings.level} (slide_level)")
            self.level = settings.level
            self.level_side = self.image_size
            self.mpp_problem = None  # nothing assumed: the level is read as it is
        else:
            mpp0 = ASSUMED_LEVEL0_MPP if self.level0_mpp is None else self.level0_mpp
            if mpp0 > settings.mpp * LEVEL_TOLERANCE:
                raise UnusableImage(
                    f"level 0 coarser than slide_mpp {settings.mpp:g} um/px (reading it would "
                    "upsample; raise slide_mpp)"
                )
            wanted = settings.mpp / mpp0  # downsample from level 0
            self.level = max(
                (level for level, d in enumerate(downsamples) if d <= wanted * LEVEL_TOLERANCE),
                key=lambda level: downsamples[level],
            )
            self.level_side = max(1, round(self.image_size * wanted / downsamples[self.level]))
        self.downsample = float(downsamples[self.level])
        self.side0 = self.level_side * self.downsample  # the region's side in level-0 pixels
        width, height = slide.dimensions
        if width < self.side0 or height < self.side0:
            raise UnusableImage("smaller than one region")
        level0_mpp = ASSUMED_LEVEL0_MPP if self.mpp_problem else self.level0_mpp
        if self.mpp_problem:
            self.mpp_source = f"assumed: {self.mpp_problem}"
        else:
            self.mpp_source = "metadata" if self.level0_mpp is not None else "unknown"
        self.mpp = None
        if level0_mpp is not None:
            self.mpp = level0_mpp * self.side0 / self.image_size  # um per pixel of the task image

    def _thumbnail(self) -> tuple[np.ndarray, float, float]:
        """(RGB thumbnail, level-0 pixels per thumbnail pixel down, across): from the coarsest
        level, area-averaged by an integer factor while read in bands, or the scanner's thumbnail
        when the coarsest level is too large to read."""
        slide = self.slide
        coarsest = slide.level_count - 1
        width, height = slide.level_dimensions[coarsest]
        width0, height0 = slide.dimensions
        if width * height > MAX_THUMBNAIL_SOURCE_PIXELS:
            if "thumbnail" not in slide.associated_images:
                raise UnusableImage(
                    "no level small enough for a thumbnail (save it as a full pyramid, e.g. `vips "
                    "tiffsave --tile --pyramid`)"
                )
            thumbnail = slide.associated_images["thumbnail"].convert("RGB")
            return np.asarray(thumbnail), height0 / thumbnail.height, width0 / thumbnail.width
        factor = max(1, max(width, height) // THUMBNAIL_SIDE)
        width, height = width - width % factor, height - height % factor
        thumbnail = _read_reduced(slide, coarsest, 0, 0, width, height, factor, self.background)
        scale = slide.level_downsamples[coarsest] * factor
        return np.asarray(thumbnail), scale, scale

    def _find_tissue(self) -> None:
        """Thumbnail tissue mask and its saturation threshold, then every candidate region's tissue
        fraction (on a grid of a quarter of the region side, in level-0 pixels)."""
        thumbnail, scale_y, scale_x = self._thumbnail()
        self.mask, self.threshold = tissue_mask(thumbnail)
        if not self.mask.any():
            raise UnusableImage("no tissue (glass only)")
        mask_rows, mask_cols = self.mask.shape
        integral = np.zeros((mask_rows + 1, mask_cols + 1))
        integral[1:, 1:] = self.mask.cumsum(0).cumsum(1)
        step = self.side0 / 4
        width0, height0 = self.slide.dimensions

        def footprint(starts, scale, limit):
            first = np.clip(np.floor(starts / scale).astype(np.int64), 0, limit - 1)
            last = np.clip(np.ceil((starts + self.side0) / scale).astype(np.int64), 1, limit)
            return first, np.maximum(last, first + 1)

        y0, y1 = footprint(
            np.arange(int((height0 - self.side0) // step) + 1) * step, scale_y, mask_rows
        )
        x0, x1 = footprint(
            np.arange(int((width0 - self.side0) // step) + 1) * step, scale_x, mask_cols
        )
        inside = (
            integral[y1[:, None], x1[None, :]]
            - integral[y0[:, None], x1[None, :]]
            - integral[y1[:, None], x0[None, :]]
            + integral[y0[:, None], x0[None, :]]
        )
        self.grid_fraction = inside / ((y1 - y0)[:, None] * (x1 - x0)[None, :])
        self.grid_step = step
        self.too_little_tissue = (
            f"tissue for fewer than {self.settings.regions_per_slide} regions (regions_per_slide) "
            f"at min_tissue {self.settings.min_tissue:g}"
        )

    def regions(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        """Grid cells (row, col) of non-overlapping regions with tissue >=
        min_tissue, in a random order (greedy over a seeded permutation of the
        cells); at least regions_per_slide of them."""
        fraction = self.grid_fraction
        rows, cols = fraction.shape
        cells = np.flatnonzero(fraction.ravel() >= self.settings.min_tissue)
        taken = np.zeros((rows + 3, cols + 3), dtype=bool)  # a region covers 4 x 4 grid cells
        kept = []
        for cell in cells[rng.permutation(len(cells))]:
            row, col = divmod(int(cell), cols)
            if not taken[row : row + 4, col : col + 4].any():
                taken[row : row + 4, col : col + 4] = True
                kept.append((row, col))
        if len(kept) < self.settings.regions_per_slide:
            raise UnusableImage(self.too_little_tissue)
        return kept

    def read(self, cell: tuple[int, int]) -> SlideRegion:
        """The region at grid cell `cell`: its pyramid top (side x side), tissue and record."""
        x0 = int(round(cell[1] * self.grid_step))
        y0 = int(round(cell[0] * self.grid_step))
        factor = max(1, self.level_side // self.image_size)
        read_side = self.level_side - self.level_side % factor
        try:
            im = _read_reduced(
                self.slide, self.level, x0, y0, read_side, read_side, factor, self.background
            )
        except Exception as exc:  # OpenSlideError: a tile that does not decode
            raise UnusableImage("unreadable") from exc
        top = _square(im, self.image_size, self.side)
        half = top.reshape(self.side // 2, 2, self.side // 2, 2, 3).mean(axis=(1, 3))
        tissue = region_tissue(np.round(half).astype(np.uint8), self.threshold)
        record = {
            "kind": "slide",
            "file": self.name,
            "vendor": self.vendor,
            "level": self.level,
            "level_downsample": self.downsample,
            "level0_mpp": self.level0_mpp,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "region_level0": {"x": x0, "y": y0, "size": round(self.side0, 3)},
            "region_size_at_level": self.level_side,
            "tissue_fraction": round(float(tissue[0]), 4),
        }
        return SlideRegion(top, tissue, record)


def slide_regions(source: SlideSource, rng: np.random.Generator) -> Iterator[SlideRegion]:
    """Regions of `source` with enough tissue (on the thumbnail and on the region itself), in the
    seeded order, until the caller stops or they run out."""
    for cell in source.regions(rng):
        region = source.read(cell)
        if region.tissue[0] >= source.settings.min_tissue:  # else the thumbnail overestimated it
            yield region


def mpp_warning(assumed: dict[str, list], folder, settings: SlideSettings) -> str:
    """The one warning line for slides read with ASSUMED_LEVEL0_MPP, by reason."""
    parts = []
    for reason, files in sorted(assumed.items()):  # reasons "assumed: missing", "assumed: absurd"
        names = sorted(os.path.relpath(f, folder) for f in files)
        names = names[:3] + ["..."] * (len(names) > 3)
        parts.append(f"{len(files)} {reason.split(': ')[-1]} ({', '.join(names)})")
    count = sum(map(len, assumed.values()))
    downsample = settings.mpp / ASSUMED_LEVEL0_MPP
    return (
        f"warning: {count} slides in '{folder}' have no usable MPP metadata: {', '.join(parts)}; "
        f"read as if level 0 were {ASSUMED_LEVEL0_MPP:g} um/px (a 40x scan: downsample "
        f"{downsample:g} for slide_mpp {settings.mpp:g}); pass slide_level to choose the pyramid "
        "level instead"
    )


def describe_record(record: dict[str, Any]) -> str:
    """A short caption for a task image: its file and, for a slide region, level-0 position, level
    and um/px."""
    if record.get("kind") != "slide":
        return str(record.get("file", record.get("name", "")))
    region = record["region_level0"]
    mpp = "" if record["mpp"] is None else f" {record['mpp']:.2g}um/px"
    return f"{record['file']} x={region['x']} y={region['y']} L{record['level']}{mpp}"
