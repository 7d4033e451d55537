"""Toy ORM: 1 when the image meets every constraint of its prompt (objects, counts, relation, nothing else), else 0."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.records import PromptRecord
from datamodules.toyworld.scene import SceneSpec, group_relation_holds
from datamodules.toyworld.schema import spec_from_record
from modules.rewards.base import RewardExpert
from modules.rewards.toy_vision import Parse, parse_batch


def satisfies(parse: Parse, spec: SceneSpec) -> bool:
    """Whether the parsed image is exactly the scene ``spec`` asks for.

    Every object must be recognisable, each group must have exactly its count, there must be no other
    object, and the relation (if any) must hold between every pair of its two groups' objects.
    Specks are not objects (the cleanliness expert counts them).
    """
    objects = parse.objects
    if len(objects) != spec.total or any(not o.recognised for o in objects):
        return False
    members = [[o for o in objects if g.matches(o.color, o.shape)] for g in spec.groups]
    if any(len(m) != g.count for m, g in zip(members, spec.groups, strict=True)):
        return False
    r = spec.relation
    if r is None:
        return True
    return group_relation_holds(r, [o.centre for o in members[r.a]], [o.centre for o in members[r.b]])


class ToyORMExpert(RewardExpert):
    """The outcome reward of the toy world: exactly 1.0 when every constraint holds, 0.0 otherwise.

    Its rate is the toy world's accuracy (``model.accuracy_expert: toy_orm``). Constraints are read from
    the T2I-R1 metadata, never from the prompt text, so indirect (reasoning) prompts are judged by what
    they mean.

    Raises:
        ValueError: (from scoring) a record whose metadata is not a toy scene.
    """

    name = "toy_orm"

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]`` of 0 or 1 for uint8 images ``[N, H, W, 3]``."""
        specs = [spec_from_record(r) for r in prompts]
        return torch.tensor(
            [float(satisfies(p, s)) for p, s in zip(parse_batch(images), specs, strict=True)], dtype=torch.float32
        )
