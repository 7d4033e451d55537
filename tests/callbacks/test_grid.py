"""Drawing the sample grid: fixed layout, wrapping that never spills out of a cell, images where they belong."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from callbacks.grid import Caption, GridLayout, caption_text, draw_grid, wrap


def captions(n: int, plan: str | None = "a plan", experts=("color", "count")) -> list[Caption]:
    return [Caption(f"prompt {i}", plan, 0.5, 0.1 * i, {e: 0.25 for e in experts}) for i in range(n)]


def test_layout_size_depends_only_on_counts():
    layout = GridLayout(cell_size=64, pad=4, prompt_lines=2, plan_lines=3)
    width, height = layout.size(num_prompts=2, group_size=3, num_experts=2)
    assert width == 3 * 64 + 4 * 4
    assert layout.caption_lines(2) == 2 + 3 + 1 + 2
    assert height == 4 + 2 * (64 + 4 + 8 * layout.line_height + 4)


def test_drawn_grid_has_the_layout_size_and_the_images_in_place():
    layout = GridLayout(cell_size=32, pad=4)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (4, 8, 8, 3)).copy()  # R=4: P=2, G=2
    long_plan = "word " * 200  # must be cut, not make the grid taller
    grid = draw_grid(images, captions(4, plan=long_plan), group_size=2, layout=layout)
    assert grid.size == layout.size(2, 2, 2)
    row = layout.row_height(2)
    centre = layout.pad + layout.cell_size // 2
    step = layout.cell_size + layout.pad
    # prompt-major: row p holds samples p*G .. p*G+G-1, left to right
    assert grid.getpixel((centre, centre)) == (255, 0, 0)
    assert grid.getpixel((centre + step, centre)) == (0, 255, 0)
    assert grid.getpixel((centre, centre + row)) == (0, 0, 255)
    assert grid.getpixel((centre + step, centre + row)) == (255, 255, 0)


def test_wrap_fits_the_width_and_marks_cut_text():
    layout = GridLayout(cell_size=80)
    lines = wrap("one two three four five six seven eight nine ten " * 5, layout.font, 80, max_lines=3)
    assert len(lines) == 3
    assert lines[-1].endswith("…")
    assert all(layout.font.getlength(line) <= 80 for line in lines)
    (single,) = wrap("x" * 500, layout.font, 80, max_lines=2)  # one unbreakable word
    assert layout.font.getlength(single) <= 80 and single.endswith("…")


@pytest.mark.parametrize("plan", ["a short plan", None])
def test_caption_has_a_fixed_number_of_lines_and_shows_the_numbers(plan):
    layout = GridLayout(plan_lines=2)
    (caption,) = captions(1, plan=plan)
    lines = [text for text, _ in caption_text(caption, layout)]
    assert len(lines) == layout.caption_lines(2)
    assert lines[0] == "prompt 0"
    assert lines[2] == ("plan: a short plan" if plan else "(no plan)")
    assert "reward 0.500" in lines[4] and "adv +0.00" in lines[4]
    assert lines[5:] == ["color 0.250", "count 0.250"]


def test_draw_grid_refuses_rows_that_do_not_fill_groups():
    with pytest.raises(ValueError, match="do not fill rows"):
        draw_grid(np.zeros((3, 4, 4, 3), np.uint8), captions(3), group_size=2, layout=GridLayout())


def drawn(layout: GridLayout, text: str) -> np.ndarray:
    """``text`` drawn in ``layout``'s font, as a greyscale array."""
    canvas = Image.new("L", (4 * layout.font_size * len(text), 3 * layout.font_size), 0)
    ImageDraw.Draw(canvas).text((2, 2), text, fill=255, font=layout.font)
    return np.asarray(canvas)


def test_captions_draw_letters_beyond_ascii():
    layout = GridLayout()
    missing = drawn(layout, "\U000f0000")  # a private-use code point: the font's box for what it cannot draw
    for letter in "éü—Ωж":  # a prompt such as "a café in Zürich — ..."
        assert (drawn(layout, letter) != missing).any(), letter


def test_a_missing_font_falls_back_to_the_default_with_a_warning():
    with pytest.warns(UserWarning, match="not found"):
        layout = GridLayout(font_file="no-such-font-bicot.ttf")
    assert layout.line_height > 0


def test_zero_plan_lines_leave_the_plan_out():
    layout = GridLayout(plan_lines=0)
    (caption,) = captions(1, plan="a plan long enough to need a line of its own")
    lines = [text for text, _ in caption_text(caption, layout)]
    assert len(lines) == layout.caption_lines(2)
    assert not any("plan" in line for line in lines)


def test_the_default_font_is_found_where_the_system_has_none(monkeypatch):
    # a system without DejaVu Sans in its font folders (macOS, a slim container): matplotlib's copy is used
    truetype = ImageFont.truetype

    def no_system_fonts(font, size):
        if font == "DejaVuSans.ttf":
            raise OSError("cannot open resource")
        return truetype(font, size)

    monkeypatch.setattr(ImageFont, "truetype", no_system_fonts)
    layout = GridLayout()
    assert layout.font.path.endswith("DejaVuSans.ttf") and "matplotlib" in layout.font.path
