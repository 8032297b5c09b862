"""A deterministic generator of carpet-like RGB textures in MVTec AD layout.

`generate_category(root, ...)` writes

    root/train/good/000.png ...
    root/test/good/000.png ...
    root/test/<defect>/000.png ...
    root/ground_truth/<defect>/000_mask.png ...

Images are 8-bit RGB PNGs; masks are single-channel 8-bit PNGs (255 inside the defect, 0 elsewhere).
Each image gets its own numpy Generator seeded from SeedSequence([seed, split, index]), so an image
does not depend on how many images the other splits hold, and equal arguments give byte-identical files.

The texture is a brick-offset lattice of small pile loops (period ~8 px at 256 px) in beige/brown
tones, shaded as bumps under a directional light, with per-image shift, small rotation, lighting
gain and gradient, and fibre noise. Every defect is drawn as an exact binary mask first and then
composited through that mask, so the mask is exactly the set of pixels the defect changed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from stages.core.errors import PipelineError

DEFECT_TYPES = ("color", "cut", "hole", "metal_contamination", "thread")

# Split indices for the seed sequence; defect k (index in DEFECT_TYPES, not in the caller's subset)
# uses 2 + k, so asking for fewer defect types leaves the other images unchanged.
_SPLIT_TRAIN = 0
_SPLIT_TEST_GOOD = 1
_SPLIT_DEFECT0 = 2

_PNG_OPTIONS = dict(format="PNG", optimize=False, compress_level=6)


# --------------------------------------------------------------------------- argument checks


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_args(image_size, n_train, n_test_good, n_test_per_defect, seed, defect_types) -> tuple[str, ...]:
    if not _is_int(image_size) or image_size < 32:
        raise PipelineError(f"data.synthetic.image_size must be an integer >= 32, got {image_size!r}")
    for name, value in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_per_defect", n_test_per_defect)):
        if not _is_int(value) or value < 0:
            raise PipelineError(f"data.synthetic.{name} must be a non-negative integer, got {value!r}")
    if n_train == 0:
        raise PipelineError("data.synthetic.n_train must be >= 1, got 0")
    if not _is_int(seed) or seed < 0:
        raise PipelineError(f"data.synthetic.seed must be a non-negative integer, got {seed!r}")
    if isinstance(defect_types, (str, bytes)) or not isinstance(defect_types, Sequence):
        raise PipelineError(f"data.synthetic.defect_types must be a list of names from {list(DEFECT_TYPES)}, got {defect_types!r}")
    defect_types = tuple(defect_types)
    unknown = [d for d in defect_types if d not in DEFECT_TYPES]
    if unknown:
        raise PipelineError(f"data.synthetic.defect_types: unknown defect type(s) {unknown}, known: {list(DEFECT_TYPES)}")
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


def _carpet(rng: np.random.Generator, size: int) -> np.ndarray:
    """A looped-pile carpet texture: float32 (size, size, 3) in [0, 1]."""
    s = size / 256.0
    period_u = rng.uniform(7.0, 9.0) * s  # loop spacing along a row, px
    period_v = period_u * rng.uniform(0.85, 1.0)  # row spacing, px
    theta = math.radians(rng.uniform(-4.0, 4.0))
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

    # Lighting: global gain and a gentle linear gradient.
    gain = rng.uniform(0.9, 1.1)
    grad_angle = rng.uniform(0.0, 2.0 * math.pi)
    grad = rng.uniform(0.0, 0.12) * ((xx - size / 2) * math.cos(grad_angle) + (yy - size / 2) * math.sin(grad_angle)) / size
    intensity = intensity * gain * (1.0 + grad)

    beige = np.array([0.68, 0.56, 0.42], np.float32)
    brown = np.array([0.60, 0.45, 0.33], np.float32)
    base = (beige + rng.uniform(0.0, 1.0) * (brown - beige)) * rng.uniform(0.94, 1.05)
    rgb = intensity[..., None] * base[None, None, :]
    rgb = rgb + rng.normal(0.0, 0.018, (size, size, 1)).astype(np.float32)  # fine grain (luminance)
    rgb = rgb + rng.normal(0.0, 0.006, (size, size, 3)).astype(np.float32)  # slight chroma grain
    return np.clip(rgb, 0.0, 1.0)


# --------------------------------------------------------------------------- defect helpers


def _blank(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (size, size), 0)
    return img, ImageDraw.Draw(img)


def _to_mask(img: Image.Image) -> np.ndarray:
    return np.asarray(img) > 0


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r + r  # a slightly fuller disc reads better at small radii


def _centre(rng: np.random.Generator, size: int, extent: float) -> np.ndarray:
    """A random centre such that a shape reaching `extent` px from it stays inside the margin."""
    margin = 0.09 * size
    lo = margin + extent
    hi = size - margin - extent
    if hi <= lo:
        return np.array([size / 2.0, size / 2.0])
    return rng.uniform(lo, hi, size=2)


def _lum(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], np.float32)


def _bezier(points: np.ndarray, n: int) -> np.ndarray:
    """Points on a Bezier curve of any degree (de Casteljau), shape (n, 2)."""
    t = np.linspace(0.0, 1.0, n)[:, None, None]
    pts = np.broadcast_to(points[None], (n,) + points.shape).astype(np.float64)
    while pts.shape[1] > 1:
        pts = (1.0 - t) * pts[:, :-1] + t * pts[:, 1:]
    return pts[:, 0]


def _clip_points(points: np.ndarray, size: int) -> np.ndarray:
    margin = 0.09 * size
    return np.clip(points, margin, size - 1 - margin)


# --------------------------------------------------------------------------- defects
# Each returns (mask, changed): `changed` is the defective version of the whole image; only the
# pixels under `mask` are taken from it.


def _defect_color(rng, img):
    size = img.shape[0]
    s = size / 256.0
    radius = rng.uniform(14.0, 28.0) * s
    centre = _centre(rng, size, radius * 1.3)
    canvas, draw = _blank(size)
    for _ in range(int(rng.integers(3, 6))):
        off = rng.normal(0.0, 0.35 * radius, 2)
        rx, ry = rng.uniform(0.45, 0.85, 2) * radius
        cx, cy = _clip_points(centre + off, size)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    mask = _to_mask(canvas)
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


def _defect_cut(rng, img):
    size = img.shape[0]
    s = size / 256.0
    length = rng.uniform(0.3, 0.6) * size
    angle = rng.uniform(0.0, math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    half = 0.5 * length * np.abs(direction)
    margin = 0.09 * size
    centre = np.array(
        [rng.uniform(margin + half[i], size - margin - half[i]) if size - 2 * margin > 2 * half[i] else size / 2 for i in range(2)]
    )
    bend = rng.uniform(-0.08, 0.08) * length
    ctrl = np.stack([centre - 0.5 * length * direction, centre + bend * normal, centre + 0.5 * length * direction])
    pts = _clip_points(_bezier(_clip_points(ctrl, size), 64), size)
    width = max(1, int(round(rng.uniform(2.0, 4.0) * s)))
    canvas, draw = _blank(size)
    draw.line([tuple(p) for p in pts], fill=255, width=width, joint="curve")
    gap = _to_mask(canvas)
    if not gap.any():
        gap[int(centre[1]), int(centre[0])] = True
    # Severed fibre ends: a ragged lighter band along both edges of the gap.
    rim_width = max(1, int(round(1.2 * s)))
    band = ndimage.binary_dilation(gap, structure=_disk(rim_width)) & ~gap
    ragged = ndimage.binary_dilation(gap, structure=_disk(rim_width + 1)) & ~gap & ~band
    ragged &= rng.random(gap.shape) < 0.35
    ends = band | ragged
    mask = gap | ends
    changed = img.copy()
    dark = img * rng.uniform(0.15, 0.25) + 0.02 * rng.random(img.shape[:2] + (1,)).astype(np.float32)
    light = np.clip(img * rng.uniform(1.35, 1.55) + 0.1 + 0.05 * rng.standard_normal(img.shape[:2] + (1,)).astype(np.float32), 0, 1)
    changed[gap] = dark[gap]
    changed[ends] = light[ends]
    return mask, changed


def _polygon_blob(rng, centre, radius, n_vertices, jitter):
    angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, n_vertices))
    radii = radius * (1.0 - jitter * rng.random(n_vertices))
    return [(centre[0] + r * math.cos(a), centre[1] + r * math.sin(a)) for a, r in zip(angles, radii)]


def _defect_hole(rng, img):
    size = img.shape[0]
    s = size / 256.0
    radius = max(rng.uniform(10.0, 22.0) * s, 3.0)
    centre = _centre(rng, size, radius)
    canvas, draw = _blank(size)
    draw.polygon(_polygon_blob(rng, centre, radius, int(rng.integers(9, 15)), 0.45), fill=255)
    # A second overlapping lobe makes the outline less regular.
    lobe_centre = centre + rng.normal(0.0, 0.35 * radius, 2)
    draw.polygon(_polygon_blob(rng, _clip_points(lobe_centre, size), 0.6 * radius, 9, 0.4), fill=255)
    mask = _to_mask(canvas)
    if not mask.any():
        mask[int(centre[1]), int(centre[0])] = True
    rim_width = max(1, int(round(1.5 * s)))
    inner = ndimage.binary_erosion(mask, structure=_disk(rim_width), border_value=1)
    rim = mask & ~inner
    changed = img.copy()
    changed[inner] = (img * 0.1 + 0.012)[inner]  # near black, texture faintly visible
    changed[rim] = (img * 0.25)[rim]  # torn, shadowed edge
    return mask, changed


def _defect_metal(rng, img):
    size = img.shape[0]
    s = size / 256.0
    radius = max(rng.uniform(6.0, 11.0) * s, 2.0)
    centre = _centre(rng, size, radius)
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
    mask = _to_mask(canvas)
    if not mask.any():
        mask[int(centre[1]), int(centre[0])] = True
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


def _defect_thread(rng, img):
    size = img.shape[0]
    s = size / 256.0
    length = rng.uniform(0.25, 0.5) * size
    angle = rng.uniform(0.0, 2.0 * math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    start = _centre(rng, size, 0.0)
    start = start - 0.5 * length * direction  # roughly centre the strand on the random point
    ctrl = np.stack(
        [
            start,
            start + length * (0.33 * direction + rng.uniform(-0.5, 0.5) * normal),
            start + length * (0.66 * direction + rng.uniform(-0.5, 0.5) * normal),
            start + length * direction,
        ]
    )
    pts = _bezier(_clip_points(ctrl, size), 96)
    width = max(1, int(round(rng.uniform(2.0, 3.2) * s)))
    canvas, draw = _blank(size)
    draw.line([tuple(p) for p in pts], fill=255, width=width, joint="curve")
    mask = _to_mask(canvas)
    if not mask.any():
        p = pts[len(pts) // 2]
        mask[int(p[1]), int(p[0])] = True
    colours = np.array(
        [[0.12, 0.16, 0.40], [0.92, 0.90, 0.85], [0.08, 0.08, 0.08], [0.72, 0.12, 0.10], [0.15, 0.45, 0.18]],
        np.float32,
    )
    colour = colours[rng.integers(len(colours))] * rng.uniform(0.9, 1.05)
    # Shading: rounded across the strand (brighter along its middle), twisted along it.
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    across = np.clip(depth / (0.5 * width + 0.5), 0.0, 1.0)
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


# --------------------------------------------------------------------------- public API


def render_image(seed: int, split_index: int, image_index: int, image_size: int, defect: str | None = None):
    """One image (uint8 HxWx3) and, for a defect, its mask (bool HxW); mask is None for good images."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_index, image_index]))
    img = _carpet(rng, image_size)
    mask = None
    if defect is not None:
        mask, changed = _DEFECTS[defect](rng, img)
        img = np.where(mask[..., None], changed, img)
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out, mask


