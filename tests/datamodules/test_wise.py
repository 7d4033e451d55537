"""The WISE reader: a user-supplied JSON array (WISE ships no license, so bicot ships no WISE prompts)."""

from __future__ import annotations

import json

import pytest

from datamodules.prompts import PromptDataError, load_prompts, load_wise

# Invented records in WISE's format.
RECORDS = [
    {
        "prompt_id": 1,
        "Prompt": "the tool a carpenter drives nails with",
        "Explanation": "a hammer",
        "Subcategory": "Tools",
        "Category": "Cultural knowledge",
    },
    {
        "prompt_id": 2,
        "Prompt": "ice left an hour in the sun",
        "Explanation": "a puddle",
        "Subcategory": "Physics",
    },
]


def write(tmp_path, records, name="natural_science.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=2))
    return path


def test_records_map_to_prompts_with_ids_and_categories(tmp_path):
    records = load_prompts(write(tmp_path, RECORDS))
    assert [r.prompt for r in records] == [RECORDS[0]["Prompt"], RECORDS[1]["Prompt"]]
    assert [r.task_type for r in records] == ["Cultural knowledge", "natural_science"]  # else the file's stem
    assert records[1].extra == {"prompt_id": 2, "Explanation": "a puddle", "Subcategory": "Physics"}
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", "2"]
    assert load_wise(write(tmp_path, RECORDS[1:]), task_type="science")[0].task_type == "science"


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([RECORDS[0], dict(RECORDS[1], prompt_id=1)], r"record 2: field 'prompt_id': 1 repeats record 1"),
        ([dict(RECORDS[0], prompt_id="../x")], r"record 1: field 'prompt_id': must be an integer or a name"),
        ([RECORDS[0], {"prompt": "a"}], r"record 2: not a WISE record .* JSON arrays"),
        ([dict(RECORDS[0], Prompt="  ")], r"record 1: field 'Prompt': must be a non-empty string"),
    ],
)
def test_bad_records_are_named(tmp_path, records, message):
    with pytest.raises(PromptDataError, match=message):
        load_prompts(write(tmp_path, records))


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "wise.json"
    path.write_text('[\n  {"prompt_id": 1,\n  "Prompt": }\n]')
    with pytest.raises(PromptDataError, match=r"wise.json, line 3: malformed JSON"):
        load_prompts(path)
