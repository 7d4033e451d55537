"""Tests for the prompt file readers and the PromptDataModule."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from datamodules.prompts import (
    PromptDataError,
    PromptDataModule,
    compbench_task_type,
    load_prompts,
)
from datamodules.records import PromptRecord

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "datamodules" / "fixtures"
DATA = REPO / "data"  # the prompt sets shipped with the project


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(record) for record in records])


# ----------------------------------------------------------------------------- T2I-R1 JSON Lines


def test_t2i_record_all_fields(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            json.dumps({"task_type": "spatial", "prompt": "a cat left of a dog", "nouns": ["cat", "dog"],
                        "spatial_info": {"obj1": "cat", "obj2": "dog", "locality": " Left Of "}}),
            "",
            "   ",
            json.dumps({"prompt": "two cups", "nouns": ["cup"], "numeracy_info": [{"obj_name": "cup", "num": 2}],
                        "task_type": "numeracy", "origin": "x", "attr_nouns": ["white cup"]}),
            json.dumps({"prompt": "a tree"}),
        ],
    )  # fmt: skip
    spatial, numeracy, bare = load_prompts(path)
    assert spatial.task_type == "spatial"
    assert spatial.nouns == ("cat", "dog")
    assert spatial.spatial_info == {"obj1": "cat", "obj2": "dog", "locality": "left of"}
    assert spatial.numeracy_info is None
    assert spatial.source == f"{path}:1"
    assert numeracy.numeracy_info == ({"obj_name": "cup", "num": 2},)
    assert numeracy.attr_nouns == ("white cup",)
    assert numeracy.extra == {"origin": "x"}
    assert numeracy.source == f"{path}:4"
    assert bare == PromptRecord(prompt="a tree", source=f"{path}:5")
    assert bare.task_type == "non" and bare.nouns == () and bare.attr_nouns == ()


def test_json_suffix_read_as_json_lines(tmp_path):
    path = write_records(tmp_path / "train.json", [{"prompt": "a", "task_type": "color"}, {"prompt": "b"}])
    assert [r.prompt for r in load_prompts(path)] == ["a", "b"]


def test_task_type_argument_is_default_for_json_lines(tmp_path):
    path = write_records(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "task_type": "color"}])
    assert [r.task_type for r in load_prompts(path, task_type="toy")] == ["toy", "color"]


def test_shipped_t2i_r1_sample():
    records = load_prompts(FIXTURES / "t2i_r1_sample.jsonl")
    assert len(records) == 64
    counts: dict[str, int] = {}
    for record in records:
        counts[record.task_type] = counts.get(record.task_type, 0) + 1
    assert counts == {
        t: 8 for t in ("spatial", "numeracy", "object", "color", "shape", "texture", "complex", "non")
    }
    assert all(r.spatial_info for r in records if r.task_type == "spatial")
    assert all(r.numeracy_info for r in records if r.task_type == "numeracy")
    assert (FIXTURES / "LICENSE_t2i_r1").is_file()


def test_shipped_toy_prompts():
    records = load_prompts(FIXTURES / "toy_prompts.jsonl")
    assert len(records) == 24
    assert {r.task_type for r in records} == {"color", "shape", "numeracy", "spatial", "complex"}
    for record in records:
        for noun in record.nouns:
            assert noun in record.prompt
        if record.spatial_info:
            assert record.spatial_info["locality"] in record.prompt
    assert all(r.spatial_info for r in records if r.task_type == "spatial")
    assert all(r.numeracy_info for r in records if r.task_type == "numeracy")


def test_real_t2i_r1_training_file():
    path = DATA / "t2i_r1" / "geneval_and_t2i_data_final.jsonl"
    records = load_prompts(path)
    assert len(records) == 7223
    assert sum(r.task_type == "spatial" for r in records) == 2195
    assert sum(r.numeracy_info is not None for r in records) == 1172


# ----------------------------------------------------------------------------- GenEval


def test_geneval_records(tmp_path):
    path = write_records(
        tmp_path / "evaluation_metadata.jsonl",
        [
            {"tag": "counting", "include": [{"class": "clock", "count": 2}],
             "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"},
            {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                            {"class": "dog", "count": 1, "position": ["right of", 0]}],
             "prompt": "a photo of a dog right of a teddy bear"},
            {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                              {"class": "apple", "count": 1, "color": "black"}],
             "prompt": "a photo of a purple wine glass and a black apple"},
        ],
    )  # fmt: skip
    counting, position, color = load_prompts(path)
    assert counting.task_type == "counting"
    assert counting.nouns == ("clock",)
    assert counting.numeracy_info == ({"obj_name": "clock", "num": 2},)
    assert counting.extra["exclude"] == [{"class": "clock", "count": 3}]
    assert position.spatial_info == {"obj1": "dog", "obj2": "teddy bear", "locality": "right of"}
    assert position.numeracy_info is None
    assert position.nouns == ("teddy bear", "dog")
    assert color.attr_nouns == ("purple wine glass", "black apple")
    assert color.spatial_info is None and color.numeracy_info is None


def test_real_geneval_file():
    path = DATA / "geneval" / "evaluation_metadata.jsonl"
    records = load_prompts(path)
    assert len(records) == 553
    positions = [r for r in records if r.task_type == "position"]
    assert len(positions) == 100 and all(r.spatial_info for r in positions)


@pytest.mark.parametrize(
    ("include", "field"),
    [
        (
            [{"class": "dog", "count": 1, "position": ["behind", 0]}, {"class": "cat", "count": 1}],
            "include[0].position",
        ),
        (
            [{"class": "dog", "count": 1, "position": ["left of", 5]}, {"class": "cat", "count": 1}],
            "include[0].position",
        ),
        ([{"class": "dog", "count": 1}], "include"),
        ([{"count": 1}], "include[0].class"),
    ],
)
def test_geneval_errors(tmp_path, include, field):
    path = write_records(tmp_path / "g.jsonl", [{"tag": "position", "include": include, "prompt": "p"}])
    with pytest.raises(PromptDataError) as info:
        load_prompts(path)
    message = str(info.value)
    assert str(path) in message and "line 1" in message and repr(field) in message


# ----------------------------------------------------------------------------- T2I-CompBench text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("color_train.txt", "color"),
        ("non_spatial_val.txt", "non_spatial"),
        ("3d_spatial_train.txt", "3d_spatial"),
        ("numeracy_val.txt", "numeracy"),
        ("my_prompts.txt", "non"),
        ("holiday_train.txt", "non"),
    ],
)
def test_compbench_task_type(name, expected):
    assert compbench_task_type(name) == expected


def test_text_file(tmp_path):
    path = write_lines(tmp_path / "non_spatial_val.txt", ["  a dog runs  ", "", "a cat sleeps"])
    records = load_prompts(path)
    assert [r.prompt for r in records] == ["a dog runs", "a cat sleeps"]
    assert {r.task_type for r in records} == {"non_spatial"}
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]
    assert {r.task_type for r in load_prompts(path, task_type="mine")} == {"mine"}


def test_a_text_file_of_json_records_is_refused(tmp_path):
    """JSON Lines saved as .txt would train on the JSON text itself as prompts."""
    path = write_lines(tmp_path / "prompts.txt", ["a dog runs", json.dumps({"prompt": "a red circle"})])
    with pytest.raises(PromptDataError, match=r"prompts\.txt, line 2: .*JSON record.*\.jsonl"):
        load_prompts(path)
    path = write_lines(tmp_path / "braces.txt", ["{a dog} runs", "{ a cat }"])  # braces that are not JSON are text
    assert [r.prompt for r in load_prompts(path)] == ["{a dog} runs", "{ a cat }"]


def test_real_compbench_file():
    path = DATA / "t2i_compbench" / "3d_spatial_train.txt"
    records = load_prompts(path)
    assert len(records) == 700 and records[0].task_type == "3d_spatial"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ('{"prompt": "a cat", ', None, "malformed JSON"),
        ('["a cat"]', None, "JSON object"),
        ('"a cat"', None, "JSON object"),
        ('{"task_type": "color"}', "prompt", "missing"),
        ('{"prompt": ""}', "prompt", "non-empty"),
        ('{"prompt": 3}', "prompt", "string"),
        ('{"prompt": "p", "task_type": 1}', "task_type", "string"),
        ('{"prompt": "p", "nouns": "cat"}', "nouns", "list"),
        ('{"prompt": "p", "nouns": ["cat", 2]}', "nouns[1]", "string"),
        ('{"prompt": "p", "attr_nouns": [null]}', "attr_nouns[0]", "string"),
        ('{"prompt": "p", "spatial_info": ["cat"]}', "spatial_info", "object"),
        ('{"prompt": "p", "spatial_info": {"obj1": "a", "obj2": "b"}}', "spatial_info.locality", "missing"),
        ('{"prompt": "p", "spatial_info": {"obj1": "a", "obj2": 2, "locality": "near"}}', "spatial_info.obj2", "string"),
        ('{"prompt": "p", "spatial_info": {"obj1": "a", "obj2": "b", "locality": "behind"}}',
         "spatial_info.locality", "unknown locality 'behind'"),
        ('{"prompt": "p", "spatial_info": {"obj1": "a", "obj2": "b", "locality": "near", "x": 1}}',
         "spatial_info", "unknown keys"),
        ('{"prompt": "p", "numeracy_info": {"obj_name": "a", "num": 1}}', "numeracy_info", "list"),
        ('{"prompt": "p", "numeracy_info": [{"obj_name": "a", "num": -1}]}', "numeracy_info[0].num", ">= 0"),
        ('{"prompt": "p", "numeracy_info": [{"obj_name": "a", "num": true}]}', "numeracy_info[0].num", "integer"),
        ('{"prompt": "p", "numeracy_info": [{"obj_name": "a", "num": 2.0}]}', "numeracy_info[0].num", "integer"),
        ('{"prompt": "p", "numeracy_info": [{"num": 2}]}', "numeracy_info[0].obj_name", "missing"),
    ],
)  # fmt: skip
def test_bad_record_names_file_line_and_field(tmp_path, line, field, words):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "fine"}', "", line])
    with pytest.raises(PromptDataError) as info:
        load_prompts(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    if field is not None:
        assert f"field {field!r}" in message
    assert words in message


def test_json_array_file_is_refused_clearly(tmp_path):
    path = write_lines(tmp_path / "array.json", ["", "[", '  {"prompt": "a"}', "]"])
    with pytest.raises(PromptDataError, match="JSON array"):
        load_prompts(path)


def test_missing_file(tmp_path):
    with pytest.raises(PromptDataError, match="prompt file not found: .*nope.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.txt"])
def test_empty_file(tmp_path, name):
    path = write_lines(tmp_path / name, ["", "  "])
    with pytest.raises(PromptDataError, match="holds no prompts") as info:
        load_prompts(path)
    assert name in str(info.value)


def test_unknown_suffix(tmp_path):
    path = write_lines(tmp_path / "prompts.csv", ["a,b"])
    with pytest.raises(PromptDataError) as info:
        load_prompts(path)
    assert "prompts.csv" in str(info.value)
    for suffix in (".jsonl", ".json", ".txt"):
        assert suffix in str(info.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(PromptDataError, match="UTF-8"):
        load_prompts(path)


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some Windows editors write first


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("color_val.txt", "a red car\na blue sky\n"),
        ("p.jsonl", '{"prompt": "a red car"}\n{"prompt": "a blue sky"}\n'),
        ("p.json", '{"prompt": "a red car"}\r\n{"prompt": "a blue sky"}\r\n'),
        ("wise.json", '[{"prompt_id": 1, "Prompt": "a red car"},\n {"prompt_id": 2, "Prompt": "a blue sky"}]'),
    ],
)
def test_leading_byte_order_mark_is_dropped(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(BOM + text.encode("utf-8"))
    assert [r.prompt for r in load_prompts(path)] == ["a red car", "a blue sky"]


def test_json_lines_split_only_at_line_breaks(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+0085 verbatim; str.splitlines would cut the record there.
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028cat\x85dog"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (record,) = load_prompts(path)
    assert record.prompt == "a\u2028cat\x85dog" and record.source == f"{path}:1"


def test_folder_given_as_prompt_file(tmp_path):
    (tmp_path / "prompts").mkdir()
    with pytest.raises(PromptDataError, match=r"prompts is a folder, not a prompt file \(a \.jsonl"):
        load_prompts(tmp_path / "prompts")
    dm = PromptDataModule(train_file=str(tmp_path))
    with pytest.raises(PromptDataError, match=f"^{tmp_path} is a folder, not a prompt file"):
        dm.setup("fit")


def test_malformed_json_message_says_at_once(tmp_path):
    path = write_lines(tmp_path / "nul.jsonl", ['{"prompt": "fine"}', '{"prompt": "a cat\x00"}'])
    with pytest.raises(PromptDataError) as info:
        load_prompts(path)
    assert str(info.value) == f"{path}, line 2: malformed JSON (Invalid control character '\\x00' at column 18)"
    wise = tmp_path / "wise.json"
    wise.write_text('[\n  {"prompt_id": 1, "Prompt": "a\x00"}\n]', encoding="utf-8")
    with pytest.raises(PromptDataError) as info:
        load_prompts(wise)
    assert str(info.value) == f"{wise}, line 2: malformed JSON (Invalid control character '\\x00' at column 32)"
    truncated = write_lines(tmp_path / "cut.jsonl", ['{"prompt": '])
    with pytest.raises(PromptDataError) as info:
        load_prompts(truncated)
    assert str(info.value) == f"{truncated}, line 1: malformed JSON (Expecting value at column 12)"


# ----------------------------------------------------------------------------- datamodule


@pytest.fixture
def ten_prompts(tmp_path) -> Path:
    return write_records(
        tmp_path / "ten.jsonl",
        [{"prompt": f"prompt {i}", "task_type": "numeracy", "nouns": ["cup"],
          "numeracy_info": [{"obj_name": "cup", "num": i}]} for i in range(10)],
    )  # fmt: skip


def prompts_of(loader) -> list[list[str]]:
    return [[record.prompt for record in batch] for batch in loader]


def test_train_batches_are_record_lists(ten_prompts):
    dm = PromptDataModule(train_file=str(ten_prompts), batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    # Every training step gets a full batch: the incomplete last one is dropped (it returns reshuffled).
    assert [len(b) for b in batches] == [4, 4]
    assert all(isinstance(r, PromptRecord) for b in batches for r in b)
    both_epochs = batches + list(loader)
    seen = {r.prompt: r for b in both_epochs for r in b}
    assert len(seen) > 8  # the second epoch's order differs, so dropped prompts come back
    record = next(r for r in seen.values() if r.numeracy_info[0]["num"] == 7)
    assert record.numeracy_info == ({"obj_name": "cup", "num": 7},) and record.nouns == ("cup",)
    evaluation = PromptDataModule(val_file=str(ten_prompts), val_batch_size=4)
    evaluation.setup("validate")
    assert [len(b) for b in evaluation.val_dataloader()] == [4, 4, 2]


def test_resume_continues_the_same_shuffled_order(ten_prompts):
    from datamodules.prompts import GlobalBatches
    from datamodules.prompts import load_prompts as load

    records = load(ten_prompts)
    whole = GlobalBatches(records, 3, True, 5, True)
    epochs = [[[r.prompt for r in b] for b in whole] for _ in range(2)]
    resumed = GlobalBatches(records, 3, True, 5, True)
    resumed.resume(epoch=0, batches_done=2)
    assert [[r.prompt for r in b] for b in resumed] == epochs[0][2:]
    assert [[r.prompt for r in b] for b in resumed] == epochs[1]  # and the next epoch as before
    at_end = GlobalBatches(records, 3, True, 5, True)
    at_end.resume(epoch=0, batches_done=3)  # saved after the last batch of epoch 0
    assert [[r.prompt for r in b] for b in at_end] == epochs[1]


def test_train_order_is_seeded(ten_prompts):
    def order(seed: int) -> list[list[str]]:
        dm = PromptDataModule(train_file=str(ten_prompts), batch_size=3, seed=seed)
        dm.setup("fit")
        return prompts_of(dm.train_dataloader())

    assert order(1) == order(1)
    assert order(1) != order(2)
    unshuffled = PromptDataModule(train_file=str(ten_prompts), batch_size=5, shuffle=False)
    unshuffled.setup("fit")
    assert prompts_of(unshuffled.train_dataloader())[0] == [f"prompt {i}" for i in range(5)]


def test_fewer_prompts_than_batch_size(ten_prompts):
    dm = PromptDataModule(train_file=str(ten_prompts), batch_size=32)
    dm.setup("fit")
    assert [len(b) for b in dm.train_dataloader()] == [10]


def test_max_prompts_and_val_batch_size(ten_prompts):
    dm = PromptDataModule(train_file=str(ten_prompts), val_file=str(ten_prompts), batch_size=2,
                          val_batch_size=3, max_prompts=7)  # fmt: skip
    dm.setup("fit")
    assert len(dm.records["train"]) == 7
    assert prompts_of(dm.val_dataloader()) == [["prompt 0", "prompt 1", "prompt 2"],
                                               ["prompt 3", "prompt 4", "prompt 5"], ["prompt 6"]]  # fmt: skip


def test_stages_load_only_what_they_need(ten_prompts, tmp_path):
    txt = write_lines(tmp_path / "color_val.txt", ["a red car", "a blue sky"])
    dm = PromptDataModule(train_file=str(ten_prompts), test_file=str(txt), predict_file=str(txt))
    dm.setup("fit")
    assert set(dm.records) == {"train"}
    assert dm.val_dataloader() == []
    dm.setup("test")
    assert [r.task_type for b in dm.test_dataloader() for r in b] == ["color", "color"]
    dm.setup("predict")
    assert len(list(dm.predict_dataloader())) == 1


@pytest.mark.parametrize(
    ("stage", "key"),
    [("fit", "data.train_file"), ("validate", "data.val_file"), ("test", "data.test_file"),
     ("predict", "data.predict_file")],
)  # fmt: skip
def test_missing_file_names_config_key(stage, key):
    with pytest.raises(PromptDataError, match=key.replace(".", r"\.")):
        PromptDataModule().setup(stage)


@pytest.mark.parametrize(
    ("stage", "split"), [(TrainerFn.VALIDATING, "val"), (TrainerFn.TESTING, "test"), (TrainerFn.PREDICTING, "predict")]
)
def test_missing_file_names_the_stage_not_the_enum(stage, split):
    # Lightning calls setup with a TrainerFn, a str enum whose repr is `<TrainerFn.VALIDATING: 'validate'>`.
    with pytest.raises(PromptDataError) as info:
        PromptDataModule().setup(stage)
    assert str(info.value).startswith(f"stage {stage.value!r} needs {split} prompts: set data.{split}_file")


def test_trainer_validate_without_val_file_names_the_stage():
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(PromptDataError, match=r"^stage 'validate' needs val prompts"):
        trainer.validate(_CountingModule(), datamodule=PromptDataModule())


def test_missing_path_is_reported_at_setup(tmp_path):
    dm = PromptDataModule(train_file=str(tmp_path / "absent.jsonl"))
    with pytest.raises(PromptDataError, match="prompt file not found: .*absent.jsonl"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"val_batch_size": 0}, "val_batch_size"),
        ({"max_prompts": 0}, "max_prompts"),
        ({"shuffle": "yes"}, "shuffle"),
        ({"train_file": 3}, "train_file"),
        ({"train_file": ""}, "train_file"),  # Path("") is the current folder
        ({"val_file": "  "}, "val_file"),
    ],
)
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PromptDataModule(**kwargs)


class _CountingModule(pl.LightningModule):
    """Counts the prompts it sees; one parameter so the optimizer has something to hold."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_prompts = 0
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, list) and isinstance(batch[0], PromptRecord)
        self.train_prompts += len(batch)
        return (self.weight * len(batch)).sum()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("with_val", "val_batches"), [(False, 0), (True, 4)])
def test_trainer_fit_with_and_without_validation(ten_prompts, with_val, val_batches):
    dm = PromptDataModule(
        train_file=str(ten_prompts), val_file=str(ten_prompts) if with_val else None, batch_size=3
    )
    model = _CountingModule()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert model.train_prompts == 9  # three full batches of 3; the tenth prompt waits for a later epoch
    assert model.val_batches == val_batches


def test_distributed_processes_each_get_the_whole_global_batch(ten_prompts):
    # What the docstring says: Lightning injects no DistributedSampler, every process sees every prompt.
    doc = " ".join(PromptDataModule.__doc__.split())
    assert "every process gets the same, whole global batch" in doc
    assert "Lightning does not swap in a ``DistributedSampler``" in doc
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert trainer._accelerator_connector.is_distributed and trainer._accelerator_connector.use_distributed_sampler
    dm = PromptDataModule(train_file=str(ten_prompts), batch_size=5, shuffle=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING) is loader
    assert sum(len(batch) for batch in loader) == 10
