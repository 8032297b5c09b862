"""A deterministic generator of carpet-like RGB textures in MVTec AD layout, with defects at
physically defined difficulty levels and the nuisance variation of a real camera.

`generate_category(root, ...)` writes

    root/train/good/000.png ...
    root/test/good/000.png ...
    root/test/<defect>/000.png ...            every defect type at every level of the ladder
    root/ground_truth/<defect>/000_mask.png ...
    root/levels.csv                           each defective test image's level (stages/data/levels.py)

Images are 8-bit RGB PNGs; masks are single-channel 8-bit PNGs (255 inside the defect, 0 elsewhere).

The ladder (docs/explanation/synthetic-benchmark.md). Every defect is drawn at a `Level`:
- `area`: the defect's mask holds exactly this many pixels (given at 256 px, the default image_size
  and preprocess.resize; at another image_size areas and widths scale with the image, as the texture);
- `width`: threads and cuts are bands of this mean width around a curve of length ~ area / width;
- `delta_e`: the mean, over the defect's pixels, of the CIE 1976 colour difference ΔE*ab between the
  image and its defect-free twin (the same carpet, light and sensor noise without the defect), both
  as the 8-bit sRGB values written to disk. Each defect type draws its full-strength look (a stain,
  a dark hole, a metal flake, ...) and is then blended towards the carpet under it in CIELAB until
  that mean is the level's ΔE (a few steps on the quantised output, to within 1 %, or 1 / area
  for tiny defects).
So the mask is exactly the set of pixels the defect changed, and a level means the same colour
difference and size for every defect type.

The nuisance (a `Nuisance`, params data.synthetic.nuisance) applies to every image, train and test
alike: the carpet's rotation and scale, then a camera: a linear illumination gradient, Gaussian
sensor noise and optionally JPEG compression. Each draws its random numbers whatever its setting
(a setting of 0 multiplies them away), so switching one off leaves everything else of the image as it
was. Each image gets two numpy Generators, the scene's and the camera's, spawned from
SeedSequence([seed, split, level index, image index]): an image does not depend on how many images
the other splits or cells hold, and equal arguments give byte-identical files.

The texture is a brick-offset lattice of small pile loops (period 8 px at 256 px) in beige/brown
tones, shaded as bumps under a directional light, with per-image shift, per-loop jitter and fibre
noise.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.color import lab2rgb, rgb2lab

from stages.core.errors import PipelineError
from stages.data.levels import LevelRow, write_levels

DEFECT_TYPES = ("color", "cut", "hole", "metal_contamination", "thread")
CURVED = ("cut", "thread")  # the types whose `width` applies

# Split indices for the seed sequence; defect k (index in DEFECT_TYPES, not in the caller's subset)
# uses 2 + k, so asking for fewer defect types leaves the other images unchanged.
_SPLIT_TRAIN = 0
_SPLIT_TEST_GOOD = 1
_SPLIT_DEFECT0 = 2

_PNG_OPTIONS = dict(format="PNG", optimize=False, compress_level=6)

REFERENCE_SIZE = 256  # px: a level's area and width are given at this image size (the default, = preprocess.resize)
MARGIN = 0.09  # defects stay this fraction of the side away from the border: inside the default 224/256 centre crop
# The mean ΔE*ab reached on the written pixels is the level's within 1 %, or within 1 / area where
# that is more: with a few pixels the 8-bit steps (up to about 1 ΔE*ab each) make the mean coarse.
DELTA_E_TOLERANCE = 0.01
_MAX_STEPS = 40  # steps of the ΔE search (typically 2 to 4)


@dataclass(frozen=True)
class Level:
    """One rung of the difficulty ladder (params data.synthetic.levels); sizes at REFERENCE_SIZE (`at_size`)."""

    delta_e: float  # mean CIE76 ΔE*ab between the defect's pixels and the same pixels without it
    area: int  # pixels in the defect's mask
    width: float  # mean width of threads and cuts, px


@dataclass(frozen=True)
class Nuisance:
    """What varies between images besides the carpet itself (params data.synthetic.nuisance); 0: off."""

    illumination: float = 0.0  # brightness ramps linearly by up to this fraction across the image
    rotation: float = 0.0  # the texture is rotated by up to this many degrees either way
    scale: float = 0.0  # the texture is scaled by up to this fraction either way
    noise: float = 0.0  # sensor noise, standard deviation in 8-bit levels
    jpeg_quality: int = 0  # 1-95: each image is JPEG-compressed at this quality (then stored as PNG); 0: never


# The defaults of params.yaml (docs/explanation/synthetic-benchmark.md says why these values).
DEFAULT_LEVELS = tuple(Level(delta_e, 256, 2.0) for delta_e in (16.0, 8.0, 4.0, 2.0))
DEFAULT_NUISANCE = Nuisance(illumination=0.1, rotation=4.0, scale=0.05, noise=2.0, jpeg_quality=0)


# --------------------------------------------------------------------------- argument checks


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


def at_size(level: Level, image_size: int) -> Level:
    """A level as drawn at `image_size`: areas and widths are given at REFERENCE_SIZE and scale with the image,
    as the texture does (the same carpet and defects seen at another resolution); a width is at least 1 px."""
    s = image_size / REFERENCE_SIZE
    return Level(level.delta_e, max(1, int(round(level.area * s * s))), max(1.0, level.width * s))


def curve_length(level: Level) -> float:
    """Length of the centre line of a thread or cut: a band of `width` around it (round ends) holds `area`."""
    return max(level.area / level.width - 0.25 * math.pi * level.width, level.width)


def _check_levels(levels, image_size: int) -> tuple[Level, ...]:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise PipelineError(f"data.synthetic.levels must be a non-empty list of levels, got {levels!r}")
    checked = []
    room = image_size * (1.0 - 2.0 * MARGIN)  # the side of the square defects are placed in
    for k, level in enumerate(levels):
        where = f"data.synthetic.levels[{k}]"
        if isinstance(level, dict):
            unknown = set(level) - {"delta_e", "area", "width"}
            if unknown or len(level) != 3:
                raise PipelineError(f"{where}: expected delta_e, area and width, got {sorted(level)}")
            level = Level(**level)
        if not isinstance(level, Level):
            raise PipelineError(f"{where}: expected delta_e, area and width, got {level!r}")
        if not _is_number(level.delta_e) or not 0 < level.delta_e <= 100:
            raise PipelineError(f"{where}.delta_e must be a number in (0, 100], got {level.delta_e!r}")
        if not _is_int(level.area) or level.area < 1:
            raise PipelineError(f"{where}.area must be an integer >= 1, got {level.area!r}")
        if not _is_number(level.width) or not 0 < level.width <= 64:
            raise PipelineError(f"{where}.width must be a number in (0, 64], got {level.width!r}")
        given = level
        level = at_size(level, image_size)
        # a blob of this area must fit the placement square with room to spare, a curve must fit along it
        if level.area > 0.25 * room * room:
            raise PipelineError(f"{where}.area: {level.area} px at image_size {image_size} is more than a quarter of "
                                f"the {room:.0f} x {room:.0f} px square defects are placed in")
        if curve_length(level) + level.width > room:
            raise PipelineError(f"{where}: a thread or cut of width {level.width:g} and area {level.area} is "
                                f"{curve_length(level):.0f} px long, more than the {room:.0f} px defects are placed "
                                f"in at image_size {image_size} (a smaller area or a larger width)")
        checked.append(Level(float(given.delta_e), int(given.area), float(given.width)))
    return tuple(checked)


def _check_nuisance(nuisance) -> Nuisance:
    if isinstance(nuisance, dict):
        unknown = sorted(set(nuisance) - set(Nuisance.__dataclass_fields__))
        if unknown:
            raise PipelineError(f"data.synthetic.nuisance: unknown key(s) {unknown}")
        nuisance = Nuisance(**nuisance)
    if not isinstance(nuisance, Nuisance):
        raise PipelineError(f"data.synthetic.nuisance: expected a mapping, got {nuisance!r}")
    limits = {"illumination": 1.0, "rotation": 45.0, "scale": 0.5, "noise": 64.0}
    for name, limit in limits.items():
        value = getattr(nuisance, name)
        if not _is_number(value) or not 0 <= value <= limit:
            raise PipelineError(f"data.synthetic.nuisance.{name} must be a number in [0, {limit:g}], got {value!r}")
    if not _is_int(nuisance.jpeg_quality) or not 0 <= nuisance.jpeg_quality <= 95:
        raise PipelineError(f"data.synthetic.nuisance.jpeg_quality must be an integer in [0, 95] (0: no JPEG), "
                            f"got {nuisance.jpeg_quality!r}")
    return nuisance


def _check_args(image_size, n_train, n_test_good, n_test_per_cell, seed, defect_types) -> tuple[str, ...]:
    if not _is_int(image_size) or image_size < 32:
        raise PipelineError(f"data.synthetic.image_size must be an integer >= 32, got {image_size!r}")
    for name, value in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_per_cell", n_test_per_cell)):
        if not _is_int(value) or value < 0:
            raise PipelineError(f"data.synthetic.{name} must be a non-negative integer, got {value!r}")
    if n_train == 0:
        raise PipelineError("data.synthetic.n_train must be >= 1, got 0")
    if not _is_int(seed) or seed < 0:
        raise PipelineError(f"data.synthetic.seed must be a non-negative integer, got {seed!r}")
    if isinstance(defect_types, (str, bytes)) or not isinstance(defect_types, Sequence):
        raise PipelineError(f"data.synthetic.defect_types must be a list of names from {list(DEFECT_TYPES)}, "
                            f"got {defect_types!r}")
    defect_types = tuple(defect_types)
    unknown = [d for d in defect_types if d not in DEFECT_TYPES]
    if unknown:
        raise PipelineError(f"data.synthetic.defect_types: unknown defect type(s) {unknown}, "
                            f"known: {list(DEFECT_TYPES)}")
    duplicated = sorted({d for d in defect_types if defect_types.count(d) > 1})
    if duplicated:
        raise PipelineError(f"data.synthetic.defect_types: listed more than once: {duplicated}")
    return defect_types


# --------------------------------------------------------------------------- texture


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean, unit std."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    noise -= noise.mean()
    return noise / (noise.std() + 1e-8)


def _carpet(rng: np.random.Generator, size: int, nuisance: Nuisance) -> np.ndarray:
    """A looped-pile carpet texture: float32 (size, size, 3) in [0, 1], sRGB-encoded."""
    s = size / 256.0
    # Nuisance: the texture's scale and rotation under the camera (both drawn whatever their setting).
    period_u = 8.0 * s * (1.0 + nuisance.scale * rng.uniform(-1.0, 1.0))  # loop spacing along a row, px
    period_v = 0.92 * period_u  # row spacing, px
    theta = math.radians(nuisance.rotation * rng.uniform(-1.0, 1.0))
    phase_u, phase_v = rng.uniform(0.0, 64.0, size=2)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c, sn = math.cos(theta), math.sin(theta)
    u = (c * xx + sn * yy) / period_u + phase_u
    v = (-sn * xx + c * yy) / period_v + phase_v
    row = np.floor(v)
    u = u + 0.5 * (row.astype(np.int64) & 1)  # brick offset: every other row shifted half a loop
    col = np.floor(u)
    fu = u - col - 0.5
    fv = v - row - 0.5

    # Per-loop jitter: each loop is a bit taller/shorter, brighter/darker, wider, slightly off-centre.
    table = 64  # > loops per image at 256 px, so the jitter never visibly repeats
    ri = row.astype(np.int64) % table
    ci = col.astype(np.int64) % table

    def per_loop(mean, std):
        return rng.normal(mean, std, (table, table)).astype(np.float32)[ri, ci]

    loop_height = per_loop(1.0, 0.12)
    loop_tone = per_loop(1.0, 0.07)
    loop_width = per_loop(1.0, 0.08)
    fu = fu - per_loop(0.0, 0.06)
    fv = fv - per_loop(0.0, 0.05)

    # A pile loop seen from above: an elongated rounded bump with a faint groove (the loop's eye),
    # wide enough that neighbouring loops in a row touch.
    r2 = (fu / (0.40 * loop_width)) ** 2 + (fv / 0.50) ** 2
    bump = np.exp(-r2)
    ring = np.exp(-((np.sqrt(r2) - 0.8) / 0.3) ** 2)
    height = loop_height * (0.8 * bump + 0.3 * ring)

    # Shade the bumps under a directional light from the upper left.
    gy, gx = np.gradient(ndimage.gaussian_filter(height, 0.5 * s + 0.3) * (4.0 / max(s, 0.25)))
    light_angle = math.radians(rng.uniform(200.0, 250.0))
    lx, ly, lz = math.cos(light_angle) * 0.6, math.sin(light_angle) * 0.6, 0.8
    norm = np.sqrt(gx * gx + gy * gy + 1.0)
    diffuse = np.clip((-gx * lx - gy * ly + lz) / norm, 0.0, None)
    intensity = (0.35 + 0.65 * np.clip(height, 0.0, 1.2)) * (0.55 + 0.55 * diffuse) * loop_tone

    # Fibre noise: streaks along the pile direction, fine fuzz, and a faint large-scale mottling.
    along, across = 2.5 * s + 0.3, 0.5 * s + 0.3
    sigma = (across, along) if rng.integers(0, 2) == 0 else (along, across)
    fibre = 0.08 * _smooth_noise(rng, (size, size), sigma)
    fuzz = 0.07 * _smooth_noise(rng, (size, size), (0.35 * s + 0.3, 1.0 * s + 0.3)[:: 1 if sigma[0] < sigma[1] else -1])
    coarse = max(size // 8, 4)
    mottle = _smooth_noise(rng, (coarse, coarse), 18.0 * s / 8.0 + 0.5)
    mottle = 0.04 * ndimage.zoom(mottle, size / coarse, order=1, mode="nearest", grid_mode=True)[:size, :size]
    intensity = intensity * (1.0 + fibre + fuzz * np.clip(height, 0.2, 1.0) + mottle)

    beige = np.array([0.68, 0.56, 0.42], np.float32)
    brown = np.array([0.60, 0.45, 0.33], np.float32)
    base = (beige + rng.uniform(0.0, 1.0) * (brown - beige)) * rng.uniform(0.94, 1.05)  # the carpet's dye
    rgb = intensity[..., None] * base[None, None, :]
    rgb = rgb + rng.normal(0.0, 0.018, (size, size, 1)).astype(np.float32)  # fine fibre grain (luminance)
    rgb = rgb + rng.normal(0.0, 0.006, (size, size, 3)).astype(np.float32)  # slight chroma grain
    return np.clip(rgb, 0.0, 1.0)


# --------------------------------------------------------------------------- the camera


class _Camera:
    """Illumination gradient and sensor noise of one image, applied alike to the image and its twin."""

    def __init__(self, rng: np.random.Generator, size: int, nuisance: Nuisance):
        angle = rng.uniform(0.0, 2.0 * math.pi)
        amplitude = nuisance.illumination * rng.uniform(0.0, 1.0)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        # a ramp of `amplitude` from one side of the image to the other along a random direction
        ramp = ((xx + 0.5) / size - 0.5) * math.cos(angle) + ((yy + 0.5) / size - 0.5) * math.sin(angle)
        self.light = (1.0 + amplitude * ramp)[..., None]
        self.noise = rng.standard_normal((size, size, 3)) * (nuisance.noise / 255.0)
        self.jpeg_quality = nuisance.jpeg_quality

    def record(self, scene: np.ndarray, where=None) -> np.ndarray:
        """8-bit values of the scene's pixels (all, or those of the boolean mask `where`)."""
        light, noise = (self.light, self.noise) if where is None else (self.light[where], self.noise[where])
        return np.clip(np.rint((scene.astype(np.float64) * light + noise) * 255.0), 0, 255).astype(np.uint8)

    def compress(self, image: np.ndarray) -> np.ndarray:
        if not self.jpeg_quality:
            return image
        buffer = io.BytesIO()
        Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=int(self.jpeg_quality))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded.convert("RGB")).copy()


