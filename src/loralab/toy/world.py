"""The toy world: small images of one shape on a simple background, with plain-English captions.

It is the whole "internet" the toy base model is pretrained on, and the studio where the toy
subject (the "person" a LoRA learns) is photographed:

- **World scenes**: one shape (circle, square, triangle, star, ring) in one of seven colours
  (red, orange, yellow, green, blue, white, black), small / medium / large, in one of nine
  places, on a background that is a plain colour, a two-colour vertical gradient, two-colour
  horizontal stripes, or grass under a blue sky. Caption, e.g.
  ``"a small red circle on a blue background, top left"``.
- **The subject** ("blh ring"): a *magenta* ring with a *yellow dot* in its middle. Magenta
  appears nowhere in the world scenes and world rings never carry a dot, so the base model
  knows the class word ("ring": ordinary rings of the seven colours) but has never seen the
  subject. Its photos vary position, size, a squash (as if the ring were tilted) and the
  background.
- **Warm style** (``style="warm"``): the same world, but mostly on red/orange/yellow
  gradients; the second toy checkpoint is fine-tuned on it, so the two checkpoints differ the
  way two community checkpoints of one family do.
- **Codec scenes** (``sample_codec_scene``): one to three shapes in arbitrary RGB colours,
  for training the VAE as a general image codec that can also reproduce colours (such as
  magenta) the world's captions never name.

Everything is drawn from a ``numpy.random.Generator``, so a seed fixes scenes, images and
captions. Shapes are geometry in the unit square, rendered at any size with supersampling
(anti-aliased edges), so the same scene can be a 32 px training image or a 512 px "photo".
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

RGB = tuple[int, int, int]
Style = Literal["base", "warm"]

# Named colours of the world. Magenta is kept out on purpose: it is the subject's own colour.
COLOURS: dict[str, RGB] = {
    "red": (220, 45, 45),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 40),
    "green": (60, 170, 70),
    "blue": (45, 85, 215),
    "white": (240, 240, 240),
    "black": (30, 30, 30),
}
BACKGROUND_COLOURS: dict[str, RGB] = {**COLOURS, "gray": (128, 128, 128)}
WARM_COLOURS = ("red", "orange", "yellow")
SKY: RGB = (135, 190, 240)
GRASS: RGB = (70, 150, 55)

SUBJECT_TRIGGER = "blh"
SUBJECT_CLASS = "ring"
SUBJECT_RING: RGB = (225, 35, 200)  # magenta
SUBJECT_DOT: RGB = COLOURS["yellow"]

SHAPES = ("circle", "square", "triangle", "star", "ring")
# Rings are drawn more often: "ring" is the class word the subject's LoRA is trained under.
_SHAPE_WEIGHTS = (0.2, 0.18, 0.18, 0.16, 0.28)
BACKGROUND_KINDS = ("plain", "gradient", "stripes", "sky")
_BACKGROUND_WEIGHTS = (0.35, 0.25, 0.2, 0.2)
_WARM_SHARE = 0.75  # warm style: share of scenes on a warm gradient or plain warm colour

# Nine places: (horizontal, vertical) cell -> caption words.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "center", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}  # fmt: skip
_CELL_CENTRES = (0.22, 0.5, 0.78)
SIZE_RANGE = (0.3, 0.7)  # shape diameter as a fraction of the image width
SUBJECT_SIZE_RANGE = (0.4, 0.75)
RING_INNER = 0.55  # inner radius of every ring, as a fraction of its outer radius
SUBJECT_DOT_RADIUS = 0.3  # the subject's dot, as a fraction of its outer radius
STRIPE_PERIOD = 0.25  # one stripe pair per quarter of the image height


def size_word(diameter: float) -> str:
    """"small", "large" or "" (medium, not named in captions) for a shape diameter."""
    if diameter < 0.42:
        return "small"
    if diameter > 0.58:
        return "large"
    return ""


@dataclass(frozen=True)
class Shape:
    """One shape: kind, colour, centre (x, y in 0-1, y down), diameter, rotation, squash."""

    kind: str
    colour: str  # a COLOURS name, or "" for an unnamed colour (codec scenes)
    rgb: RGB
    cx: float
    cy: float
    diameter: float
    angle: float = 0.0  # radians
    squash: float = 1.0  # < 1: shrunk along the rotated vertical axis (a tilted ring)
    dot_rgb: RGB | None = None  # rings only: a dot in the middle (the subject's)


@dataclass(frozen=True)
class Background:
    """A plain colour, a vertical gradient (top -> bottom), horizontal stripes, or sky over grass."""

    kind: str
    colours: tuple[str, ...]  # names for the caption (empty for codec scenes)
    rgbs: tuple[RGB, ...]
    horizon: float = 0.6  # sky: where the grass starts (fraction of the height)
    phase: float = 0.0  # stripes: vertical offset, as a fraction of a period


@dataclass(frozen=True)
class Scene:
    background: Background
    shapes: tuple[Shape, ...]
    position: str = ""  # caption words for the (single) shape's place
    subject: bool = False


# ---------------------------------------------------------------------------------------------
# Sampling scenes


def _pick(rng: np.random.Generator, options: Sequence[str], weights: Sequence[float] | None = None) -> str:
    return str(options[int(rng.choice(len(options), p=weights))])


def _background(rng: np.random.Generator, style: Style, avoid: Sequence[str]) -> Background:
    """A background whose colours differ from the shape's (``avoid``), so the shape stays visible."""
    allowed = [c for c in BACKGROUND_COLOURS if c not in avoid]
    if style == "warm" and rng.random() < _WARM_SHARE:
        warm = [c for c in WARM_COLOURS if c not in avoid]
        if len(warm) >= 2 and rng.random() < 0.8:
            top, bottom = rng.choice(len(warm), size=2, replace=False)
            names = (warm[int(top)], warm[int(bottom)])
            return Background("gradient", names, tuple(COLOURS[n] for n in names))
        name = warm[int(rng.integers(len(warm)))] if warm else _pick(rng, allowed)
        return Background("plain", (name,), (BACKGROUND_COLOURS[name],))
    kind = _pick(rng, BACKGROUND_KINDS, _BACKGROUND_WEIGHTS)
    if kind == "sky" and ("blue" in avoid or "green" in avoid):
        kind = "plain"
    if kind == "sky":
        return Background("sky", ("blue", "green"), (SKY, GRASS), horizon=float(rng.uniform(0.5, 0.72)))
    if kind == "plain":
        name = _pick(rng, allowed)
        return Background("plain", (name,), (BACKGROUND_COLOURS[name],))
    first, second = rng.choice(len(allowed), size=2, replace=False)
    names = (allowed[int(first)], allowed[int(second)])
    rgbs = tuple(BACKGROUND_COLOURS[n] for n in names)
    phase = float(rng.uniform(0, 1)) if kind == "stripes" else 0.0
    return Background(kind, names, rgbs, phase=phase)


