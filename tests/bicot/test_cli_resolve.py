"""``--ckpt_path=last`` resolves to the newest last checkpoint of the configured ModelCheckpoint folder."""

from __future__ import annotations

import os

import pytest
from jsonargparse import Namespace

from bicot.cli import resolve_checkpoint


def trainer_config(dirpath) -> Namespace:
    checkpoint = Namespace(
        class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath=str(dirpath))
    )
    return Namespace(
        callbacks=[Namespace(class_path="callbacks.RunMetadata", init_args=Namespace()), checkpoint]
    )


def test_last_is_the_newest_of_last_and_its_versions(tmp_path):
    # A second fresh run into the same folder makes Lightning write last-v1.ckpt beside the first run's last.ckpt.
    for age, name in enumerate(["last-v1.ckpt", "last.ckpt", "last-v2.ckpt"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    assert resolve_checkpoint("last", trainer_config(tmp_path)) == tmp_path / "last-v2.ckpt"
    os.utime(tmp_path / "last.ckpt", (5000, 5000))
    assert resolve_checkpoint("last", trainer_config(tmp_path)) == tmp_path / "last.ckpt"


def test_last_without_a_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_last"):
        resolve_checkpoint("last", trainer_config(tmp_path))