# --------------------------------------------------------------------------- shapes of exact area


def _placement_window(size: int) -> np.ndarray:
    lo, hi = MARGIN * size, size - MARGIN * size
    centres = np.arange(size) + 0.5
    inside = (centres >= lo) & (centres <= hi)
    return inside[:, None] & inside[None, :]


def _top_pixels(field: np.ndarray, area: int, rng: np.random.Generator) -> np.ndarray:
    """The `area` pixels of the placement window with the highest `field` (ties: a seeded random order)."""
    field = np.where(_placement_window(field.shape[0]), field, -np.inf)
    tie_break = rng.random(field.size)
    order = np.lexsort((tie_break, -field.ravel()))  # by -field, then by the random key
    mask = np.zeros(field.size, dtype=bool)
    mask[order[:area]] = True
    return mask.reshape(field.shape)


def _exact_area(rough: np.ndarray, area: int, centre, rng) -> np.ndarray:
    """`rough` grown or shrunk to exactly `area` pixels: the pixels of highest signed distance to its edge."""
    if rough.any():
        field = np.where(rough, ndimage.distance_transform_edt(rough), -ndimage.distance_transform_edt(~rough))
    else:  # nothing drawn (a tiny level): a disc around the centre
        yy, xx = np.mgrid[0:rough.shape[0], 0:rough.shape[1]]
        field = -np.hypot(xx + 0.5 - centre[0], yy + 0.5 - centre[1])
    return _top_pixels(field, area, rng)


