"""The toy world's programmatic eye: pixels -> palette labels -> connected components -> shaped, boxed objects."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from datamodules.toyworld.scene import BACKGROUND, CELL, COLORS, SHAPE_MASKS

PALETTE_NAMES: tuple[str, ...] = ("background", *COLORS)
PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # [7, 3]
CLEAN_DIST = 40.0
"""a pixel this close (RGB distance) to the background or a palette colour counts as clean."""
ASSIGN_DIST = 90.0
"""a pixel farther than this from every palette colour belongs to no object."""
MIN_AREA = 8
"""components smaller than this are specks, not objects (a drawn shape has 24 or 36 pixels)."""
RECOGNISED = 0.6
"""an object whose best shape template IoU is below this is not recognisably any shape."""
WELL_FORMED = 0.75
"""template IoU at or above which an object counts as cleanly drawn."""

_TEMPLATES = {name: mask[1 : CELL - 1, 1 : CELL - 1] for name, mask in SHAPE_MASKS.items()}  # 6 x 6 each


@dataclass(frozen=True)
class ToyObject:
    """One detected object.

    Attributes:
        color: palette colour name.
        shape: the best-matching shape template.
        box: ``(x0, y0, x1, y1)`` normalised to ``[0, 1]``.
        area: pixels.
        confidence: IoU of the object's mask with its shape's template (1 for a perfect drawing).
    """

    color: str
    shape: str
    box: tuple[float, float, float, float]
    area: int
    confidence: float

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def recognised(self) -> bool:
        return self.confidence >= RECOGNISED


@dataclass(frozen=True)
class Parse:
    """What the eye sees in one image: objects, specks (tiny components) and the clean-pixel fraction."""

    objects: tuple[ToyObject, ...]
    specks: int
    clean_fraction: float


def _best_template(mask: np.ndarray) -> tuple[str, float]:
    """The shape whose 6 x 6 template, slid over the component's box, overlaps it best, and that IoU."""
    h, w = mask.shape
    area = int(mask.sum())
    best = ("circle", 0.0)
    padded = np.zeros((max(h, 6) + 8, max(w, 6) + 8), dtype=bool)
    padded[4 : 4 + h, 4 : 4 + w] = mask
    for name, template in _TEMPLATES.items():
        t_area = int(template.sum())
        for oy in range(max(0, h - 6) + 3):
            for ox in range(max(0, w - 6) + 3):
                window = padded[3 + oy : 9 + oy, 3 + ox : 9 + ox]
                inter = int((window & template).sum())
                iou = inter / (area + t_area - inter)
                if iou > best[1]:
                    best = (name, iou)
    return best


def parse_image(image: np.ndarray) -> Parse:
    """Find the objects of one image.

    Args:
        image: uint8 ``[H, W, 3]``.
    """
    height, width, _ = image.shape
    pixels = image.astype(np.float32)
    dist = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=-1)  # [H, W, 7]
    nearest, closest = dist.argmin(-1), dist.min(-1)  # [H, W] each
    clean_fraction = float((closest <= CLEAN_DIST).mean())
    objects, specks = [], 0
    for index, color in enumerate(PALETTE_NAMES[1:], start=1):
        labels, count = ndimage.label((nearest == index) & (closest <= ASSIGN_DIST))
        for k, (ys, xs) in enumerate(ndimage.find_objects(labels), start=1):
            mask = labels[ys, xs] == k
            area = int(mask.sum())
            if area < MIN_AREA:
                specks += 1
                continue
            shape, iou = _best_template(mask)
            box = (xs.start / width, ys.start / height, xs.stop / width, ys.stop / height)
            objects.append(ToyObject(color, shape, box, area, iou))
    return Parse(tuple(objects), specks, clean_fraction)


_CACHE: dict[bytes, Parse] = {}
_CACHE_SIZE = 1024


def parse_batch(images: torch.Tensor) -> list[Parse]:
    """:func:`parse_image` for uint8 ``[N, H, W, 3]`` images.

    The four toy experts look at the same images one after another; a small cache keyed by the pixels
    lets them share one parse.
    """
    out = []
    for image in images.detach().cpu().numpy():
        key = image.tobytes()
        parse = _CACHE.get(key)
        if parse is None:
            parse = parse_image(image)
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = parse
        out.append(parse)
    return out
