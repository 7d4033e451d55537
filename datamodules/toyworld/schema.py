"""Toy scene specs <-> T2I-R1 metadata (task_type, nouns, attr_nouns, spatial_info, numeracy_info)."""

from __future__ import annotations

from typing import Any

from datamodules.records import PromptRecord
from datamodules.toyworld.scene import COLORS, SHAPES, Group, Relation, SceneSpec


def to_metadata(prompt: str, task_type: str, spec: SceneSpec, **extra: Any) -> dict[str, Any]:
    """A JSON-ready T2I-R1 record for ``spec``.

    Nouns are bare shapes (as in T2I-R1); coloured groups also give an attribute phrase. Relations and
    counts name objects by their phrase ("red circle"), so two circles of different colours stay apart.
    ``numeracy_info`` is written for numeracy prompts and whenever some group has more than one object.
    """
    record: dict[str, Any] = {"prompt": prompt, "task_type": task_type}
    record["nouns"] = list(dict.fromkeys(g.shape for g in spec.groups))
    attr = [g.phrase for g in spec.groups if g.color is not None]
    if attr:
        record["attr_nouns"] = attr
    if spec.relation is not None:
        r = spec.relation
        record["spatial_info"] = {
            "obj1": spec.groups[r.a].phrase,
            "obj2": spec.groups[r.b].phrase,
            "locality": r.locality,
        }
    if task_type == "numeracy" or any(g.count > 1 for g in spec.groups):
        record["numeracy_info"] = [{"obj_name": g.phrase, "num": g.count} for g in spec.groups]
    record.update(extra)
    return record


def _parse_phrase(phrase: str) -> tuple[str | None, str]:
    words = phrase.lower().split()
    shapes = [w for w in words if w in SHAPES]
    colors = [w for w in words if w in COLORS]
    if len(shapes) != 1 or len(colors) > 1 or len(words) != len(shapes) + len(colors):
        raise ValueError(f"toy phrase must be '[colour] shape', got {phrase!r}")
    return (colors[0] if colors else None), shapes[0]


def spec_from_record(record: PromptRecord) -> SceneSpec:
    """The scene a toy record asks for, read from its T2I-R1 metadata alone (never from the prompt text).

    Groups come from ``attr_nouns`` (coloured) and from ``nouns`` not covered by them (any colour);
    counts from ``numeracy_info`` (1 when absent); the relation from ``spatial_info``.

    Raises:
        ValueError: the metadata does not describe a toy scene (names the record's source).
    """
    try:
        groups: list[Group] = []
        for phrase in record.attr_nouns:
            color, shape = _parse_phrase(phrase)
            groups.append(Group(shape, color))
        covered = {g.shape for g in groups}
        for noun in record.nouns:
            color, shape = _parse_phrase(noun)
            if shape not in covered:
                groups.append(Group(shape, color))
                covered.add(shape)
        for item in record.numeracy_info or ():
            i = _find(groups, item["obj_name"])
            groups[i] = Group(groups[i].shape, groups[i].color, int(item["num"]))
        relation = None
        if record.spatial_info is not None:
            info = record.spatial_info
            relation = Relation(_find(groups, info["obj1"]), _find(groups, info["obj2"]), info["locality"])
        return SceneSpec(tuple(groups), relation)
    except (ValueError, KeyError) as err:
        raise ValueError(f"not a toy-world record ({record.source or record.prompt!r}): {err}") from err


def _find(groups: list[Group], phrase: str) -> int:
    """Index of the group a phrase names: same colour and shape, or the only group of a bare shape."""
    color, shape = _parse_phrase(phrase)
    hits = [i for i, g in enumerate(groups) if g.shape == shape and (color is None or g.color == color)]
    if len(hits) != 1:
        raise ValueError(f"phrase {phrase!r} names {len(hits)} groups of {groups}")
    return hits[0]