def _blank(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (size, size), 0)
    return img, ImageDraw.Draw(img)


def _centre(rng: np.random.Generator, size: int, extent: float) -> np.ndarray:
    """A random centre (x, y) such that a shape reaching `extent` px from it stays inside the margin."""
    lo = MARGIN * size + extent
    hi = size - MARGIN * size - extent
    if hi <= lo:
        return np.array([size / 2.0, size / 2.0])
    return rng.uniform(lo, hi, size=2)


def _bezier(points: np.ndarray, n: int) -> np.ndarray:
    """Points on a Bezier curve of any degree (de Casteljau), shape (n, 2)."""
    t = np.linspace(0.0, 1.0, n)[:, None, None]
    pts = np.broadcast_to(points[None], (n,) + points.shape).astype(np.float64)
    while pts.shape[1] > 1:
        pts = (1.0 - t) * pts[:, :-1] + t * pts[:, 1:]
    return pts[:, 0]


def _band(rng, size: int, control: np.ndarray, level: Level) -> tuple[np.ndarray, np.ndarray]:
    """A band of exactly `level.area` pixels around a Bezier curve scaled to `curve_length(level)` and placed
    at random inside the margin; returns the mask and each pixel's distance to the curve."""
    dense = _bezier(control, 4096)
    length = float(np.sum(np.hypot(*np.diff(dense, axis=0).T)))
    target = curve_length(level)
    dense = (dense - dense.mean(axis=0)) * (target / max(length, 1e-9))
    n = max(int(math.ceil(target * 4)), 2)  # points every ~0.25 px
    steps = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(dense, axis=0).T))])
    at = np.linspace(0.0, steps[-1], n)
    curve = np.stack([np.interp(at, steps, dense[:, 0]), np.interp(at, steps, dense[:, 1])], axis=1)
    # place its bounding box, widened by the width, uniformly inside the margin
    pad = level.width
    lo, hi = curve.min(axis=0) - pad, curve.max(axis=0) + pad
    room_lo, room_hi = MARGIN * size, size - MARGIN * size
    shift = np.array([rng.uniform(room_lo - lo[i], max(room_hi - hi[i], room_lo - lo[i])) for i in range(2)])
    curve = curve + shift
    yy, xx = np.mgrid[0:size, 0:size]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)
    distance = cKDTree(curve).query(centres)[0].reshape(size, size)
    return _top_pixels(-distance, level.area, rng), distance


