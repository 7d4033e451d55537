"""Draw a sample grid with Pillow: one row per prompt, one column per sample, a caption under each image."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)


@dataclass
class Caption:
    """What is written under one image.

    Attributes:
        prompt: the prompt the image was drawn for.
        plan: the sampled plan, or ``None`` when the policy draws without one.
        reward: the ensemble reward.
        advantage: the group-normalised advantage.
        per_expert: expert name -> unweighted score, in the ensemble's order.
    """

    prompt: str
    plan: str | None
    reward: float
    advantage: float
    per_expert: dict[str, float] = field(default_factory=dict)


def load_font(size: int, file: str | None = None) -> ImageFont.ImageFont:
    """``file`` at ``size`` px, else Pillow's default font (scalable with FreeType, else a fixed bitmap one).

    Pillow's default font draws little beyond ASCII: ``é``, ``—``, ``Ω`` come out as boxes. A bare file name is
    looked for in the system's font folders, then among the fonts matplotlib ships (an MLflow dependency, with
    DejaVu Sans), so the default font is there on any system.
    """
    if file is not None:
        for candidate in (file, _matplotlib_font(file)):
            try:
                if candidate is not None:
                    return ImageFont.truetype(candidate, size)
            except OSError:
                continue
        warnings.warn(
            f"grid font {file!r} not found: captions use Pillow's default font, which draws little beyond ASCII",
            stacklevel=2,
        )
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: only the bitmap font exists
        return ImageFont.load_default()


def _matplotlib_font(file: str) -> str | None:
    """``file`` among the TrueType fonts matplotlib ships, when it is a bare name and matplotlib is there."""
    if Path(file).name != file:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / file
    return str(path) if path.is_file() else None


@dataclass
class GridLayout:
    """Sizes of the grid, fixed by the settings alone so that every step's PNG has the same shape.

    Attributes:
        cell_size: side of each image in the grid, in pixels (images are scaled with nearest neighbour).
        pad: space around cells.
        font_size: caption font size.
        prompt_lines: caption lines for the prompt.
        plan_lines: caption lines for the plan (longer plans end in an ellipsis; 0 leaves the plan out).
        font_file: a TrueType font, as a path or a file name in the system's font folders; DejaVu Sans (most
            Linux systems have it) draws Latin, Greek and Cyrillic text. ``None``, or a font that is not
            there, uses Pillow's default font, which draws little beyond ASCII.
    """

    cell_size: int = 192
    pad: int = 8
    font_size: int = 12
    prompt_lines: int = 2
    plan_lines: int = 4
    font_file: str | None = "DejaVuSans.ttf"

    def __post_init__(self) -> None:
        for name in ("cell_size", "font_size"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be >= 8, got {getattr(self, name)}")
        if self.pad < 0 or self.prompt_lines < 1 or self.plan_lines < 0:
            raise ValueError("pad must be >= 0, prompt_lines >= 1 and plan_lines >= 0")
        self.font = load_font(self.font_size, self.font_file)
        left, top, right, bottom = self.font.getbbox("Ag|")
        self.line_height = int(bottom - top) + 3

    def caption_lines(self, num_experts: int) -> int:
        """Lines under each image: prompt, plan, the reward and advantage, one per expert."""
        return self.prompt_lines + self.plan_lines + 1 + num_experts

    def row_height(self, num_experts: int) -> int:
        """Height of one prompt's row: the image, a gap, the caption, a gap."""
        return self.cell_size + self.pad + self.caption_lines(num_experts) * self.line_height + self.pad

    def size(self, num_prompts: int, group_size: int, num_experts: int) -> tuple[int, int]:
        """``(width, height)`` of the grid PNG."""
        width = group_size * self.cell_size + (group_size + 1) * self.pad
        return width, self.pad + num_prompts * self.row_height(num_experts)


def wrap(text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; text past ``max_lines`` ends the last line with an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        if lines:  # max_lines 0: nothing shown, nothing to mark
            lines[-1] = lines[-1] + " …"
    # a single word wider than the cell is cut, so no line spills into the next column
    return [_fit(line, font, width) for line in lines]


def _fit(line: str, font: ImageFont.ImageFont, width: int) -> str:
    while len(line) > 1 and font.getlength(line) > width:
        line = line[:-2] + "…"
    return line


def caption_text(c: Caption, layout: GridLayout) -> list[tuple[str, tuple[int, int, int]]]:
    """The caption's lines with their colours, exactly ``layout.caption_lines(len(c.per_expert))`` of them."""
    width = layout.cell_size
    prompt = wrap(c.prompt, layout.font, width, layout.prompt_lines)
    plan = wrap(
        f"plan: {c.plan}" if c.plan is not None else "(no plan)", layout.font, width, layout.plan_lines
    )
    lines = [(t, INK) for t in _pad(prompt, layout.prompt_lines)]
    lines += [(t, MUTED) for t in _pad(plan, layout.plan_lines)]
    lines.append((f"reward {c.reward:.3f}  adv {c.advantage:+.2f}", INK))
    lines += [
        (_fit(f"{name} {score:.3f}", layout.font, width), MUTED) for name, score in c.per_expert.items()
    ]
    return lines


def _pad(lines: list[str], n: int) -> list[str]:
    return (lines + [""] * n)[:n]


def draw_grid(
    images: np.ndarray, captions: Sequence[Caption], group_size: int, layout: GridLayout
) -> Image.Image:
    """Draw ``R = P * G`` images, prompt-major, ``G`` per row, each with its caption below.

    Args:
        images: uint8 ``[R, H, W, 3]``.
        captions: ``R`` captions, in the images' order; all with the same experts.
        group_size: ``G``, images per prompt (one grid row).

    Returns:
        An RGB image of ``layout.size(P, G, E)``.
    """
    rows = len(captions)
    if images.shape[0] != rows or rows % group_size:
        raise ValueError(f"{images.shape[0]} images and {rows} captions do not fill rows of {group_size}")
    num_experts = len(captions[0].per_expert) if captions else 0
    canvas = Image.new("RGB", layout.size(rows // group_size, group_size, num_experts), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    step = layout.cell_size + layout.pad
    for i, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        x = layout.pad + (i % group_size) * step
        y = layout.pad + (i // group_size) * layout.row_height(num_experts)
        tile = Image.fromarray(pixels, "RGB").resize((layout.cell_size, layout.cell_size), Image.NEAREST)
        canvas.paste(tile, (x, y))
        text_y = y + layout.cell_size + layout.pad // 2
        for line, colour in caption_text(caption, layout):
            draw.text((x, text_y), line, fill=colour, font=layout.font)
            text_y += layout.line_height
    return canvas
