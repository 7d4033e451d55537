"""The toy prompt grammar: six categories of prompts, each with the scene it asks for."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from datamodules.toyworld.scene import COLORS, NUMBER_WORDS, PLURALS, SHAPES, Group, Relation, SceneSpec

CATEGORIES: tuple[str, ...] = ("color", "shape", "numeracy", "spatial", "complex", "reasoning")
LOCALITY_WORDS: tuple[str, ...] = ("left of", "right of", "above", "below", "on top of", "next to", "near")

# Indirect references: the prompt names a colour, a shape or a count only through something it is like.
# The plan must resolve them; the metadata holds the resolved scene.
COLOR_REFS: dict[str, str] = {
    "the colour of a ripe tomato": "red",
    "the colour of a fire engine": "red",
    "the colour of a carrot": "orange",
    "the colour of a pumpkin": "orange",
    "the colour of a lemon": "yellow",
    "the colour of a banana peel": "yellow",
    "the colour of fresh grass": "green",
    "the colour of a frog": "green",
    "the colour of a clear sky": "blue",
    "the colour of the deep sea": "blue",
    "the colour of grapes": "purple",
    "the colour of a plum": "purple",
}
SHAPE_REFS: dict[str, str] = {
    "the shape with three corners": "triangle",
    "the shape of a sail": "triangle",
    "the shape with four equal sides": "square",
    "the shape of a chessboard field": "square",
    "the shape of a coin": "circle",
    "the round shape without corners": "circle",
}
COUNT_REFS: dict[str, int] = {
    "the horns of a unicorn": 1,
    "the noses on a face": 1,
    "the wheels of a bicycle": 2,
    "the eyes of an owl": 2,
    "the wheels of a tricycle": 3,
    "the sides of a triangle": 3,
    "the legs of a dog": 4,
    "the seasons of a year": 4,
}

# Held out of training altogether: no training prompt asks for these colour-shape pairs, and
# training images never show them; validation and test prompts do ask for them.
UNSEEN_COMBOS: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("orange", "circle"), ("green", "square")})


@dataclass(frozen=True)
class Item:
    """One prompt of the grammar and the scene it asks for."""

    prompt: str
    category: str
    spec: SceneSpec

    @property
    def unseen_combo(self) -> bool:
        """Whether the prompt asks for a colour-shape pair held out of training."""
        return any((g.color, g.shape) in UNSEEN_COMBOS for g in self.spec.groups if g.color)


def allowed_in_training(color: str, shape: str) -> bool:
    """Whether training data may show this colour on this shape."""
    return (color, shape) not in UNSEEN_COMBOS


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _obj(color: str | None, shape: str) -> str:
    words = f"{color} {shape}" if color else shape
    return f"{_a(words)} {words}"


def _many(n: int, color: str | None, shape: str) -> str:
    return " ".join(w for w in (NUMBER_WORDS[n], color, PLURALS[shape] if n > 1 else shape) if w)


def _combos() -> list[tuple[str, str]]:
    return [(c, s) for s in SHAPES for c in COLORS]


def color_items() -> Iterator[Item]:
    single = ("{o}", "one {c} {s}", "{a} {s} that is {c}", "{a} {s} coloured {c}")
    for c, s in _combos():
        spec = SceneSpec((Group(s, c),))
        for t in single:
            yield Item(t.format(o=_obj(c, s), c=c, s=s, a=_a(s)), "color", spec)
    for (c, s), (c2, s2) in itertools.permutations(_combos(), 2):
        spec = SceneSpec((Group(s, c), Group(s2, c2)))
        yield Item(f"{_obj(c, s)} and {_obj(c2, s2)}", "color", spec)


def shape_items() -> Iterator[Item]:
    for s in SHAPES:
        for t in ("{o}", "draw {o}", "just {o}"):
            yield Item(t.format(o=_obj(None, s)), "shape", SceneSpec((Group(s),)))
    for s, s2 in itertools.permutations(SHAPES, 2):
        spec = SceneSpec((Group(s), Group(s2)))
        yield Item(f"{_obj(None, s)} and {_obj(None, s2)}", "shape", spec)
        yield Item(f"{_obj(None, s)} with {_obj(None, s2)}", "shape", spec)
        for c in COLORS:
            yield Item(f"{_obj(c, s)} and {_obj(None, s2)}", "shape", SceneSpec((Group(s, c), Group(s2))))
            yield Item(f"{_obj(None, s)} and {_obj(c, s2)}", "shape", SceneSpec((Group(s), Group(s2, c))))
    for s, s2, s3 in itertools.permutations(SHAPES, 3):
        yield Item(f"{_obj(None, s)}, {_obj(None, s2)} and {_obj(None, s3)}", "shape", SceneSpec(tuple(map(Group, (s, s2, s3)))))
        for c in COLORS:
            spec = SceneSpec((Group(s, c), Group(s2), Group(s3)))
            yield Item(f"{_obj(c, s)}, {_obj(None, s2)} and {_obj(None, s3)}", "shape", spec)


def numeracy_items() -> Iterator[Item]:
    for (c, s), n in itertools.product(_combos(), NUMBER_WORDS):
        text = f"exactly {_many(n, c, s)}" if n == 1 else _many(n, c, s)
        yield Item(text, "numeracy", SceneSpec((Group(s, c, n),)))
    for s, n in itertools.product(SHAPES, NUMBER_WORDS):
        yield Item(f"exactly {_many(n, None, s)}", "numeracy", SceneSpec((Group(s, None, n),)))
    for (c, s), (c2, s2) in itertools.permutations(_combos(), 2):
        for n, m in itertools.product(NUMBER_WORDS, repeat=2):
            if n + m <= 5 and (n, m) != (1, 1):
                spec = SceneSpec((Group(s, c, n), Group(s2, c2, m)))
                yield Item(f"{_many(n, c, s)} and {_many(m, c2, s2)}", "numeracy", spec)


def spatial_items() -> Iterator[Item]:
    for ((c, s), (c2, s2)), loc in itertools.product(itertools.permutations(_combos(), 2), LOCALITY_WORDS):
        spec = SceneSpec((Group(s, c), Group(s2, c2)), Relation(0, 1, loc))
        yield Item(f"{_obj(c, s)} {loc} {_obj(c2, s2)}", "spatial", spec)
    for (s, s2), loc in itertools.product(itertools.permutations(SHAPES, 2), LOCALITY_WORDS):
        spec = SceneSpec((Group(s), Group(s2)), Relation(0, 1, loc))
        yield Item(f"{_obj(None, s)} {loc} {_obj(None, s2)}", "spatial", spec)


def complex_items(rng: random.Random, count: int = 2400) -> Iterator[Item]:
    """Three objects with attributes and a relation, or a counted group in relation to another object."""
    combos = _combos()
    seen: set[str] = set()
    while len(seen) < count:
        (c, s), (c2, s2), (c3, s3) = rng.sample(combos, 3)
        loc = rng.choice(LOCALITY_WORDS)
        if rng.random() < 0.5:
            spec = SceneSpec((Group(s, c), Group(s2, c2), Group(s3, c3)), Relation(0, 1, loc))
            text = f"{_obj(c, s)} {loc} {_obj(c2, s2)} and {_obj(c3, s3)}"
        else:
            n = rng.choice((2, 3))
            spec = SceneSpec((Group(s, c, n), Group(s2, c2)), Relation(0, 1, loc))
            text = f"{_many(n, c, s)} {loc} {_obj(c2, s2)}"
        if text not in seen:
            seen.add(text)
            yield Item(text, "complex", spec)


def reasoning_items() -> Iterator[Item]:
    """Prompts that name a colour, a shape or a count only indirectly (several references each)."""
    for (ref, c), s in itertools.product(COLOR_REFS.items(), SHAPES):
        yield Item(f"{_a(s)} {s} in {ref}", "reasoning", SceneSpec((Group(s, c),)))
    for (ref, s), c in itertools.product(SHAPE_REFS.items(), COLORS):
        yield Item(f"{ref}, painted {c}", "reasoning", SceneSpec((Group(s, c),)))
    for (cref, c), (sref, s) in itertools.product(COLOR_REFS.items(), SHAPE_REFS.items()):
        yield Item(f"{sref}, in {cref}", "reasoning", SceneSpec((Group(s, c),)))
    for (ref, n), s in itertools.product(COUNT_REFS.items(), SHAPES):
        yield Item(f"as many {PLURALS[s]} as {ref}", "reasoning", SceneSpec((Group(s, None, n),)))
        for c in COLORS:
            yield Item(f"as many {c} {PLURALS[s]} as {ref}", "reasoning", SceneSpec((Group(s, c, n),)))
    for (ref, n), (cref, c), s in itertools.product(COUNT_REFS.items(), COLOR_REFS.items(), SHAPES):
        yield Item(f"as many {PLURALS[s]} as {ref}, all in {cref}", "reasoning", SceneSpec((Group(s, c, n),)))


def all_items(seed: int = 0) -> dict[str, list[Item]]:
    """Every prompt of the grammar by category (complex prompts are a seeded sample), deduplicated."""
    rng = random.Random(seed)
    makers = {
        "color": color_items(),
        "shape": shape_items(),
        "numeracy": numeracy_items(),
        "spatial": spatial_items(),
        "complex": complex_items(rng),
        "reasoning": reasoning_items(),
    }
    out: dict[str, list[Item]] = {}
    seen: set[str] = set()
    for category, items in makers.items():
        out[category] = []
        for item in items:
            if item.prompt not in seen:
                seen.add(item.prompt)
                out[category].append(item)
    return out