# --------------------------------------------------------------------------- defects
# Each returns (mask, changed): the mask holds exactly `level.area` pixels; `changed` is the
# full-strength defective version of the whole image, which `_at_level` then blends towards the carpet.


def _lum(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], np.float32)


def _defect_color(rng, img, level):
    size = img.shape[0]
    s = size / 256.0
    radius = math.sqrt(level.area / math.pi)
    centre = _centre(rng, size, radius * 1.6)
    canvas, draw = _blank(size)
    for _ in range(int(rng.integers(3, 6))):
        off = rng.normal(0.0, 0.35 * radius, 2)
        rx, ry = rng.uniform(0.55, 0.95, 2) * radius
        cx, cy = centre + off
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    mask = _exact_area(np.asarray(canvas) > 0, level.area, centre, rng)
    tints = np.array(
        [[0.80, 0.16, 0.14], [0.18, 0.30, 0.80], [0.20, 0.62, 0.22], [0.55, 0.22, 0.65], [0.15, 0.55, 0.65]],
        np.float32,
    )
    tint = tints[rng.integers(len(tints))]
    # Stain strength varies smoothly inside the blob; the pile shading stays visible under it.
    alpha = np.clip(0.8 + 0.12 * _smooth_noise(rng, (size, size), 3.0 * s + 0.5), 0.6, 0.95)[..., None]
    stained = (_lum(img)[..., None] * 1.7) * tint[None, None, :]
    changed = (1.0 - alpha) * img + alpha * stained
    return mask, changed


