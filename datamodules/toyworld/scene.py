"""Toy-world scenes: palette, shapes, the 4 x 4 grid, scene specifications, layouts and the pixel renderer."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

GRID = 4
"""cells per side; one cell is one image token of the toy VQ (objects never straddle tokens)."""
CELL = 8
"""pixels per cell side."""
IMAGE_SIZE = GRID * CELL
"""pixels per image side (32)."""
BACKGROUND = (255, 255, 255)

# Saturated colours at least ~100 apart in RGB, so a blurred VQ reconstruction still snaps back.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30),
    "orange": (250, 125, 0),
    "yellow": (235, 215, 0),
    "green": (30, 150, 50),
    "blue": (30, 70, 215),
    "purple": (130, 40, 175),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4
MAX_OBJECTS = 6

# Locality words of the T2I-R1 schema that toy prompts use, and the geometric relation each means.
RELATIONS: dict[str, str] = {
    "left of": "left",
    "on the left of": "left",
    "right of": "right",
    "on the right of": "right",
    "above": "above",
    "on top of": "above",
    "on the top of": "above",
    "below": "below",
    "on the bottom of": "below",
    "next to": "near",
    "near": "near",
    "on side of": "near",
}
NEAR = 0.3
"""toy-world "near": centres at most this far apart on both axes, as a fraction of the image side
(neighbouring cells, diagonals included, are 0.25 apart; two cells apart is 0.5)."""


def _shape_masks() -> dict[str, np.ndarray]:
    """Each shape as a ``[CELL, CELL]`` bool mask inside a one-pixel margin (6 x 6 px)."""
    yy, xx = np.mgrid[0:CELL, 0:CELL]
    inside = (yy >= 1) & (yy <= CELL - 2) & (xx >= 1) & (xx <= CELL - 2)
    centre = (CELL - 1) / 2
    circle = ((yy - centre) ** 2 + (xx - centre) ** 2 <= 8.0) & inside
    # Apex up: rows of width 2, 2, 4, 4, 6, 6 -- the bottom half holds twice the top half's pixels.
    half_width = np.array([0, 1, 1, 2, 2, 3, 3, 0])[yy]
    triangle = (np.abs(xx - centre) < half_width) & inside
    return {"circle": circle, "square": inside, "triangle": triangle}


SHAPE_MASKS = _shape_masks()


@dataclass(frozen=True)
class Group:
    """``count`` objects of one kind; ``color`` None means any one colour (the plan picks it)."""

    shape: str
    color: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; toy shapes are {SHAPES}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; toy colours are {sorted(COLORS)}")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be in 1..{MAX_COUNT}, got {self.count}")

    @property
    def phrase(self) -> str:
        """``"red circle"``, or ``"circle"`` without a colour (the T2I-R1 noun phrase)."""
        return f"{self.color} {self.shape}" if self.color else self.shape

    def words(self) -> str:
        """``"two red circles"``: the plan's wording of the group."""
        noun = PLURALS[self.shape] if self.count > 1 else self.shape
        return " ".join(w for w in (NUMBER_WORDS[self.count], self.color, noun) if w)

    def matches(self, color: str, shape: str) -> bool:
        return shape == self.shape and (self.color is None or color == self.color)


