"""The reasoning instruction: named templates, literal texts, and verbatim prompt substitution."""

import pytest

from bicot.templates import REASONING_TEMPLATE, TEMPLATES, resolve_template
from modules.policy import _fill


def test_default_template_resolves_to_the_text_with_a_prompt_slot():
    text = resolve_template("default")
    assert text == REASONING_TEMPLATE
    assert TEMPLATES["default"] == text
    assert "{prompt}" in text


def test_literal_text_with_prompt_slot_passes_unchanged():
    literal = "Plan a picture of {prompt} in ten words."
    assert resolve_template(literal) == literal


def test_text_without_prompt_slot_raises_and_names_the_choices():
    with pytest.raises(ValueError, match=r"\{prompt\}") as err:
        resolve_template("Plan a picture in ten words.")
    assert "default" in str(err.value)


def test_unknown_template_name_is_not_silently_accepted():
    # a misspelt name has no {prompt} slot either, so it must not pass as a literal text
    with pytest.raises(ValueError):
        resolve_template("defualt")


def test_fill_keeps_braces_in_the_prompt_verbatim():
    prompt = "a {weird} prompt {0}"
    filled = _fill(resolve_template("default"), prompt)
    assert f'"{prompt}"' in filled
    assert "{prompt}" not in filled
    # the same text through str.format would fail: prompts are data, never format strings
    with pytest.raises((KeyError, IndexError)):
        REASONING_TEMPLATE.replace("{prompt}", prompt).format()


def test_fill_replaces_every_slot_and_only_the_slot():
    assert _fill("{prompt} / {prompt} / {other}", "x{y}") == "x{y} / x{y} / {other}"


def test_fill_does_not_substitute_a_prompt_slot_inside_the_prompt():
    # the prompt itself contains "{prompt}": it must appear once, verbatim, not be expanded again
    assert _fill("<{prompt}>", "draw {prompt}") == "<draw {prompt}>"