def _defect_cut(rng, img, level):
    size = img.shape[0]
    angle = rng.uniform(0.0, math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    bend = rng.uniform(-0.08, 0.08)
    control = np.stack([-0.5 * direction, bend * normal, 0.5 * direction])
    mask, distance = _band(rng, size, control, level)
    # A dark gap between the severed fibre ends: the outer part of the band is, raggedly, lighter.
    ends = mask & (distance > 0.25 * level.width) & (rng.random(mask.shape) < 0.6)
    gap = mask & ~ends
    changed = img.copy()
    dark = img * rng.uniform(0.15, 0.25) + 0.02 * rng.random(img.shape[:2] + (1,)).astype(np.float32)
    fuzz = 0.05 * rng.standard_normal(img.shape[:2] + (1,)).astype(np.float32)
    light = np.clip(img * rng.uniform(1.35, 1.55) + 0.1 + fuzz, 0, 1)
    changed[gap] = dark[gap]
    changed[ends] = light[ends]
    return mask, changed


def _polygon_blob(rng, centre, radius, n_vertices, jitter):
    angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, n_vertices))
    radii = radius * (1.0 - jitter * rng.random(n_vertices))
    return [(centre[0] + r * math.cos(a), centre[1] + r * math.sin(a)) for a, r in zip(angles, radii)]