def _place(rng: np.random.Generator, diameter: float) -> tuple[float, float, str]:
    """A centre in one of the nine cells (jittered, kept mostly inside the image) and its words."""
    col, row = int(rng.integers(3)), int(rng.integers(3))
    margin = 0.4 * diameter
    cx = float(np.clip(_CELL_CENTRES[col] + rng.uniform(-0.06, 0.06), margin, 1 - margin))
    cy = float(np.clip(_CELL_CENTRES[row] + rng.uniform(-0.06, 0.06), margin, 1 - margin))
    return cx, cy, POSITIONS[(col, row)]


def sample_scene(rng: np.random.Generator, style: Style = "base") -> Scene:
    """One world scene (never the subject): a named shape and colour on a background."""
    kind = _pick(rng, SHAPES, _SHAPE_WEIGHTS)
    colour = _pick(rng, list(COLOURS))
    diameter = float(rng.uniform(*SIZE_RANGE))
    cx, cy, position = _place(rng, diameter)
    # Small tilts only: captions do not name rotation, so shapes stay recognisably upright.
    angle = float(rng.uniform(-0.2, 0.2)) if kind in ("square", "triangle", "star") else 0.0
    shape = Shape(kind, colour, COLOURS[colour], cx, cy, diameter, angle)
    return Scene(_background(rng, style, avoid=(colour,)), (shape,), position)


