"""The reasoning instruction: what the semantic-level CoT (the plan) must contain, around ``{prompt}``."""

from __future__ import annotations

# Our wording of the paper's instruction: a brief, precise description of every object, its
# attributes and relations, about 50 words, and nothing else. `{prompt}` is replaced verbatim.
REASONING_TEMPLATE = (
    'You will draw a picture for this request: "{prompt}". '
    "First plan the picture in plain words. Name every object that must appear, with its count, "
    "colour, shape, size and texture, and say where each object is relative to the others. "
    "If the request only hints at something, name the concrete thing it means. "
    "Keep it to about 50 words and reply with the plan alone."
)

TEMPLATES: dict[str, str] = {"default": REASONING_TEMPLATE}


def resolve_template(name_or_text: str) -> str:
    """A template by name (see :data:`TEMPLATES`) or a literal text that contains ``{prompt}``."""
    if name_or_text in TEMPLATES:
        return TEMPLATES[name_or_text]
    if "{prompt}" not in name_or_text:
        raise ValueError(
            f"reasoning_template must be one of {sorted(TEMPLATES)} or a text containing '{{prompt}}', "
            f"got {name_or_text!r}"
        )
    return name_or_text