def _defect_hole(rng, img, level):
    size = img.shape[0]
    s = size / 256.0
    radius = 1.15 * math.sqrt(level.area / math.pi)
    centre = _centre(rng, size, radius * 1.5)
    canvas, draw = _blank(size)
    draw.polygon(_polygon_blob(rng, centre, radius, int(rng.integers(9, 15)), 0.45), fill=255)
    # A second overlapping lobe makes the outline less regular.
    lobe_centre = centre + rng.normal(0.0, 0.35 * radius, 2)
    draw.polygon(_polygon_blob(rng, lobe_centre, 0.6 * radius, 9, 0.4), fill=255)
    mask = _exact_area(np.asarray(canvas) > 0, level.area, centre, rng)
    rim_width = max(1, int(round(1.5 * s)))
    inner = ndimage.binary_erosion(mask, structure=np.ones((2 * rim_width + 1,) * 2, bool), border_value=1)
    rim = mask & ~inner
    changed = img.copy()
    changed[inner] = (img * 0.1 + 0.012)[inner]  # near black, texture faintly visible
    changed[rim] = (img * 0.25)[rim]  # torn, shadowed edge
    return mask, changed


def _defect_metal(rng, img, level):
    size = img.shape[0]
    radius = 1.2 * math.sqrt(level.area / math.pi)
    centre = _centre(rng, size, radius * 1.3)
    # A random convex polygon: the hull of points on a random ellipse (sorted angles -> convex order).
    n = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, n))
    aspect = rng.uniform(0.55, 1.0)
    rot = rng.uniform(0.0, math.pi)
    ex, ey = radius * np.cos(angles), radius * aspect * np.sin(angles)
    px = centre[0] + ex * math.cos(rot) - ey * math.sin(rot)
    py = centre[1] + ex * math.sin(rot) + ey * math.cos(rot)
    canvas, draw = _blank(size)
    draw.polygon(list(zip(px, py)), fill=255)
    mask = _exact_area(np.asarray(canvas) > 0, level.area, centre, rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    light_angle = rng.uniform(0.0, 2.0 * math.pi)
    t = ((xx - centre[0]) * math.cos(light_angle) + (yy - centre[1]) * math.sin(light_angle)) / radius
    grey = rng.uniform(0.42, 0.58)
    shade = grey + 0.22 * t + 0.55 * np.exp(-(((t - rng.uniform(0.0, 0.5)) / 0.28) ** 2))
    edge = mask & ~ndimage.binary_erosion(mask, border_value=1)
    shade = np.where(edge, shade * 0.6, shade)
    tint = np.array([0.95, 0.98, 1.04], np.float32)
    changed = np.clip(shade[..., None] * tint + 0.02 * rng.standard_normal((size, size, 1)), 0, 1).astype(np.float32)
    return mask, changed


def _defect_thread(rng, img, level):
    size = img.shape[0]
    s = size / 256.0
    angle = rng.uniform(0.0, 2.0 * math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    control = np.stack(
        [
            np.zeros(2),
            0.33 * direction + rng.uniform(-0.5, 0.5) * normal,
            0.66 * direction + rng.uniform(-0.5, 0.5) * normal,
            direction,
        ]
    )
    mask, distance = _band(rng, size, control, level)
    colours = np.array(
        [[0.12, 0.16, 0.40], [0.92, 0.90, 0.85], [0.08, 0.08, 0.08], [0.72, 0.12, 0.10], [0.15, 0.45, 0.18]],
        np.float32,
    )
    colour = colours[rng.integers(len(colours))] * rng.uniform(0.9, 1.05)
    # Shading: rounded across the strand (brighter along its middle), twisted along it.
    across = np.clip(1.0 - distance / (0.5 * level.width + 0.5), 0.0, 1.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    along = (xx * direction[0] + yy * direction[1]) / max(3.0 * s, 1.0)
    twist = 0.88 + 0.12 * np.sin(2.0 * math.pi * along / 1.5 + rng.uniform(0, 2 * math.pi))
    shade = (0.55 + 0.5 * np.sqrt(across)) * twist
    changed = np.clip(shade[..., None] * colour + 0.03 * rng.standard_normal((size, size, 1)), 0, 1).astype(np.float32)
    return mask, changed


_DEFECTS: dict[str, Callable] = {
    "color": _defect_color,
    "cut": _defect_cut,
    "hole": _defect_hole,
    "metal_contamination": _defect_metal,
    "thread": _defect_thread,
}


# --------------------------------------------------------------------------- the level's colour difference


def _lab(values: np.ndarray) -> np.ndarray:
    """CIELAB (D65, 2° observer) of sRGB values in [0, 1] (or 8-bit integers), shape (n, 3)."""
    values = np.asarray(values)
    return rgb2lab(values / 255.0 if values.dtype == np.uint8 else values.astype(np.float64))


def mean_delta_e(image: np.ndarray, twin: np.ndarray, mask: np.ndarray) -> float:
    """Mean CIE76 ΔE*ab between two 8-bit RGB images over the pixels of `mask` (the level's `delta_e`)."""
    difference = _lab(image[mask]) - _lab(twin[mask])
    return float(np.mean(np.sqrt(np.sum(difference * difference, axis=1))))


def _at_level(scene, changed, mask, level: Level, camera: _Camera, twin: np.ndarray, defect: str):
    """The scene with the defect blended in CIELAB so that the recorded pixels differ from the twin's by a
    mean ΔE*ab of `level.delta_e`; returns the scene and that mean as reached."""
    base = _lab(scene[mask])
    delta = _lab(np.clip(changed[mask], 0.0, 1.0)) - base
    twin_lab = _lab(twin[mask])
    full = float(np.mean(np.sqrt(np.sum(delta * delta, axis=1))))
    if full == 0.0:
        raise PipelineError(f"synthetic {defect}: the defect changed no colour")

    def recorded(alpha: float):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # lab2rgb warns when it clips out-of-gamut colours
            rgb = lab2rgb(base + alpha * delta)
        lab = _lab(camera.record(rgb, mask))
        reached = float(np.mean(np.sqrt(np.sum((lab - twin_lab) ** 2, axis=1))))
        return rgb, reached

    # Multiplicative steps (the mean grows about linearly with alpha) until the target is bracketed, then
    # bisection: the recorded 8-bit values make the mean a step function of alpha.
    tolerance = max(DELTA_E_TOLERANCE * level.delta_e, 1.0 / int(mask.sum()))
    alpha, below, above, best = level.delta_e / full, 0.0, None, None
    for _ in range(_MAX_STEPS):
        rgb, reached = recorded(alpha)
        if best is None or abs(reached - level.delta_e) < abs(best[1] - level.delta_e):
            best = (rgb, reached)
        if abs(reached - level.delta_e) <= 0.25 * tolerance:
            break
        if reached < level.delta_e:
            below = alpha
        else:
            above = alpha
        if above is None:
            alpha = alpha * level.delta_e / reached if reached > 0 else 2.0 * alpha
            alpha = alpha if alpha > below else 2.0 * below  # the mean stalls when colours clip: push on
        else:
            guess = alpha * level.delta_e / reached
            alpha = guess if below < guess < above else 0.5 * (below + above)
    rgb, reached = best
    if abs(reached - level.delta_e) > tolerance:
        raise PipelineError(f"data.synthetic.levels: a {defect} defect reaches a mean ΔE*ab of {reached:.2f}, "
                            f"not the level's {level.delta_e:g} (outside the sRGB gamut of this carpet)")
    out = scene.astype(np.float64)
    out[mask] = rgb
    return out, reached


# --------------------------------------------------------------------------- public API


@dataclass
class Rendered:
    image: np.ndarray  # uint8 (H, W, 3), as written
    mask: np.ndarray | None  # bool (H, W); None for good images
    delta_e: float | None  # the mean ΔE*ab reached against the twin (before any JPEG); None for good images
    scene: np.ndarray  # float (H, W, 3) in [0, 1]: what the camera saw (carpet and defect, before light and noise)


def render(seed: int, split_index: int, image_index: int, image_size: int, defect: str | None = None,
           level: Level | None = None, nuisance: Nuisance = DEFAULT_NUISANCE, level_index: int = 0) -> Rendered:
    """One image. Its random numbers come from SeedSequence([seed, split_index, level_index, image_index]),
    so rendering it with `defect=None` gives its defect-free twin (same carpet, light and noise)."""
    scene_seq, camera_seq = np.random.SeedSequence([seed, split_index, level_index, image_index]).spawn(2)
    rng = np.random.default_rng(scene_seq)
    scene = _carpet(rng, image_size, nuisance)
    camera = _Camera(np.random.default_rng(camera_seq), image_size, nuisance)
    twin = camera.record(scene)
    if defect is None:
        return Rendered(camera.compress(twin), None, None, scene)
    level = at_size(level or DEFAULT_LEVELS[0], image_size)
    mask, changed = _DEFECTS[defect](rng, scene, level)
    scene, reached = _at_level(scene, changed, mask, level, camera, twin, defect)
    return Rendered(camera.compress(camera.record(scene)), mask, reached, scene)


def render_image(seed: int, split_index: int, image_index: int, image_size: int, defect: str | None = None,
                 level: Level | None = None, nuisance: Nuisance = DEFAULT_NUISANCE, level_index: int = 0):
    """One image (uint8 HxWx3) and, for a defect, its mask (bool HxW); mask is None for good images."""
    rendered = render(seed, split_index, image_index, image_size, defect, level, nuisance, level_index)
    return rendered.image, rendered.mask


def _save(array: np.ndarray, path: Path) -> None:
    mode = "RGB" if array.ndim == 3 else "L"
    Image.fromarray(array, mode=mode).save(path, **_PNG_OPTIONS)


def generate_category(
    root: Path,
    image_size: int = 256,
    n_train: int = 100,
    n_test_good: int = 20,
    n_test_per_cell: int = 2,
    seed: int = 0,
    defect_types=DEFECT_TYPES,
    levels=DEFAULT_LEVELS,
    nuisance=DEFAULT_NUISANCE,
    progress: Callable | None = None,
) -> None:
    """Write a synthetic carpet category in MVTec AD layout under `root` (created if missing): every
    defect type at every level, `n_test_per_cell` images each, numbered level by level.

    `root` must not already hold train/, test/ or ground_truth/ (stale files would mix in).
    `progress(n)`, when given, is called after each image (a progress bar's update).
    """
    defect_types = _check_args(image_size, n_train, n_test_good, n_test_per_cell, seed, defect_types)
    levels = _check_levels(levels, image_size)
    nuisance = _check_nuisance(nuisance)
    root = Path(root)
    existing = [name for name in ("train", "test", "ground_truth") if (root / name).exists()]
    if existing:
        raise PipelineError(f"{root}: already contains {', '.join(existing)}/ (generate into an empty directory)")
    tick = progress or (lambda n: None)

    def write_good(folder: Path, split_index: int, count: int):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _save(render(seed, split_index, i, image_size, nuisance=nuisance).image, folder / f"{i:03d}.png")
            tick(1)

    root.mkdir(parents=True, exist_ok=True)
    write_good(root / "train" / "good", _SPLIT_TRAIN, n_train)
    write_good(root / "test" / "good", _SPLIT_TEST_GOOD, n_test_good)
    rows = []
    for defect in defect_types:
        split_index = _SPLIT_DEFECT0 + DEFECT_TYPES.index(defect)
        folder, mask_folder = root / "test" / defect, root / "ground_truth" / defect
        folder.mkdir(parents=True, exist_ok=True)
        mask_folder.mkdir(parents=True, exist_ok=True)
        for k, level in enumerate(levels):
            for j in range(n_test_per_cell):
                number = k * n_test_per_cell + j
                rendered = render(seed, split_index, j, image_size, defect, level, nuisance, level_index=k)
                _save(rendered.image, folder / f"{number:03d}.png")
                _save(rendered.mask.astype(np.uint8) * 255, mask_folder / f"{number:03d}_mask.png")
                drawn = at_size(level, image_size)  # the area and width in this image's pixels
                rows.append(LevelRow(f"test/{defect}/{number:03d}.png", k + 1, drawn.delta_e, drawn.area,
                                     drawn.width, rendered.delta_e))
                tick(1)
    write_levels(root, rows)
