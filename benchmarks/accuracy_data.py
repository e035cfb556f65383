"""Data sets for benchmarks/accuracy.py that need no download, each with a known structure.

    glyphs   1x28x28 grey digits drawn from the 21 TrueType fonts matplotlib ships (DejaVu, STIX,
             Computer Modern), each randomly thickened, rotated, sheared, scaled and elastically
             distorted, then framed as MNIST frames its digits (20x20 box, centred by mass): 10 classes
    shapes   3x32x32 colour images of six shapes (disc, square, triangle, cross, ring, bar) of random
             size, place, rotation and colours on a noisy background: 6 classes
    tabular  scikit-learn's make_classification: 20 features (8 informative, 4 redundant), 4 classes
             in 2 clusters each, 2% of labels flipped
    cancer   scikit-learn's bundled breast cancer table (569 rows, 30 features, 2 classes), each
             feature as sign(x) log(1 + |x|) (per row: it reads no other row, so it costs no privacy)

Every generator takes a seed: the rules in fedtrain/training_defaults.py were tuned on draws with other
seeds than the ones benchmarks/accuracy.py evaluates on (see its docstring).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf",
)  # fmt: skip


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"


def _glyph(text: str, font_path: Path, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    size = 64
    img = Image.new("L", (size, size), 0)
    font = ImageFont.truetype(str(font_path), 44)
    ImageDraw.Draw(img).text((size / 2, size / 2), text, fill=255, font=font, anchor="mm")
    width = int(rng.integers(0, 3))  # stroke: as drawn, or thickened by 1 or 2 pixels
    if width:
        img = img.filter(ImageFilter.MaxFilter(2 * width + 1))
    angle, shear = math.radians(rng.normal(0, 10)), rng.normal(0, 0.2)
    sx, sy = math.exp(rng.normal(0, 0.1)), math.exp(rng.normal(0, 0.1))
    m = np.array([[math.cos(angle) * sx, -math.sin(angle) + shear], [math.sin(angle), math.cos(angle) * sy]])
    offset = np.array([size / 2, size / 2]) - m @ np.array([size / 2, size / 2])
    coeffs = (m[0, 0], m[0, 1], offset[0], m[1, 0], m[1, 1], offset[1])
    img = img.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return _elastic(np.asarray(img, dtype=np.float32) / 255.0, rng, alpha=rng.uniform(0, 5), sigma=6.0)


def _elastic(arr: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter, map_coordinates

    dx = gaussian_filter(rng.uniform(-1, 1, arr.shape), sigma) * alpha * sigma
    dy = gaussian_filter(rng.uniform(-1, 1, arr.shape), sigma) * alpha * sigma
    y, x = np.meshgrid(np.arange(arr.shape[0]), np.arange(arr.shape[1]), indexing="ij")
    return map_coordinates(arr, [y + dy, x + dx], order=1, mode="constant")


def _mnist_frame(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """As MNIST frames its digits: the glyph's box scaled into 20x20, centred by its centre of mass in 28x28."""
    from PIL import Image
    from scipy.ndimage import center_of_mass, shift

    ys, xs = np.nonzero(arr > 0.05)
    if len(ys) == 0:
        return np.zeros((28, 28), np.float32)
    crop = arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scale = 20.0 / max(crop.shape)
    h, w = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    small = Image.fromarray((crop * 255).astype(np.uint8)).resize((w, h), Image.Resampling.LANCZOS)
    out = np.zeros((28, 28), np.float32)
    top, left = (28 - h) // 2, (28 - w) // 2
    out[top : top + h, left : left + w] = np.asarray(small, np.float32) / 255
    cy, cx = center_of_mass(out)
    out = shift(out, (14 - cy + rng.normal(0, 0.7), 14 - cx + rng.normal(0, 0.7)), order=1, mode="constant")
    return np.clip(out, 0, 1)


