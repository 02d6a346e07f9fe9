"""Shapeset-3x2: the synthetic image task of Glorot & Bengio (2010), section 2.1, made here.

Each image is 32x32 grey levels in [0, 1] holding one or two shapes among triangle,
parallelogram and ellipse, "placed with random shape parameters (relative lengths
and/or angles), scaling, rotation, translation and grey-scale". Two shapes may
overlap by at most half the area of either; the label is the unordered set of shape
types present, so there are 9 classes::

    0 triangle   1 parallelogram   2 ellipse                          (one shape)
    3 triangle + triangle   4 triangle + parallelogram   5 triangle + ellipse
    6 parallelogram + parallelogram   7 parallelogram + ellipse   8 ellipse + ellipse

How a shape is drawn: a canonical shape (the triangle with vertices (-1, -1), (1, -1),
(-1, 1); the square [-1, 1]^2; the unit disc) goes through a random affine map
``p = c + R(theta) diag(sx, sy) [[1, k], [0, 1]] q``: rotation theta ~ U[0, 2 pi),
half-sizes sx, sy ~ U[0.12, 0.3] x 32 pixels (the relative lengths), shear
k ~ U[-0.6, 0.6] (the angles), and the centre c uniform over the positions that keep
the whole shape inside the image (translation). A pixel belongs to the shape when its
centre maps back into the canonical shape. The background and each shape get grey
levels ~ U[0, 1], a shape's at least :data:`MIN_CONTRAST` away from the background's;
the second shape is painted over the first.

Everything is vectorised over images with numpy and deterministic by ``seed``:
:func:`make_shapeset` draws about 5,000 images a second on one core.

The paper trains on-line on an unlimited stream; the lab draws a fixed set
(:data:`SHAPESET_NUM_SAMPLES` by default) small enough for its time budget.
"""

from __future__ import annotations

import math

import numpy as np

from gradwatch.errors import ConfigError

__all__ = [
    "SHAPES",
    "SHAPESET_CLASSES",
    "SHAPESET_NUM_SAMPLES",
    "SHAPESET_SEED",
    "IMAGE_SIZE",
    "MIN_CONTRAST",
    "MAX_OVERLAP",
    "make_shapeset",
]

SHAPES = ("triangle", "parallelogram", "ellipse")
# The 9 classes: each single shape, then each unordered pair (with repetition).
_PAIRS = [(a, b) for a in range(3) for b in range(a, 3)]
SHAPESET_CLASSES: tuple[str, ...] = tuple(SHAPES) + tuple(f"{SHAPES[a]} + {SHAPES[b]}" for a, b in _PAIRS)
IMAGE_SIZE = 32
SHAPESET_NUM_SAMPLES = 20000  # what `load_dataset("shapeset")` draws: 16,000 train, 4,000 test
SHAPESET_SEED = 1234  # the lab's fixed Shapeset-3x2 sample; the run seed picks the split
MIN_CONTRAST = 0.25  # |shape grey - background grey| >= this, so every shape is visible
MAX_OVERLAP = 0.5  # two shapes share at most half the area of either (the paper's rule)
_HALF_SIZE = (0.12, 0.3)  # half-sizes as fractions of the image side
_MAX_SHEAR = 0.6
_REDRAWS = 50


def _canonical_inside(kind: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x, y), each (n, P), lie in the canonical shape of ``kind`` (n,)."""
    inside = np.empty(x.shape, dtype=bool)
    for k in range(3):
        rows = kind == k
        if not rows.any():
            continue
        u, v = x[rows], y[rows]
        if k == 0:  # triangle (-1, -1), (1, -1), (-1, 1)
            inside[rows] = (u >= -1) & (v >= -1) & (u + v <= 0)
        elif k == 1:  # square [-1, 1]^2
            inside[rows] = (np.abs(u) <= 1) & (np.abs(v) <= 1)
        else:  # unit disc
            inside[rows] = u * u + v * v <= 1
    return inside


def _random_affine(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, 2, 2) maps R(theta) diag(sx, sy) shear(k), in pixels."""
    theta = rng.uniform(0.0, 2 * math.pi, n)
    sx, sy = (rng.uniform(*_HALF_SIZE, (2, n)) * size)
    shear = rng.uniform(-_MAX_SHEAR, _MAX_SHEAR, n)
    cos, sin = np.cos(theta), np.sin(theta)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    scale_shear = np.zeros((n, 2, 2))
    scale_shear[:, 0, 0], scale_shear[:, 0, 1], scale_shear[:, 1, 1] = sx, sx * shear, sy
    return rotation @ scale_shear