@dataclass(frozen=True)
class Relation:
    """Every object of group ``a`` stands in ``locality`` to every object of group ``b``."""

    a: int
    b: int
    locality: str


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for: exactly these groups (nothing else), and optionally one relation."""

    groups: tuple[Group, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        if not self.groups or self.total > MAX_OBJECTS:
            raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {self.total}")
        free = [g.shape for g in self.groups if g.color is None]
        shapes = [g.shape for g in self.groups]
        if any(shapes.count(s) > 1 for s in free) or len(set(map(_kind, self.groups))) < len(self.groups):
            raise ValueError(f"groups must not overlap (a colour-free shape may appear once): {self.groups}")
        r = self.relation
        if r is not None and (r.locality not in RELATIONS or r.a == r.b or max(r.a, r.b) >= len(self.groups)):
            raise ValueError(f"bad relation {r}")

    @property
    def total(self) -> int:
        return sum(g.count for g in self.groups)

    def plan(self) -> str:
        """The canonical plan: ``"one red circle left of one blue square and two green triangles"``."""
        order = list(range(len(self.groups)))
        parts = []
        if self.relation is not None:
            r = self.relation
            parts.append(f"{self.groups[r.a].words()} {r.locality} {self.groups[r.b].words()}")
            order = [i for i in order if i not in (r.a, r.b)]
        parts += [self.groups[i].words() for i in order]
        return " and ".join(parts)


def _kind(group: Group) -> tuple[str | None, str]:
    return (group.color, group.shape)


@dataclass(frozen=True)
class Placed:
    """One drawn object: its kind and its cell (row 0 is the top)."""

    shape: str
    color: str
    row: int
    col: int

    @property
    def centre(self) -> tuple[float, float]:
        """``(x, y)`` of the cell centre as a fraction of the image side (y grows downward)."""
        return ((self.col + 0.5) / GRID, (self.row + 0.5) / GRID)


def relation_holds(kind: str, c1: tuple[float, float], c2: tuple[float, float]) -> bool:
    """The toy world's truth of "object at ``c1`` is <kind> of object at ``c2``" (centres, image fractions).

    left/right/above/below need the offset on the right side and mostly along that axis; near needs
    both offsets within :data:`NEAR`.
    """
    dx, dy = c1[0] - c2[0], c1[1] - c2[1]
    if kind == "near":
        return max(abs(dx), abs(dy)) <= NEAR + 1e-9
    horizontal = abs(dx) > abs(dy)
    return {
        "left": dx < 0 and horizontal,
        "right": dx > 0 and horizontal,
        "above": dy < 0 and abs(dy) > abs(dx),
        "below": dy > 0 and abs(dy) > abs(dx),
    }[kind]


def group_relation_holds(
    relation: Relation, placed_a: Sequence[tuple[float, float]], placed_b: Sequence[tuple[float, float]]
) -> bool:
    """Whether every centre of group a stands in the relation to every centre of group b (both non-empty)."""
    kind = RELATIONS[relation.locality]
    return bool(placed_a) and bool(placed_b) and all(relation_holds(kind, p, q) for p in placed_a for q in placed_b)


def concrete(spec: SceneSpec, rng: random.Random, allowed: Callable[[str, str], bool] | None = None) -> SceneSpec:
    """Give every colour-free group a colour (drawn from those ``allowed(color, shape)`` accepts)."""
    groups = []
    taken = {_kind(g) for g in spec.groups}
    for g in spec.groups:
        if g.color is None:
            options = [c for c in COLORS if (allowed is None or allowed(c, g.shape)) and (c, g.shape) not in taken]
            g = Group(g.shape, rng.choice(options), g.count)
            taken.add(_kind(g))
        groups.append(g)
    return SceneSpec(tuple(groups), spec.relation)


def drawing_order(spec: SceneSpec) -> list[int]:
    """The order a careful illustrator draws the groups in, reading the grid row by row: the order the
    plan names them, except that the second object of a "right of" or "below" relation comes first."""
    order = list(range(len(spec.groups)))
    r = spec.relation
    if r is not None:
        rest = [i for i in order if i not in (r.a, r.b)]
        first = [r.b, r.a] if RELATIONS[r.locality] in ("right", "below") else [r.a, r.b]
        order = first + rest
    return order


def sample_layout(spec: SceneSpec, rng: random.Random, ordered: bool = False, tries: int = 2000) -> list[Placed]:
    """Random distinct cells for the objects of a concrete ``spec`` such that its relation holds.

    Args:
        ordered: also require that, read row by row, the objects come group by group in
            :func:`drawing_order` (the convention of the supervised drawings; any layout is valid).

    Raises:
        ValueError: a group has no colour, or no layout satisfied the constraints within ``tries``.
    """
    if any(g.color is None for g in spec.groups):
        raise ValueError("sample_layout needs a concrete spec: call concrete() first")
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    order = drawing_order(spec) if ordered else list(range(len(spec.groups)))
    for _ in range(tries):
        chosen = rng.sample(cells, spec.total)
        if ordered:
            chosen.sort()
        placed, start = [], 0
        for i in order:
            g = spec.groups[i]
            placed += [Placed(g.shape, g.color, r, c) for r, c in chosen[start : start + g.count]]
            start += g.count
        if spec.relation is None or _layout_relation(spec, placed):
            return placed
    raise ValueError(f"no layout of {spec} satisfies its relation after {tries} tries")


def _layout_relation(spec: SceneSpec, placed: list[Placed]) -> bool:
    r = spec.relation
    a = [p.centre for p in placed if spec.groups[r.a].matches(p.color, p.shape)]
    b = [p.centre for p in placed if spec.groups[r.b].matches(p.color, p.shape)]
    return group_relation_holds(r, a, b)


def render(placed: Sequence[Placed]) -> np.ndarray:
    """Draw objects on a white canvas. Returns uint8 ``[IMAGE_SIZE, IMAGE_SIZE, 3]``."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for p in placed:
        cell = image[p.row * CELL : (p.row + 1) * CELL, p.col * CELL : (p.col + 1) * CELL]
        cell[SHAPE_MASKS[p.shape]] = COLORS[p.color]
    return image


def render_spec(spec: SceneSpec, rng: random.Random, allowed: Callable[[str, str], bool] | None = None):
    """A random rendering of ``spec``: ``(image uint8 [H, W, 3], concrete spec, placed objects)``."""
    spec = concrete(spec, rng, allowed)
    placed = sample_layout(spec, rng)
    return render(placed), spec, placed
