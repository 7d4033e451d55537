"""Checkpoint swaps that survive a crash at any point, and metadata read from files and distributed folders."""

from __future__ import annotations

import os

import pytest
import torch

from bicot import checkpointing
from bicot.checkpointing import (
    CheckpointMismatchError,
    previous_version,
    read_checkpoint_meta,
    recover_checkpoint,
    swap_into_place,
)


def folder_checkpoint(path, tag: str):
    """A stand-in for a distributed checkpoint: shard files and a meta.pt."""
    path.mkdir()
    (path / "__0_0.distcp").write_text(tag)
    torch.save({"bicot": {"mlflow_run_id": tag}}, path / "meta.pt")
    return path


def test_swap_replaces_a_folder_and_leaves_nothing_aside(tmp_path):
    target = folder_checkpoint(tmp_path / "last.ckpt", "old")
    swap_into_place(folder_checkpoint(tmp_path / ".last.ckpt.tmp", "new"), target)
    assert (target / "__0_0.distcp").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert read_checkpoint_meta(target) == {"mlflow_run_id": "new"}


def test_a_crash_between_the_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    target = folder_checkpoint(tmp_path / "last.ckpt", "old")
    written = folder_checkpoint(tmp_path / ".last.ckpt.tmp", "new")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        swap_into_place(written, target)
    monkeypatch.setattr(checkpointing.os, "replace", real_replace)
    assert not target.exists() and previous_version(target).exists()
    recover_checkpoint(target)  # what a resume does first
    assert read_checkpoint_meta(target) == {"mlflow_run_id": "old"}


def test_swap_replaces_a_file(tmp_path):
    target, written = tmp_path / "last.ckpt", tmp_path / "new.tmp"
    torch.save({"pytorch-lightning_version": "2.6.6", "bicot": {"n": 1}}, target)
    torch.save({"pytorch-lightning_version": "2.6.6", "bicot": {"n": 2}}, written)
    swap_into_place(written, target)
    assert read_checkpoint_meta(target) == {"n": 2} and not written.exists()


def test_a_folder_that_is_not_a_distributed_checkpoint_is_named(tmp_path):
    (tmp_path / "some_folder").mkdir()
    with pytest.raises(CheckpointMismatchError, match="not a distributed checkpoint"):
        read_checkpoint_meta(tmp_path / "some_folder")


def test_a_truncated_a_foreign_and_a_text_file_are_each_named(tmp_path):
    whole = tmp_path / "whole.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {"w": torch.zeros(4096)}, "bicot": {}}, whole)
    assert read_checkpoint_meta(whole) == {}
    (tmp_path / "cut.ckpt").write_bytes(whole.read_bytes()[:5000])
    torch.save({"a": 1}, tmp_path / "foreign.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    for name, reason in [("cut", "not a readable bicot checkpoint"), ("foreign", "not a Lightning checkpoint"),
                         ("text", "not a readable bicot checkpoint")]:
        with pytest.raises(CheckpointMismatchError, match=reason) as caught:
            read_checkpoint_meta(tmp_path / f"{name}.ckpt")
        assert f"{name}.ckpt" in str(caught.value) and "\n" not in str(caught.value)