def _save(array: np.ndarray, path: Path) -> None:
    mode = "RGB" if array.ndim == 3 else "L"
    Image.fromarray(array, mode=mode).save(path, **_PNG_OPTIONS)


def generate_category(
    root: Path,
    image_size: int = 256,
    n_train: int = 100,
    n_test_good: int = 20,
    n_test_per_defect: int = 8,
    seed: int = 0,
    defect_types=DEFECT_TYPES,
) -> None:
    """Write a synthetic carpet category in MVTec AD layout under `root` (created if missing).

    `root` must not already hold train/, test/ or ground_truth/ (stale files would mix in).
    """
    defect_types = _check_args(image_size, n_train, n_test_good, n_test_per_defect, seed, defect_types)
    root = Path(root)
    existing = [name for name in ("train", "test", "ground_truth") if (root / name).exists()]
    if existing:
        raise PipelineError(f"{root}: already contains {', '.join(existing)}/ (generate into an empty directory)")

    def write_split(folder: Path, split_index: int, count: int, defect: str | None, mask_folder: Path | None):
        folder.mkdir(parents=True, exist_ok=True)
        if mask_folder is not None:
            mask_folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = render_image(seed, split_index, i, image_size, defect)
            _save(image, folder / f"{i:03d}.png")
            if mask_folder is not None:
                _save(mask.astype(np.uint8) * 255, mask_folder / f"{i:03d}_mask.png")

    root.mkdir(parents=True, exist_ok=True)
    write_split(root / "train" / "good", _SPLIT_TRAIN, n_train, None, None)
    write_split(root / "test" / "good", _SPLIT_TEST_GOOD, n_test_good, None, None)
    for defect in defect_types:
        split_index = _SPLIT_DEFECT0 + DEFECT_TYPES.index(defect)
        write_split(root / "test" / defect, split_index, n_test_per_defect, defect, root / "ground_truth" / defect)
