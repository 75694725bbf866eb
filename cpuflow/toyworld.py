"""A tiny synthetic world for cpuflow's default model: checkable by program.

Pictures are 64x64 RGB: one flat-coloured shape (circle, square or an upward
triangle) on a flat background.  The module is torch-free (numpy + PIL only):

* ``render(attrs, seed)`` draws the ground truth (size/position vary with seed),
* ``format_prompt`` / ``sample_prompt`` / ``parse_prompt`` give the prompt
  grammar (several wordings per picture; some wordings are held out of
  training, see ``HELD_OUT_TEMPLATES``),
* ``held_out_prompts()`` is the fixed evaluation list (72 prompts),
* ``analyze(image)`` reads the attributes back from a picture and
  ``evaluate(image, attrs)`` says which are right; ``accuracy`` sums up.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Iterable, Mapping, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (250, 225, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "purple": (140, 40, 175),
    "orange": (250, 135, 10),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "background")

_PALETTE_ARR = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


class Attrs(NamedTuple):
    """What a picture shows: shape colour, shape class, background colour."""

    color: str
    shape: str
    background: str


def _as_attrs(attrs: Attrs | Mapping[str, str] | tuple) -> Attrs:
    if isinstance(attrs, Attrs):
        return attrs
    if isinstance(attrs, Mapping):
        return Attrs(attrs["color"], attrs["shape"], attrs["background"])
    return Attrs(*attrs)


def all_attrs() -> list[Attrs]:
    """All 8 * 7 * 3 = 168 pictures kinds (shape colour != background)."""
    return [
        Attrs(c, s, b)
        for c, s, b in itertools.product(COLORS, SHAPES, COLORS)
        if c != b
    ]


# --------------------------------------------------------------------------
# prompt grammar
# --------------------------------------------------------------------------

#: wordings used for training ({c}: shape colour, {s}: shape, {b}: background)
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {c} {s} on a {b} background",
    "{c} {s}, {b} background",
    "a {c} {s} on {b}",
    "a {s} in {c} on a {b} background",
    "a {b} background with a {c} {s}",
    "a {c} {s} on a {b} backdrop",
    "{c} {s} against {b}",
    "a picture of a {c} {s} on a {b} background",
)

#: wordings never shown in training (recombine known words)
HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "a {s} in {c} on {b}",
    "a {c} {s} against a {b} backdrop",
    "{c} {s} on a {b} background",
    "a {b} backdrop with a {c} {s}",
)

ALL_TEMPLATES = TRAIN_TEMPLATES + HELD_OUT_TEMPLATES


def format_prompt(attrs, template: str = TRAIN_TEMPLATES[0]) -> str:
    a = _as_attrs(attrs)
    return template.format(c=a.color, s=a.shape, b=a.background)


def sample_prompt(attrs, rng: random.Random | int | None = None,
                  templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
    """A training wording for ``attrs``, chosen by ``rng`` (deterministic)."""
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    return format_prompt(attrs, templates[rng.randrange(len(templates))])


def vocabulary() -> list[str]:
    """Every word (and punctuation token) the world's prompts use."""
    words: set[str] = set(COLORS) | set(SHAPES)
    for t in ALL_TEMPLATES:
        for w in re.findall(r"[a-z]+|[^\sa-z{}]", re.sub(r"\{[csb]\}", " ", t)):
            words.add(w)
    return sorted(words)


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)


def _template_regex(t: str) -> re.Pattern:
    pat = re.escape(t)
    pat = pat.replace(r"\{c\}", f"(?P<c>{_COLOR_RE})")
    pat = pat.replace(r"\{s\}", f"(?P<s>{_SHAPE_RE})")
    pat = pat.replace(r"\{b\}", f"(?P<b>{_COLOR_RE})")
    return re.compile("^" + pat + "$")


_TEMPLATE_RES = [_template_regex(t) for t in ALL_TEMPLATES]


def parse_prompt(prompt: str) -> Attrs | None:
    """Attributes a prompt asks for, or None when it is not about this world.

    Exact grammar first; then a lenient reading: the shape word, the colour
    next to "background"/"backdrop" or after "on"/"against" is the background.
    """
    p = " ".join(prompt.lower().strip().rstrip(".").split())
    for rx in _TEMPLATE_RES:
        m = rx.match(p)
        if m:
            return Attrs(m["c"], m["s"], m["b"])
    words = re.findall(r"[a-z]+", p)
    shapes = [w for w in words if w in SHAPES]
    cols = [(i, w) for i, w in enumerate(words) if w in PALETTE]
    if len(shapes) != 1 or len(cols) != 2:
        return None
    bg = None
    for i, w in cols:
        nxt = words[i + 1] if i + 1 < len(words) else ""
        prev = words[i - 1] if i > 0 else ""
        prev2 = words[i - 2] if i > 1 else ""
        if nxt in ("background", "backdrop") or prev in ("on", "against", "over") \
                or prev2 in ("on", "against", "over"):
            bg = (i, w)
            break
    if bg is None:
        bg = cols[1]
    fg = cols[0] if cols[1] == bg else cols[1]
    if fg[1] == bg[1]:
        return None
    return Attrs(fg[1], shapes[0], bg[1])


def held_out_prompts(n: int = 72) -> list[tuple[str, Attrs]]:
    """Fixed evaluation list: held-out wordings x a balanced set of pictures.

    Every held-out template gets n/4 prompts; shapes cycle; colour pairs come
    from a fixed permutation of the 56 ordered pairs.
    """
    pairs = [(c, b) for c in COLORS for b in COLORS if c != b]
    order = random.Random(20240607).sample(pairs, len(pairs))
    out = []
    for i in range(n):
        c, b = order[i % len(order)]
        a = Attrs(c, SHAPES[i % 3], b)
        t = HELD_OUT_TEMPLATES[i % len(HELD_OUT_TEMPLATES)]
        out.append((format_prompt(a, t), a))
    return out