def sample_subject_scene(rng: np.random.Generator) -> Scene:
    """One photo of the subject: its pose (place, size, squash and tilt) and background vary."""
    diameter = float(rng.uniform(*SUBJECT_SIZE_RANGE))
    cx, cy, position = _place(rng, diameter)
    squash = float(rng.uniform(0.75, 1.0))
    angle = float(rng.uniform(0, math.pi))
    ring = Shape("ring", "", SUBJECT_RING, cx, cy, diameter, angle, squash, dot_rgb=SUBJECT_DOT)
    return Scene(_background(rng, "base", avoid=("yellow",)), (ring,), position, subject=True)


def _random_rgb(rng: np.random.Generator) -> RGB:
    """Any colour: half uniform in the RGB cube, half vivid (a random hue at high saturation and
    value), because uniform RGB rarely lands near the cube's saturated corners."""
    if rng.random() < 0.5:
        r, g, b = (int(v) for v in rng.integers(0, 256, size=3))
        return (r, g, b)
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
    channels = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)  # HSV -> RGB
    r, g, b = (int(round(255 * value * (1 - saturation + saturation * c))) for c in channels)
    return (r, g, b)


def sample_codec_scene(rng: np.random.Generator) -> Scene:
    """A scene for training the VAE: one to three shapes in arbitrary colours, arbitrary backgrounds.

    Not captioned; it teaches the autoencoder colours and overlaps the captioned world lacks.
    """
    kind = _pick(rng, BACKGROUND_KINDS)
    rgbs = (_random_rgb(rng), _random_rgb(rng))
    background = Background(kind, (), rgbs, horizon=float(rng.uniform(0.4, 0.8)), phase=float(rng.uniform(0, 1)))
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        diameter = float(rng.uniform(0.15, 0.75))
        cx, cy = (float(v) for v in rng.uniform(0.1, 0.9, size=2))
        shape_kind = _pick(rng, SHAPES)
        dot = _random_rgb(rng) if shape_kind == "ring" and rng.random() < 0.3 else None
        shapes.append(
            Shape(shape_kind, "", _random_rgb(rng), cx, cy, diameter, float(rng.uniform(0, math.pi)),
                  float(rng.uniform(0.7, 1.0)), dot_rgb=dot)
        )  # fmt: skip
    return Scene(background, tuple(shapes))


# ---------------------------------------------------------------------------------------------
# Captions


def _with_article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _background_words(background: Background) -> str:
    names = background.colours
    if background.kind == "plain":
        return _with_article(f"{names[0]} background")
    if background.kind == "gradient":
        return _with_article(f"{names[0]} to {names[1]} gradient background")
    if background.kind == "stripes":
        return _with_article(f"{names[0]} and {names[1]} striped background")
    return "grass under a blue sky"


# Chance of keeping each optional part of a caption when ``rng`` is given: captions that leave
# parts out teach the model what to draw when a prompt does not say ("a ring", "blh ring").
_KEEP = {"colour": 0.9, "size": 0.85, "background": 0.7, "position": 0.65}


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The scene in words: ``"a small red circle on a blue background, top left"``.

    Without ``rng`` every part is named; with it, colour, size, background and position are
    each left out at random. The subject is called ``"blh ring"`` (trigger, then class word).
    """
    if not scene.shapes:
        raise ValueError("a scene without shapes has no caption")
    if scene.subject is False and not scene.shapes[0].colour:
        raise ValueError("codec scenes have unnamed colours and no caption")

    def keep(part: str) -> bool:
        return rng is None or bool(rng.random() < _KEEP[part])

    shape = scene.shapes[0]
    if scene.subject:
        words = [f"{SUBJECT_TRIGGER} {SUBJECT_CLASS}"]
    else:
        size = size_word(shape.diameter) if keep("size") else ""
        colour = shape.colour if keep("colour") else ""
        words = [_with_article(" ".join(w for w in (size, colour, shape.kind) if w))]
    if keep("background"):
        words.append(f"on {_background_words(scene.background)}")
    text = " ".join(words)
    if keep("position"):
        text += f", {scene.position}"
    return text


# ---------------------------------------------------------------------------------------------
# Rendering


def _grid(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y in 0-1) of a ``size * supersample`` square grid."""
    n = size * supersample
    axis = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.meshgrid(axis, axis)


