"""The prompt record every part of bicot passes around: a prompt and the metadata the rewards read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The twelve `locality` values of the T2I-R1 training data (REWARDS.md), lower case.
LOCALITIES: tuple[str, ...] = (
    "left of",
    "below",
    "right of",
    "above",
    "next to",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
    "near",
    "on side of",
)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt and its metadata, in the T2I-R1 schema.

    Attributes:
        prompt: the text to draw.
        task_type: category (T2I-R1 `task_type`, a T2I-CompBench file category, a GenEval tag,
            or a toy-world category). ``"non"`` when unknown.
        nouns: objects the image must contain.
        attr_nouns: attribute phrases such as ``"purple elephant"``.
        spatial_info: ``{"obj1", "obj2", "locality"}`` for spatial prompts, else ``None``.
        numeracy_info: ``[{"obj_name", "num"}]`` for counting prompts, else ``None``.
        source: where the record came from (``file:line``), for error messages.
        extra: any other fields of the record, kept verbatim.
    """

    prompt: str
    task_type: str = "non"
    nouns: tuple[str, ...] = ()
    attr_nouns: tuple[str, ...] = ()
    spatial_info: dict[str, str] | None = None
    numeracy_info: tuple[dict[str, Any], ...] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key in ("nouns", "attr_nouns"):
            out[key] = list(out[key])
        if out["numeracy_info"] is not None:
            out["numeracy_info"] = [dict(item) for item in out["numeracy_info"]]
        return out
