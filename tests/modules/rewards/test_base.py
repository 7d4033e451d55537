"""Tests for RewardExpert's placement (device / cpu / offload), eval mode, and scoring a folder on its own."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from datamodules.prompts import PromptDataError
from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert
from modules.rewards.color import ColorMatchExpert
from modules.rewards.ensemble import RewardEnsemble
from modules.rewards.folder import ImageFolderPrompts, prompt_from_filename, score_folder


class SpyExpert(RewardExpert):
    """Records where its weight is while scoring; scores every image 0.5."""

    def __init__(self, name: str, placement: str) -> None:
        super().__init__(placement)
        self.name = name
        self.layer = nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))
        self.dropout = nn.Dropout(0.5)
        self.seen: list[torch.device] = []

    def score(self, images, prompts):
        self.seen.append(self.layer.weight.device)
        return torch.full((images.shape[0],), 0.5)


def batch(n: int = 2):
    return torch.zeros(n, 4, 4, 3, dtype=torch.uint8), [PromptRecord(prompt="a red circle")] * n


def three_experts():
    experts = [
        SpyExpert("on_device", "device"),
        SpyExpert("on_cpu", "cpu"),
        SpyExpert("offloaded", "offload"),
    ]
    return experts, RewardEnsemble(experts)


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="placement must be one of"):
        SpyExpert("x", "gpu")


def test_root_move_reaches_only_device_experts():
    # "meta" stands in for an accelerator: a real move of the root, with no GPU needed.
    (on_device, on_cpu, offloaded), root = three_experts()
    root.to("meta")
    assert on_device.layer.weight.device.type == "meta" and on_device.device.type == "meta"
    for expert in (on_cpu, offloaded):
        assert expert.layer.weight.device.type == "cpu"
        assert expert.scale.device.type == "cpu"
        assert expert.device.type == "cpu"  # reports where the weights are, not where the root went
    assert offloaded._score_device.type == "meta" and on_cpu._score_device.type == "meta"


def test_casts_still_reach_cpu_experts():
    (_, on_cpu, offloaded), root = three_experts()
    root.to(torch.float64)
    assert on_cpu.layer.weight.dtype == torch.float64 and offloaded.layer.weight.dtype == torch.float64
    root.to("meta", torch.float16)  # a move and a cast at once: the cast applies, the move does not
    assert on_cpu.layer.weight.dtype == torch.float16 and on_cpu.layer.weight.device.type == "cpu"


def test_offload_scores_on_the_root_device_and_returns_to_cpu():
    (_, on_cpu, offloaded), root = three_experts()
    before = offloaded.layer.weight.detach().clone()
    root.to("meta")
    scores = offloaded(*batch())
    assert offloaded.seen == [torch.device("meta")]
    assert offloaded.layer.weight.device.type == "cpu" and offloaded.scale.device.type == "cpu"
    assert torch.equal(offloaded.layer.weight, before)  # the CPU weights came back untouched
    torch.testing.assert_close(scores, torch.full((2,), 0.5))
    on_cpu(*batch())
    assert on_cpu.seen == [torch.device("cpu")]


def test_offload_without_a_device_move_scores_on_cpu():
    expert = SpyExpert("offloaded", "offload")
    expert(*batch())
    assert expert.seen == [torch.device("cpu")]


def test_experts_stay_in_eval_mode():
    (on_device, _, _), root = three_experts()
    root.train()
    assert not on_device.training and not on_device.dropout.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_placement_on_a_real_gpu():
    (on_device, on_cpu, offloaded), root = three_experts()
    root.to("cuda")
    assert on_device.device.type == "cuda" and on_cpu.device.type == "cpu" and offloaded.device.type == "cpu"
    images, prompts = batch()
    offloaded(images.cuda(), prompts)
    on_cpu(images.cuda(), prompts)
    assert offloaded.seen[0].type == "cuda" and offloaded.device.type == "cpu"
    assert on_cpu.seen[0].type == "cpu"


# ----------------------------------------------------------------------------- scoring a folder


def save(path, color, size=(8, 8)):
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    save(images / "a red circle_000000.png", (255, 0, 0))
    save(images / "a blue square_000001.png", (0, 0, 255), size=(6, 10))  # another size: its own group
    (images / "broken_000002.png").write_bytes(b"not a png")
    (images / "notes.txt").write_text("ignored: not an image suffix")
    return images


def test_prompt_from_filename():
    assert prompt_from_filename("out/a red circle_000012.png") == "a red circle"
    assert prompt_from_filename("plain name.jpg") == "plain name"


def test_score_folder_scores_each_file_and_counts_unreadable(folder):
    expert = ColorMatchExpert()
    with pytest.warns(UserWarning, match="cannot be opened as images"):
        rows = score_folder(expert, folder, batch_size=3, accelerator="cpu")
    by_name = {row["image"].split("/")[-1]: row for row in rows}
    assert set(by_name) == {"a red circle_000000.png", "a blue square_000001.png", "broken_000002.png"}
    assert by_name["a red circle_000000.png"]["score"] == pytest.approx(1.0)
    assert by_name["a blue square_000001.png"]["score"] == pytest.approx(1.0)
    assert by_name["a blue square_000001.png"]["prompt"] == "a blue square"
    assert by_name["broken_000002.png"] == {**by_name["broken_000002.png"], "score": 0.0, "readable": False}
    assert expert.unreadable == 1


def test_score_folder_with_an_index_file(folder, tmp_path):
    index = tmp_path / "index.jsonl"
    record = {
        "prompt": "a green apple",
        "task_type": "color",
        "nouns": ["apple"],
        "image": "a red circle_000000.png",
    }
    index.write_text(json.dumps(record) + "\n")
    rows = score_folder(ColorMatchExpert(), folder, index=index, accelerator="cpu")
    assert len(rows) == 1 and rows[0]["prompt"] == "a green apple"
    assert rows[0]["score"] < 0.7  # a red image judged against "green"


def test_index_record_without_image_names_the_line(folder, tmp_path):
    index = tmp_path / "index.jsonl"
    index.write_text(json.dumps({"prompt": "a cat"}) + "\n")
    with pytest.raises(PromptDataError, match=r"index.jsonl, line 1: field 'image' is missing"):
        ImageFolderPrompts(folder, index)


def test_index_naming_a_missing_image_names_file_line_and_image(folder, tmp_path):
    index = tmp_path / "index.jsonl"
    names = ["a red circle_000000.png", "gone_000001.png", "broken_000002.png", "also gone.png"]
    index.write_text("".join(json.dumps({"prompt": "a cat", "image": name}) + "\n" for name in names))
    with pytest.raises(PromptDataError) as info:
        ImageFolderPrompts(folder, index)
    assert str(info.value) == (
        f"{index}, line 2: image 'gone_000001.png' not found in {str(folder)!r} "
        "(1 more index entries name missing images)"
    )
    # A file that is there but cannot be decoded is kept: it scores 0 and is counted as unreadable.
    index.write_text(json.dumps({"prompt": "a cat", "image": "broken_000002.png"}) + "\n")
    (item,) = ImageFolderPrompts(folder, index)
    assert item.image is None


def test_file_given_as_the_folder(folder):
    with pytest.raises(PromptDataError, match=r"a red circle_000000.png' is a file, not an image folder$"):
        ImageFolderPrompts(folder / "a red circle_000000.png")
    plans = folder / "plans.jsonl"
    plans.write_text(json.dumps({"prompt": "a cat", "image": "a red circle_000000.png"}) + "\n")
    with pytest.raises(PromptDataError) as info:
        ImageFolderPrompts(plans)
    assert str(info.value) == (
        f"{str(plans)!r} is a file, not an image folder; to score the images it lists, give the folder "
        f"that holds it: {str(folder)!r}"
    )


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(PromptDataError, match="image folder not found"):
        ImageFolderPrompts(tmp_path / "nope")
    with pytest.raises(PromptDataError, match="holds no images"):
        ImageFolderPrompts(tmp_path)
