"""Prompt files (T2I-R1 JSON Lines, GenEval metadata, T2I-CompBench text) and the LightningDataModule over them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.records import LOCALITIES, PromptRecord

JSON_SUFFIXES: tuple[str, ...] = (".jsonl", ".json")
TEXT_SUFFIXES: tuple[str, ...] = (".txt",)

# The eight T2I-CompBench categories; their files are named `<category>_{train,val}.txt`.
COMPBENCH_CATEGORIES: tuple[str, ...] = (
    "color",
    "shape",
    "texture",
    "spatial",
    "non_spatial",
    "complex",
    "numeracy",
    "3d_spatial",
)

# GenEval `position` relations (`include[i]["position"][0]`) in our locality vocabulary.
GENEVAL_RELATIONS: dict[str, str] = {
    "left of": "left of",
    "right of": "right of",
    "above": "above",
    "below": "below",
}

_T2I_KEYS = ("prompt", "task_type", "nouns", "attr_nouns", "spatial_info", "numeracy_info")
_GENEVAL_KEYS = ("prompt", "tag", "include")


class PromptDataError(ValueError):
    """A prompt file is missing, empty or malformed; the message names file, line and field."""


class _Where:
    """Where a record came from, so every error names the file, the line and the field."""

    def __init__(self, path: Path, line: int) -> None:
        self.path = path
        self.line = line

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"

    def error(self, field: str | None, problem: str) -> PromptDataError:
        at = f"{self.path}, line {self.line}"
        return PromptDataError(f"{at}: {problem}" if field is None else f"{at}: field {field!r}: {problem}")


# ----------------------------------------------------------------------------- field checks


def _text(value: Any, where: _Where, field: str) -> str:
    """A non-empty string, stripped."""
    if not isinstance(value, str):
        raise where.error(field, f"must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise where.error(field, "must be a non-empty string")
    return value.strip()


def _count(value: Any, where: _Where, field: str) -> int:
    """An integer >= 0 (JSON true/false would pass as int in Python, so bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(field, f"must be an integer >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise where.error(field, f"must be an integer >= 0, got {value}")
    return value


def _text_list(value: Any, where: _Where, field: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise where.error(field, f"must be a list of strings, got {type(value).__name__}")
    return tuple(_text(item, where, f"{field}[{i}]") for i, item in enumerate(value))


def _mapping(value: Any, where: _Where, field: str, required: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object holding exactly the `required` keys (a typo would otherwise lose metadata)."""
    if not isinstance(value, dict):
        raise where.error(field, f"must be an object with keys {list(required)}, got {type(value).__name__}")
    missing = [key for key in required if key not in value]
    if missing:
        raise where.error(f"{field}.{missing[0]}", "is missing")
    unknown = sorted(set(value) - set(required))
    if unknown:
        raise where.error(field, f"has unknown keys {unknown}; expected exactly {list(required)}")
    return value


def _locality(value: Any, where: _Where, field: str) -> str:
    locality = _text(value, where, field).lower()
    if locality not in LOCALITIES:
        raise where.error(field, f"unknown locality {value!r}; expected one of {list(LOCALITIES)}")
    return locality


def _spatial_info(value: Any, where: _Where) -> dict[str, str]:
    info = _mapping(value, where, "spatial_info", ("obj1", "obj2", "locality"))
    return {
        "obj1": _text(info["obj1"], where, "spatial_info.obj1"),
        "obj2": _text(info["obj2"], where, "spatial_info.obj2"),
        "locality": _locality(info["locality"], where, "spatial_info.locality"),
    }


def _numeracy_info(value: Any, where: _Where) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list):
        raise where.error("numeracy_info", f"must be a list of objects, got {type(value).__name__}")
    items = []
    for i, raw in enumerate(value):
        field = f"numeracy_info[{i}]"
        item = _mapping(raw, where, field, ("obj_name", "num"))
        items.append(
            {
                "obj_name": _text(item["obj_name"], where, f"{field}.obj_name"),
                "num": _count(item["num"], where, f"{field}.num"),
            }
        )
    return tuple(items)


# ----------------------------------------------------------------------------- record schemas


def _t2i_record(obj: dict[str, Any], where: _Where, default_task: str) -> PromptRecord:
    """One record in the T2I-R1 schema; JSON null in an optional field counts as absent."""
    if "prompt" not in obj:
        raise where.error("prompt", "is missing")
    task = obj.get("task_type")
    nouns, attr_nouns = obj.get("nouns"), obj.get("attr_nouns")
    spatial, numeracy = obj.get("spatial_info"), obj.get("numeracy_info")
    return PromptRecord(
        prompt=_text(obj["prompt"], where, "prompt"),
        task_type=default_task if task is None else _text(task, where, "task_type"),
        nouns=() if nouns is None else _text_list(nouns, where, "nouns"),
        attr_nouns=() if attr_nouns is None else _text_list(attr_nouns, where, "attr_nouns"),
        spatial_info=None if spatial is None else _spatial_info(spatial, where),
        numeracy_info=None if numeracy is None else _numeracy_info(numeracy, where),
        source=where.source,
        extra={key: value for key, value in obj.items() if key not in _T2I_KEYS},
    )


def _geneval_objects(value: Any, where: _Where) -> list[dict[str, Any]]:
    """GenEval `include`: a non-empty list of {class, count, [color], [position]}."""
    if not isinstance(value, list) or not value:
        raise where.error("include", "must be a non-empty list of objects")
    objects = []
    for i, raw in enumerate(value):
        field = f"include[{i}]"
        if not isinstance(raw, dict):
            raise where.error(field, f"must be an object, got {type(raw).__name__}")
        if "class" not in raw or "count" not in raw:
            raise where.error(f"{field}.{'class' if 'class' not in raw else 'count'}", "is missing")
        obj = {
            "class": _text(raw["class"], where, f"{field}.class"),
            "count": _count(raw["count"], where, f"{field}.count"),
        }
        if raw.get("color") is not None:
            obj["color"] = _text(raw["color"], where, f"{field}.color")
        if raw.get("position") is not None:
            obj["position"] = raw["position"]
        objects.append(obj)
    return objects


def _geneval_spatial(objects: list[dict[str, Any]], where: _Where) -> dict[str, str]:
    """The one object with `position: [relation, index]` is obj1; the object at `index` is obj2."""
    placed = [i for i, obj in enumerate(objects) if "position" in obj]
    if len(placed) != 1:
        raise where.error(
            "include", f"a 'position' record needs exactly one object with 'position', found {len(placed)}"
        )
    i = placed[0]
    field = f"include[{i}].position"
    position = objects[i]["position"]
    if not (isinstance(position, list) and len(position) == 2 and isinstance(position[0], str)):
        raise where.error(field, f"must be [relation, index], got {position!r}")
    relation, index = position
    if relation not in GENEVAL_RELATIONS:
        raise where.error(field, f"unknown relation {relation!r}; expected one of {list(GENEVAL_RELATIONS)}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(objects) or index == i:
        raise where.error(field, f"index {index!r} does not name another object of 'include'")
    return {
        "obj1": objects[i]["class"],
        "obj2": objects[index]["class"],
        "locality": GENEVAL_RELATIONS[relation],
    }


def _geneval_record(obj: dict[str, Any], where: _Where) -> PromptRecord:
    """One GenEval `evaluation_metadata.jsonl` record, mapped to the T2I-R1 schema.

    `include` and `exclude` stay verbatim in `extra`, for GenEval's own scoring.
    """
    for key in _GENEVAL_KEYS:
        if key not in obj:
            raise where.error(key, "is missing (GenEval records need 'prompt', 'tag' and 'include')")
    tag = _text(obj["tag"], where, "tag")
    objects = _geneval_objects(obj["include"], where)
    numeracy = (
        tuple({"obj_name": o["class"], "num": o["count"]} for o in objects) if tag == "counting" else None
    )
    return PromptRecord(
        prompt=_text(obj["prompt"], where, "prompt"),
        task_type=tag,
        nouns=tuple(o["class"] for o in objects),
        attr_nouns=tuple(f"{o['color']} {o['class']}" for o in objects if "color" in o),
        spatial_info=_geneval_spatial(objects, where) if tag == "position" else None,
        numeracy_info=numeracy,
        source=where.source,
        extra={key: value for key, value in obj.items() if key not in ("prompt", "tag")},
    )


# ----------------------------------------------------------------------------- file readers


def _read_text(path: Path) -> str:
    """The file as text; ``utf-8-sig`` drops a leading byte order mark (editors on Windows write one)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptDataError(f"{path}: not UTF-8 text ({err})") from err
    except OSError as err:
        raise PromptDataError(f"{path}: cannot read prompt file ({err})") from err


def _read_lines(path: Path) -> list[str]:
    return _read_text(path).splitlines()


def _json_lines(path: Path) -> list[str]:
    r"""The lines of a JSON file, split at ``\n``, ``\r\n`` or ``\r`` only.

    ``str.splitlines`` also splits at U+2028, U+0085 and other characters that JSON strings may hold
    verbatim (``json.dumps(..., ensure_ascii=False)`` writes them), which would cut a valid record in two.
    """
    return re.split(r"\r\n|\r|\n", _read_text(path))


def _json_problem(err: json.JSONDecodeError) -> str:
    """json's reason and column, e.g. ``Invalid control character '\\x00' at column 18``.

    ``err.msg`` may itself end in "at" (``Invalid control character at``), so that word is dropped first.
    """
    reason = re.sub(r"\s+at$", "", err.msg)
    if reason.startswith("Invalid control character") and err.pos < len(err.doc):
        reason = f"{reason} {err.doc[err.pos]!r}"
    return f"{reason} at column {err.colno}"


def _load_json_lines(path: Path, default_task: str) -> list[PromptRecord]:
    records = []
    for number, line in enumerate(_json_lines(path), start=1):
        if not line.strip():
            continue
        where = _Where(path, number)
        if not records and line.lstrip().startswith("["):
            # A `.json` file may hold one JSON array instead of JSON Lines; say so rather than fail per line.
            raise where.error(None, "holds a JSON array; bicot reads JSON Lines (one JSON object per line)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise where.error(None, f"malformed JSON ({_json_problem(err)})") from err
        if not isinstance(obj, dict):
            raise where.error(None, f"expected a JSON object, got {type(obj).__name__}")
        # GenEval metadata is the only schema with `include`; everything else is read as T2I-R1.
        if "include" in obj:
            records.append(_geneval_record(obj, where))
        else:
            records.append(_t2i_record(obj, where, default_task))
    return records


def compbench_task_type(path: str | Path) -> str:
    """The T2I-CompBench category of a file named `<category>_{train,val}.txt`, else ``"non"``.

    Example: ``non_spatial_val.txt`` -> ``"non_spatial"``; ``my_prompts.txt`` -> ``"non"``.
    """
    match = re.fullmatch(r"(.+)_(train|val)", Path(path).stem)
    if match and match.group(1) in COMPBENCH_CATEGORIES:
        return match.group(1)
    return "non"


def _json_object(line: str) -> bool:
    """Whether a line of a text file is a JSON object (a record of a JSON Lines file saved as ``.txt``)."""
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _load_text(path: Path, task_type: str | None) -> list[PromptRecord]:
    task = task_type if task_type is not None else compbench_task_type(path)
    records = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        if _json_object(line.strip()):  # its JSON text would be drawn as the prompt
            raise _Where(path, number).error(
                None, "is a JSON record, not a prompt; a .txt file holds one prompt a line: give JSON Lines a .jsonl suffix"
            )
        records.append(PromptRecord(prompt=line.strip(), task_type=task, source=f"{path}:{number}"))
    return records


# WISE (arXiv 2503.07265) ships no license, so bicot never includes its prompts: users point at their
# own copy of its JSON files (a JSON array of {"prompt_id", "Prompt", "Explanation", "Subcategory", ...}).
_WISE_ID = re.compile(r"[A-Za-z0-9_-]+")


class _Record(_Where):
    """A position in a JSON array file: errors name the record (1-based), not a line."""

    def error(self, field: str | None, problem: str) -> PromptDataError:
        at = f"{self.path}, record {self.line}"
        return PromptDataError(f"{at}: {problem}" if field is None else f"{at}: field {field!r}: {problem}")


def _is_json_array(path: Path) -> bool:
    """Whether a ``.json`` file holds one JSON array (WISE) rather than JSON Lines."""
    return _read_text(path).lstrip().startswith("[")


def _wise_record(obj: Any, where: _Record, category: str, seen: dict[str, int]) -> PromptRecord:
    if not isinstance(obj, dict) or "prompt_id" not in obj or "Prompt" not in obj:
        raise where.error(
            None,
            "not a WISE record (an object with 'prompt_id' and 'Prompt'); bicot reads JSON Lines files "
            "and WISE's JSON arrays",
        )
    pid = obj["prompt_id"]
    if isinstance(pid, bool) or not isinstance(pid, (int, str)) or not _WISE_ID.fullmatch(str(pid)):
        raise where.error("prompt_id", f"must be an integer or a name of letters, digits, '_' or '-', got {pid!r}")
    if str(pid) in seen:
        raise where.error("prompt_id", f"{pid!r} repeats record {seen[str(pid)]}; each names one image file")
    seen[str(pid)] = where.line
    category_field = obj.get("Category")
    return PromptRecord(
        prompt=_text(obj["Prompt"], where, "Prompt"),
        task_type=category if category_field is None else _text(category_field, where, "Category"),
        source=where.source,
        extra={key: value for key, value in obj.items() if key != "Prompt"},
    )


def load_wise(path: str | Path, task_type: str | None = None) -> list[PromptRecord]:
    """Read a WISE JSON file (a JSON array) supplied by the user.

    Args:
        path: e.g. ``WISE/data/cultural_common_sense.json``.
        task_type: category of records without ``Category`` (default: the file's stem).

    Returns:
        Records in file order: ``prompt`` from ``Prompt``, ``task_type`` from ``Category`` (or the
        default), every other field (``prompt_id``, ``Explanation``, ``Subcategory``) in ``extra``,
        ``source = "path:<record number>"``.

    Raises:
        PromptDataError: malformed JSON, not an array of WISE records, or a bad or repeated ``prompt_id``.
    """
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise PromptDataError(f"{path}, line {err.lineno}: malformed JSON ({_json_problem(err)})") from err
    if not isinstance(data, list):
        raise PromptDataError(f"{path}: expected a JSON array of WISE records, got {type(data).__name__}")
    category = task_type if task_type is not None else path.stem
    seen: dict[str, int] = {}
    return [_wise_record(obj, _Record(path, i), category, seen) for i, obj in enumerate(data, start=1)]


def load_prompts(path: str | Path, task_type: str | None = None) -> list[PromptRecord]:
    """Read a prompt file into records, choosing the format by suffix.

    * ``.jsonl`` / ``.json`` (JSON Lines): T2I-R1 records (``prompt``, ``task_type``, ``nouns``,
      ``attr_nouns``, ``spatial_info``, ``numeracy_info``; other keys go to ``extra``), or GenEval
      ``evaluation_metadata.jsonl`` records (recognised by ``include``), mapped to the same schema.
    * ``.txt``: one prompt a line (T2I-CompBench).
    * ``.json`` holding one JSON array: a WISE file (see :func:`load_wise`).

    Args:
        path: the prompt file.
        task_type: for ``.txt`` files, the category of every prompt (default: taken from a
            T2I-CompBench file name, else ``"non"``); for JSON Lines, the category of T2I-R1
            records that have no ``task_type`` (default ``"non"``).

    Returns:
        The records in file order, each with ``source = "path:line"``.

    Raises:
        PromptDataError: the file is missing or a folder, unreadable, holds no prompts, has another suffix,
            or a record is malformed (the message names file, line and field).
    """
    path = Path(path)
    if path.is_dir():
        accepted = ", ".join(JSON_SUFFIXES + TEXT_SUFFIXES)
        raise PromptDataError(f"{path} is a folder, not a prompt file (a {accepted} file)")
    if not path.is_file():
        raise PromptDataError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json" and _is_json_array(path):
        records = load_wise(path, task_type)
    elif suffix in JSON_SUFFIXES:
        records = _load_json_lines(path, "non" if task_type is None else task_type)
    elif suffix in TEXT_SUFFIXES:
        records = _load_text(path, task_type)
    else:
        accepted = ", ".join(JSON_SUFFIXES + TEXT_SUFFIXES)
        raise PromptDataError(f"{path}: unsupported prompt file suffix {path.suffix!r}; accepted: {accepted}")
    if not records:
        raise PromptDataError(f"{path} holds no prompts")
    return records


# ----------------------------------------------------------------------------- datamodule


def collate_records(batch: list[PromptRecord]) -> list[PromptRecord]:
    """Keep a batch as the list of records: prompts are text and metadata, not tensors."""
    return list(batch)


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}"
        )


# Which split each Lightning stage needs, and which it may also load.
_STAGE_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fit": (("train",), ("val",)),
    "validate": (("val",), ()),
    "test": (("test",), ()),
    "predict": (("predict",), ()),
}


class PromptDataModule(pl.LightningDataModule):
    """Batches of prompt records for fit / validate / test / predict.

    Every loader yields ``list[PromptRecord]`` of length ``<= batch_size`` (prompts per step; the
    policy draws G samples for each). The train loader shuffles with a ``torch.Generator`` seeded by
    ``seed``, so a run's order is reproducible. Under a distributed strategy every process gets the
    same, whole global batch and takes its own rows of the rollout (``BiCoTGRPO.placement``): the
    loaders serve an iterable dataset, so Lightning does not swap in a ``DistributedSampler`` that
    would split the prompts. Without ``val_file``, ``val_dataloader`` returns ``[]``, which
    Lightning 2.6 accepts and treats as "no validation".

    Args:
        train_file: prompts for ``fit`` (required there).
        val_file: prompts for validation during ``fit`` (optional) and for ``validate`` (required).
        test_file: prompts for ``test``.
        predict_file: prompts for ``predict``.
        batch_size: prompts per training step.
        val_batch_size: prompts per step outside training (default: ``batch_size``).
        shuffle: shuffle the training prompts each epoch.
        seed: seed of the training shuffle.
        max_prompts: keep only the first ``max_prompts`` records of each file (quick runs).
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        max_prompts: int | None = None,
    ) -> None:
        super().__init__()
        files = {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file}
        for split, value in files.items():
            if value is not None and not isinstance(value, (str, Path)):
                raise ValueError(f"{split}_file must be a path or None, got {type(value).__name__} {value!r}")
            if isinstance(value, str) and not value.strip():  # Path("") is the current folder
                raise ValueError(f"{split}_file is an empty path; give a prompt file, or null")
        _check_int("batch_size", batch_size, 1)
        _check_int("val_batch_size", val_batch_size, 1, optional=True)
        _check_int("max_prompts", max_prompts, 1, optional=True)
        _check_int("seed", seed, -(2**63))
        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle must be true or false, got {shuffle!r}")
        # kept in checkpoints, not logged: the run's config artifact records them, and MLflow params cannot change,
        # so a resume with another data value would fail where it logged them again
        self.save_hyperparameters(logger=False)
        self.files = files
        self.batch_size = batch_size
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.max_prompts = max_prompts
        self.records: dict[str, list[PromptRecord]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load the files the stage needs (each once); ``None`` loads every file that is set."""
        # Lightning passes a TrainerFn (a str enum whose repr is `<TrainerFn.VALIDATING: 'validate'>`).
        stage = getattr(stage, "value", stage)
        if stage is None:
            required, optional = (), tuple(self.files)
        elif stage in _STAGE_SPLITS:
            required, optional = _STAGE_SPLITS[stage]
        else:
            raise ValueError(f"unknown stage {stage!r}; expected one of {list(_STAGE_SPLITS)}")
        for split in required:
            if self.files[split] is None:
                raise PromptDataError(
                    f"stage {stage!r} needs {split} prompts: set data.{split}_file "
                    f"(a {', '.join(JSON_SUFFIXES + TEXT_SUFFIXES)} file)"
                )
        for split in required + optional:
            if self.files[split] is not None and split not in self.records:
                records = load_prompts(self.files[split])
                self.records[split] = records if self.max_prompts is None else records[: self.max_prompts]

    def _split(self, split: str) -> list[PromptRecord]:
        if split not in self.records:
            raise RuntimeError(
                f"{split} prompts are not loaded: set data.{split}_file and call setup() first"
            )
        return self.records[split]

    def _loader(self, records: list[PromptRecord], batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        batches = GlobalBatches(records, batch_size, shuffle, self.seed, drop_last)
        # batch_size=None: the dataset yields whole batches. Every process gets the same global batch
        # and takes its own rows of the rollout (BiCoTGRPO.placement); an iterable dataset keeps
        # Lightning from injecting a DistributedSampler that would split the prompts.
        return ResumableLoader(batches, self._batches_done)

    def _batches_done(self) -> int:
        """Training batches the fit loop has taken this epoch (the loader itself runs one batch ahead)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer is not None else 0

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Leave record batches on the host: they hold text, and Lightning's default cannot copy them.

        The default moves tensors inside dataclasses by rebuilding them, which raises
        ``ValueError: A frozen dataclass was passed to apply_to_collection`` on ``PromptRecord``.
        """
        if isinstance(batch, list) and all(isinstance(item, PromptRecord) for item in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader:
        records = self._split("train")
        return self._loader(records, self.batch_size, self.shuffle, len(records) >= self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches, or ``[]`` (Lightning then skips validation) when no val_file is set."""
        if self.files["val"] is None:
            return []
        return self._loader(self._split("val"), self.val_batch_size, False, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), self.val_batch_size, False, False)

    def predict_dataloader(self) -> DataLoader:
        # A plain DataLoader: Lightning rebuilds every predict loader to track batch indices, which
        # ResumableLoader (no sampler arguments) refuses; predictions never resume mid-epoch anyway.
        batches = GlobalBatches(self._split("predict"), self.val_batch_size, False, self.seed, False)
        return DataLoader(batches, batch_size=None, collate_fn=collate_records)


class GlobalBatches(IterableDataset):
    """Global batches of prompt records, the same on every process, reshuffled each epoch.

    Args:
        records: the split's prompts.
        batch_size: prompts per global batch.
        shuffle: reshuffle every epoch.
        seed: base seed of the shuffle (epoch ``e`` uses ``seed + e``).
        drop_last: drop a last, incomplete global batch.
    """

    def __init__(
        self, records: list[PromptRecord], batch_size: int, shuffle: bool, seed: int, drop_last: bool
    ) -> None:
        self.records, self.batch_size, self.shuffle = records, batch_size, shuffle
        self.seed, self.drop_last = seed, drop_last
        self.epoch = 0  # epochs started; the next __iter__ shuffles with seed + epoch
        self.start = 0  # batches to skip at the start of the next epoch (set when resuming)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue epoch ``epoch`` after its first ``batches_done`` batches."""
        if batches_done >= len(self):
            epoch, batches_done = epoch + 1, 0
        self.epoch, self.start = epoch, batches_done

    def __len__(self) -> int:
        full, rest = divmod(len(self.records), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self):
        n = len(self.records)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        self.epoch += 1
        first, self.start = self.start, 0
        for start in range(first * self.batch_size, len(self) * self.batch_size, self.batch_size):
            yield [self.records[i] for i in order[start : start + self.batch_size]]


class ResumableLoader(DataLoader):
    """A DataLoader over :class:`GlobalBatches` whose position Lightning saves in checkpoints.

    Lightning stores ``state_dict()`` of stateful train loaders and calls ``load_state_dict`` on resume,
    so a resumed run continues with the very next batch of the same shuffled order.

    Args:
        batches: the batches to serve.
        batches_done: returns how many batches of the current epoch the training loop has consumed
            (the loader's own count runs ahead because Lightning prefetches).
    """

    def __init__(self, batches: GlobalBatches, batches_done) -> None:
        super().__init__(batches, batch_size=None, collate_fn=collate_records)
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": max(self.dataset.epoch - 1, 0), "batches_done": int(self._batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.dataset.resume(int(state["epoch"]), int(state["batches_done"]))