def glyphs(n: int, seed: int, chars: str = "0123456789") -> tuple[np.ndarray, np.ndarray]:
    """`n` 1x28x28 uint8 images of `chars` drawn from matplotlib's fonts, and their class ids."""
    rng = np.random.default_rng(seed)
    fonts = [_font_dir() / name for name in FONTS]
    x = np.zeros((n, 1, 28, 28), np.uint8)
    y = rng.integers(0, len(chars), n)
    for i in range(n):
        arr = _mnist_frame(_glyph(chars[y[i]], fonts[rng.integers(len(fonts))], rng), rng)
        arr = np.clip(arr + rng.normal(0, 0.03, arr.shape) * (arr > 0), 0, 1)
        x[i, 0] = (arr * 255).round().astype(np.uint8)
    return x, y.astype(np.int64)


def _bar(cx: float, cy: float, angle: float, length: float, width: float) -> list[tuple[float, float]]:
    ca, sa = math.cos(angle), math.sin(angle)
    return [
        (cx + ca * length - sa * width, cy + sa * length + ca * width),
        (cx + ca * length + sa * width, cy + sa * length - ca * width),
        (cx - ca * length + sa * width, cy - sa * length - ca * width),
        (cx - ca * length - sa * width, cy - sa * length + ca * width),
    ]


def shapes(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`n` 3 x size x size uint8 images of six shapes, and their class ids."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, n)
    x = np.zeros((n, 3, size, size), np.uint8)
    s = 4 * size  # drawn at 4x, then reduced: smooth edges
    for i in range(n):
        bg = rng.integers(0, 256, 3)
        fg = rng.integers(0, 256, 3)
        while np.abs(fg.astype(int) - bg).sum() < 200:
            fg = rng.integers(0, 256, 3)
        img = Image.new("RGB", (s, s), tuple(int(v) for v in bg))
        draw, colour = ImageDraw.Draw(img), tuple(int(v) for v in fg)
        r = rng.uniform(0.18, 0.35) * s
        cx, cy = rng.uniform(r + 2, s - r - 2, 2)
        rot = rng.uniform(0, 2 * math.pi)

        def polygon(k: int, radius: float, cx: float = cx, cy: float = cy, rot: float = rot) -> list:
            turns = [rot + 2 * math.pi * j / k for j in range(k)]
            return [(cx + radius * math.cos(t), cy + radius * math.sin(t)) for t in turns]

        kind = int(y[i])
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == 1:
            draw.polygon(polygon(4, r * 1.2), fill=colour)
        elif kind == 2:
            draw.polygon(polygon(3, r * 1.3), fill=colour)
        elif kind == 3:
            draw.polygon(_bar(cx, cy, rot, r, r * 0.35), fill=colour)
            draw.polygon(_bar(cx, cy, rot + math.pi / 2, r, r * 0.35), fill=colour)
        elif kind == 4:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=int(r * 0.3))
        else:
            draw.polygon(_bar(cx, cy, rot, r, r * 0.3), fill=colour)
        arr = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), np.float32)
        x[i] = np.clip(arr + rng.normal(0, 20, arr.shape), 0, 255).round().astype(np.uint8).transpose(2, 0, 1)
    return x, y.astype(np.int64)


def tabular(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` rows of scikit-learn's make_classification (20 features, 4 classes), and their class ids."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n, n_features=20, n_informative=8, n_redundant=4, n_classes=4,
        n_clusters_per_class=2, class_sep=1.0, flip_y=0.02, random_state=seed,
    )  # fmt: skip
    return x.astype(np.float32), y.astype(np.int64)


def cancer(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's breast cancer table, rows shuffled by `seed`, features as sign(x) log(1 + |x|)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = data.data[order]
    return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32), data.target[order].astype(np.int64)


def write(name: str, path: Path, n: int, seed: int) -> Path:
    """Generate data set `name` (n samples; cancer has its 569) and save it as an .npz fedtrain reads."""
    if name == "glyphs":
        x, y = glyphs(n, seed)
    elif name == "shapes":
        x, y = shapes(n, seed)
    elif name == "tabular":
        x, y = tabular(n, seed)
    elif name == "cancer":
        x, y = cancer(seed)
    else:
        raise ValueError(f"unknown data set {name!r}")
    np.savez(path, x=x, y=y)
    return path