def _half_extent(kind: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-widths of the axis-aligned box around the shape, per axis, and the box centre's
    offset from the map's origin: the range of ``A q`` over the canonical shape.
    """
    # corners of the canonical polygons; for the disc, the exact bound is the row norm
    corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], dtype=float)  # square
    mapped = np.einsum("nij,pj->npi", a, corners)  # (n, 4, 2)
    tri = mapped[:, :3]
    lo = np.where(kind[:, None] == 0, tri.min(1), mapped.min(1))
    hi = np.where(kind[:, None] == 0, tri.max(1), mapped.max(1))
    disc = np.sqrt((a**2).sum(-1))  # (n, 2)
    lo = np.where(kind[:, None] == 2, -disc, lo)
    hi = np.where(kind[:, None] == 2, disc, hi)
    return (hi - lo) / 2, (hi + lo) / 2


def _draw_masks(rng: np.random.Generator, kind: np.ndarray, size: int) -> np.ndarray:
    """(n, size * size) boolean masks of shapes ``kind`` (n,) at random affine placements."""
    n = kind.shape[0]
    a = _random_affine(rng, n, size)
    half, offset = _half_extent(kind, a)
    # keep the whole shape inside the image: centre of its box in [half, size - half]
    room = np.maximum(size - 2 * half, 0.0)
    box_centre = half + rng.uniform(0.0, 1.0, (n, 2)) * room
    centre = box_centre - offset
    coords = np.arange(size, dtype=np.float32) + 0.5
    gx, gy = np.meshgrid(coords, coords, indexing="xy")  # x is the column, y the row
    dx = gx.ravel()[None] - centre[:, :1].astype(np.float32)  # (n, P)
    dy = gy.ravel()[None] - centre[:, 1:].astype(np.float32)
    inv = np.linalg.inv(a).astype(np.float32)  # (n, 2, 2): pixel offset -> canonical point
    qx = inv[:, 0, :1] * dx + inv[:, 0, 1:] * dy
    qy = inv[:, 1, :1] * dx + inv[:, 1, 1:] * dy
    return _canonical_inside(kind, qx, qy)


def make_shapeset(num_samples: int = SHAPESET_NUM_SAMPLES, seed: int = SHAPESET_SEED, *,
                  size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_samples`` Shapeset-3x2 images and their class (see the module's docs).

    Classes are balanced in expectation (each of the 9 with probability 1/9). Two-shape
    images whose shapes overlap by more than :data:`MAX_OVERLAP` of either's area are
    redrawn, as in the paper.

    Args:
        num_samples: number of images. Default: :data:`SHAPESET_NUM_SAMPLES`.
        seed: the generator's seed; the same seed gives the same images. Default:
            :data:`SHAPESET_SEED`.
        size: image side in pixels. Default: 32 (the paper's).

    Returns:
        ``x`` float32 (num_samples, 1, size, size) in [0, 1], ``y`` int64 (num_samples,)
        in ``range(9)`` (names in :data:`SHAPESET_CLASSES`).

    Raises:
        ConfigError: ``num_samples`` < 1, ``seed`` < 0 or ``size`` < 8.
    """
    for name, value, low in (("num_samples", num_samples, 1), ("seed", seed, 0), ("size", size, 8)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"make_shapeset: {name}={value!r}; expected an integer >= {low}")
    rng = np.random.default_rng(seed)
    n = int(num_samples)
    y = rng.integers(0, len(SHAPESET_CLASSES), n)
    pair = np.array([(c, -1) for c in range(3)] + _PAIRS)  # (9, 2) shape kinds; -1: no second shape
    kinds = pair[y]  # (n, 2)
    two = kinds[:, 1] >= 0
    first = _draw_masks(rng, kinds[:, 0], size)
    second = np.zeros_like(first)
    todo = np.flatnonzero(two)
    for attempt in range(_REDRAWS):  # redraw where the overlap is too large
        if todo.size == 0:
            break
        if attempt:  # a large first shape may leave no room: redraw both
            first[todo] = _draw_masks(rng, kinds[todo, 0], size)
        second[todo] = _draw_masks(rng, kinds[todo, 1], size)
        shared = (first[todo] & second[todo]).sum(1)
        area = np.minimum(first[todo].sum(1), second[todo].sum(1))
        todo = todo[shared > MAX_OVERLAP * area]
    if todo.size:  # never seen in practice: keep the second shape only where the first is not
        second[todo] &= ~first[todo]
    background = rng.uniform(0.0, 1.0, n).astype(np.float32)
    greys = np.stack([_contrasting(rng, background), _contrasting(rng, background)], 1).astype(np.float32)
    x = np.where(first, greys[:, :1], background[:, None])
    x = np.where(second & two[:, None], greys[:, 1:], x)
    return x.reshape(n, 1, size, size), y.astype(np.int64)


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """Grey levels ~ U[0, 1] at least MIN_CONTRAST from ``background`` (uniform on what is left)."""
    low_room = np.maximum(background - MIN_CONTRAST, 0.0)  # [0, bg - c]
    high_room = np.maximum(1.0 - (background + MIN_CONTRAST), 0.0)  # [bg + c, 1]
    u = rng.uniform(0.0, 1.0, background.shape) * (low_room + high_room)
    return np.where(u < low_room, u, background + MIN_CONTRAST + (u - low_room))