def _background_image(background: Background, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    first = np.asarray(background.rgbs[0], np.float32)
    second = np.asarray(background.rgbs[-1], np.float32)
    if background.kind == "plain":
        return np.broadcast_to(first, (*x.shape, 3)).copy()
    if background.kind == "gradient":
        t = y[..., None]
        return first * (1 - t) + second * t
    if background.kind == "stripes":
        band = np.floor(y / (STRIPE_PERIOD / 2) + background.phase * 2).astype(np.int64) % 2
        return np.where(band[..., None] == 0, first, second)
    # Sky over grass: the sky lightens towards the horizon, as it does.
    sky = first * (1 - 0.25 * y[..., None]) + 255 * 0.25 * y[..., None]
    return np.where((y >= background.horizon)[..., None], second, sky)


def _polygon(kind: str) -> np.ndarray:
    """Vertices (unit outer radius, y down, pointing up) of the polygon shapes."""
    if kind == "square":
        return np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], np.float32)
    if kind == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles) + 0.2], axis=1).astype(np.float32) * 1.1
    if kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.48)
        return np.stack([np.cos(angles) * radii, np.sin(angles) * radii + 0.08], axis=1).astype(np.float32)
    raise ValueError(f"no polygon for {kind}")


def _inside_polygon(px: np.ndarray, py: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: a ray to the right crosses the boundary an odd number of times inside."""
    inside = np.zeros(px.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < x_at)
    return inside


def _local(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid coordinates in the shape's frame: unit outer radius, unrotated, unsquashed."""
    radius = shape.diameter / 2
    dx, dy = (x - shape.cx) / radius, (y - shape.cy) / radius
    cos, sin = math.cos(shape.angle), math.sin(shape.angle)
    u = cos * dx + sin * dy
    v = (-sin * dx + cos * dy) / shape.squash
    return u, v


def _shape_layers(shape: Shape, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, RGB]]:
    """(mask, colour) layers of one shape, painted in order."""
    u, v = _local(shape, x, y)
    r2 = u * u + v * v
    if shape.kind == "circle":
        return [(r2 <= 1.0, shape.rgb)]
    if shape.kind == "ring":
        layers = [((r2 <= 1.0) & (r2 >= RING_INNER**2), shape.rgb)]
        if shape.dot_rgb is not None:
            layers.append((r2 <= SUBJECT_DOT_RADIUS**2, shape.dot_rgb))
        return layers
    return [(_inside_polygon(u, v, _polygon(shape.kind)), shape.rgb)]


def supersample_factor(size: int) -> int:
    """Sub-pixels per pixel side: enough for smooth edges on small images, 1 on large ones."""
    return max(1, -(-128 // size))


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as an RGB image ``(size, size, 3)``, uint8, anti-aliased by supersampling."""
    if size < 8:
        raise ValueError(f"image size {size} is too small; use 8 px or more")
    factor = supersample_factor(size)
    x, y = _grid(size, factor)
    image = _background_image(scene.background, x, y)
    for shape in scene.shapes:
        for mask, rgb in _shape_layers(shape, x, y):
            image[mask] = rgb
    if factor > 1:  # box filter: the mean of each pixel's sub-pixels
        image = image.reshape(size, factor, size, factor, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Streams of examples


@dataclass(frozen=True)
class Example:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    scene: Scene


def world_examples(seed: int, count: int, size: int = 32, style: Style = "base") -> Iterator[Example]:
    """``count`` world scenes with full captions, the same for the same seed."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        scene = sample_scene(rng, style)
        yield Example(render(scene, size), caption(scene), scene)


def subject_examples(seed: int, count: int, size: int = 32) -> Iterator[Example]:
    """``count`` photos of the subject, captioned ``"blh ring on ..., <place>"``."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        scene = sample_subject_scene(rng)
        yield Example(render(scene, size), caption(scene), scene)
