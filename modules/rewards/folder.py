"""Score a folder of images with one reward expert on its own: the dataset, its loader, and a one-call helper.

Example (HPS on a folder of T2I-CompBench-named images, ``<prompt>_<index>.png``)::

    from modules.rewards.folder import score_folder
    from modules.rewards.hps import HPSExpert

    expert = HPSExpert(checkpoint="weights/HPS_v2.1_compressed.pt", tokenizer="weights/clip-vit-large-patch14")
    for row in score_folder(expert, "samples/", accelerator="gpu"):
        print(row["score"], row["image"], row["prompt"])

With metadata (nouns, spatial_info ...) the prompts come from an index file instead: a T2I-R1 JSON
Lines file whose records carry an extra ``"image"`` field, a path relative to the folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from datamodules.prompts import PromptDataError, load_prompts
from datamodules.records import PromptRecord

if TYPE_CHECKING:
    from modules.rewards.base import RewardExpert

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageItem:
    """One file to score.

    Attributes:
        path: the image file.
        image: uint8 ``[H, W, 3]``, or ``None`` when the file cannot be read as an image.
        record: the prompt the image was drawn for.
    """

    path: str
    image: torch.Tensor | None
    record: PromptRecord


def prompt_from_filename(path: str | Path) -> str:
    """The prompt in a T2I-CompBench-style file name ``<prompt>_<index>.png`` (the stem otherwise)."""
    stem = Path(path).stem
    return re.sub(r"_\d+$", "", stem).strip() or stem


def read_image(path: str | Path) -> torch.Tensor | None:
    """uint8 ``[H, W, 3]`` RGB, or ``None`` when the file is not a readable, non-empty image."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError):
        return None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        return None
    return torch.from_numpy(array.copy())


class ImageFolderPrompts(Dataset):
    """Images of a folder with their prompts, for ``RewardExpert.test_step``.

    Args:
        folder: the images (top level only, by name: ``.png .jpg .jpeg .webp .bmp``).
        index: optional JSON Lines in the T2I-R1 schema whose records add ``"image"`` (a path relative
            to ``folder``); without it every image's prompt is read from its file name.

    Raises:
        PromptDataError: the folder is missing, a file or holds no images, or an index record lacks
            ``image`` or names a file that does not exist. (A file that exists but cannot be decoded is
            kept: its ``ImageItem.image`` is ``None``.)
    """

    def __init__(self, folder: str | Path, index: str | Path | None = None) -> None:
        self.folder = Path(folder)
        if self.folder.is_file():
            hint = ""
            if self.folder.name == "plans.jsonl":
                hint = f"; to score the images it lists, give the folder that holds it: {str(self.folder.parent)!r}"
            raise PromptDataError(f"{str(self.folder)!r} is a file, not an image folder{hint}")
        if not self.folder.is_dir():
            raise PromptDataError(f"image folder not found: {str(self.folder)!r}")
        if index is not None:
            self.items = [(self._indexed_path(record), record) for record in load_prompts(index)]
            self._check_indexed_files()
        else:
            files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            self.items = [(p, PromptRecord(prompt=prompt_from_filename(p), source=str(p))) for p in files]
        if not self.items:
            raise PromptDataError(f"{str(self.folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def _indexed_path(self, record: PromptRecord) -> Path:
        name = record.extra.get("image")
        if not isinstance(name, str) or not name:
            raise PromptDataError(
                f"{_line_of(record)}: field 'image' is missing (the image file, relative to the folder)"
            )
        return self.folder / name

    def _check_indexed_files(self) -> None:
        """Refuse an index that names files which are not there: they would silently score 0."""
        missing = [(path, record) for path, record in self.items if not path.is_file()]
        if not missing:
            return
        path, record = missing[0]
        problem = "is a folder, not an image file" if path.is_dir() else f"not found in {str(self.folder)!r}"
        more = f" ({len(missing) - 1} more index entries name missing images)" if len(missing) > 1 else ""
        raise PromptDataError(f"{_line_of(record)}: image {record.extra['image']!r} {problem}{more}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> ImageItem:
        path, record = self.items[i]
        return ImageItem(path=str(path), image=read_image(path), record=record)


def _line_of(record: PromptRecord) -> str:
    """``"<file>, line <n>"`` for a record read by ``load_prompts`` (its source is ``"<file>:<n>"``)."""
    path, _, line = record.source.rpartition(":")
    return f"{path}, line {line}" if path and line.isdigit() else record.source


def _as_list(batch: list[ImageItem]) -> list[ImageItem]:
    return list(batch)


def image_folder_loader(
    folder: str | Path, index: str | Path | None = None, batch_size: int = 8, num_workers: int = 0
) -> DataLoader:
    """A loader of ``list[ImageItem]`` batches over :class:`ImageFolderPrompts`."""
    dataset = ImageFolderPrompts(folder, index)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_as_list
    )


def score_folder(
    expert: RewardExpert,
    folder: str | Path,
    index: str | Path | None = None,
    batch_size: int = 8,
    **trainer_kwargs: Any,
) -> list[dict[str, Any]]:
    """Score every image of ``folder`` with ``expert`` through ``Trainer.test``.

    Args:
        expert: any :class:`RewardExpert`.
        folder, index: see :class:`ImageFolderPrompts`.
        batch_size: files per test step (the expert may split further by its own ``batch_size``).
        **trainer_kwargs: passed to ``lightning.pytorch.Trainer`` (default: ``accelerator="auto"``,
            one device, no logger, no progress bar).

    Returns:
        One ``{"image", "prompt", "score", "readable"}`` dict per file, in folder order.
    """
    kwargs = dict(
        accelerator="auto", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(**kwargs)
    trainer.test(expert, dataloaders=image_folder_loader(folder, index, batch_size), verbose=False)
    return list(expert.test_scores)