# --------------------------------------------------------------------------
# renderer
# --------------------------------------------------------------------------

_SS = 4  # supersampling factor for anti-aliased edges


def shape_geometry(seed: int) -> tuple[float, float, float]:
    """(centre x, centre y, half size) in pixels for a seed: size/position variety."""
    r = random.Random(seed * 7919 + 17)
    half = r.uniform(13.0, 19.0)
    cx = IMAGE_SIZE / 2 + r.uniform(-6.0, 6.0)
    cy = IMAGE_SIZE / 2 + r.uniform(-6.0, 6.0)
    return cx, cy, half


def render(attrs, seed: int = 0, size: int = IMAGE_SIZE) -> Image.Image:
    """Deterministic picture of ``attrs``; ``seed`` sets size and position."""
    a = _as_attrs(attrs)
    if a.color == a.background:
        raise ValueError("shape colour must differ from background colour")
    cx, cy, h = shape_geometry(seed)
    k = _SS * size / IMAGE_SIZE
    big = Image.new("RGB", (size * _SS, size * _SS), PALETTE[a.background])
    d = ImageDraw.Draw(big)
    fill = PALETTE[a.color]
    x0, y0, x1, y1 = (cx - h) * k, (cy - h) * k, (cx + h) * k, (cy + h) * k
    if a.shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif a.shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif a.shape == "triangle":
        d.polygon([(cx * k, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {a.shape!r}")
    return big.resize((size, size), Image.BOX)


def render_array(attrs, seed: int = 0) -> np.ndarray:
    """``render`` as float32 HWC in [-1, 1] (the VAE's input range)."""
    return np.asarray(render(attrs, seed), dtype=np.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------
# evaluator
# --------------------------------------------------------------------------

def nearest_color(rgb) -> str:
    d = ((_PALETTE_ARR - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1)
    return COLORS[int(d.argmin())]


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 and arr.max() <= 1.0 + 1e-6:
        arr = arr * 255.0
    return arr.astype(np.float32)[..., :3]


def analyze(image, border: int = 2) -> dict:
    """Read the picture: background colour, shape colour, shape class.

    * background: majority palette colour of the ``border``-pixel frame;
    * shape colour: majority palette colour of pixels clearly unlike the
      background (distance > 60), the background colour excluded;
    * shape: the mask of pixels nearer the shape's colour than the
      background's (midpoint: blur-robust); triangle when the mean width of
      the top and bottom quarters of its bounding box differ a lot, else
      square when the box fill ratio > 0.89, else circle.
    Unreadable parts are None.  Extra measurements come back too.
    """
    arr = _to_array(image)
    h, w = arr.shape[:2]
    frame = np.ones((h, w), bool)
    frame[border:h - border, border:w - border] = False
    pix = arr.reshape(-1, 3)
    dist = ((pix[:, None, :] - _PALETTE_ARR[None]) ** 2).sum(-1)
    label = dist.argmin(1).reshape(h, w)
    bg_idx = int(np.bincount(label[frame], minlength=len(COLORS)).argmax())
    bg_rgb = np.median(arr[frame & (label == bg_idx)], axis=0)
    out: dict = {"background": COLORS[bg_idx], "color": None, "shape": None,
                 "fill": None, "width_ratio": None, "area": 0}
    far = np.sqrt(((arr - bg_rgb) ** 2).sum(-1)) > 60.0
    far &= ~frame
    cand = label[far]
    cand = cand[cand != bg_idx]
    if cand.size < 12:
        return out
    fg_idx = int(np.bincount(cand, minlength=len(COLORS)).argmax())
    out["color"] = COLORS[fg_idx]
    sel = far & (label == fg_idx)
    fg_rgb = np.median(arr[sel], axis=0)
    axis = fg_rgb - bg_rgb
    t = ((arr - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6)
    mask = t > 0.5
    mask &= ~frame
    out["area"] = int(mask.sum())
    if mask.sum() < 12:
        return out
    rows = mask.sum(1)
    cols = mask.sum(0)
    rthr = max(1.0, 0.08 * rows.max())
    cthr = max(1.0, 0.08 * cols.max())
    ry = np.nonzero(rows > rthr)[0]
    cx = np.nonzero(cols > cthr)[0]
    y0, y1, x0, x1 = ry[0], ry[-1] + 1, cx[0], cx[-1] + 1
    box = mask[y0:y1, x0:x1]
    fill = float(box.mean())
    bh = y1 - y0
    q = max(1, bh // 4)
    top = box[:q].sum(1).mean()
    bot = box[-q:].sum(1).mean()
    wr = float(min(top, bot) / max(top, bot, 1e-6))
    if wr < 0.5:
        shape = "triangle"
    elif fill > 0.89:
        shape = "square"
    else:
        shape = "circle"
    out.update(shape=shape, fill=fill, width_ratio=wr)
    return out


def evaluate(image, attrs) -> dict[str, bool]:
    """Which of the attributes (color, shape, background) the image shows."""
    a = _as_attrs(attrs)
    got = analyze(image)
    return {k: got[k] == getattr(a, k) for k in ATTRIBUTES}


def accuracy(results: Iterable[Mapping[str, bool]]) -> dict[str, float]:
    """Per-attribute accuracy of ``evaluate`` results, plus ``all`` (every one right)."""
    results = list(results)
    if not results:
        return {k: 0.0 for k in (*ATTRIBUTES, "all")}
    acc = {k: sum(bool(r[k]) for r in results) / len(results) for k in ATTRIBUTES}
    acc["all"] = sum(all(r[k] for k in ATTRIBUTES) for r in results) / len(results)
    return acc
