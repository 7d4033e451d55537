"""Tests for the reward ensemble and the ColorMatchExpert."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert
from modules.rewards.color import COLORS, ColorMatchExpert, first_color
from modules.rewards.ensemble import RewardEnsemble, RewardExpertError, RewardOutput


class ConstantExpert(RewardExpert):
    """Scores every image with the same value."""

    def __init__(self, name: str, value: float) -> None:
        super().__init__()
        self.name = name
        self.value = value

    def score(self, images, prompts):
        return torch.full((images.shape[0],), self.value)


class IndexExpert(RewardExpert):
    """Scores image i with i / 10, so that each position is distinguishable."""

    name = "index"

    def score(self, images, prompts):
        return torch.arange(images.shape[0], dtype=torch.float64) / 10


class BrokenExpert(RewardExpert):
    name = "broken"

    def score(self, images, prompts):
        raise KeyError("no such box")


def batch(n: int, prompt: str = "a red circle", color=(255, 0, 0), side: int = 4):
    images = torch.tensor(color, dtype=torch.uint8).expand(n, side, side, 3).clone()
    return images, [PromptRecord(prompt=prompt) for _ in range(n)]


# ----------------------------------------------------------------------------- ensemble


def test_equal_weights_by_default():
    ensemble = RewardEnsemble([ConstantExpert("a", 0.25), IndexExpert()])
    out = ensemble(*batch(3))
    assert isinstance(out, RewardOutput)
    assert ensemble.names == ["a", "index"]
    assert ensemble.weights == {"a": 1.0, "index": 1.0}
    torch.testing.assert_close(out.total, torch.tensor([0.25, 0.35, 0.45]))
    torch.testing.assert_close(out.per_expert["index"], torch.tensor([0.0, 0.1, 0.2]))
    assert out.total.dtype == torch.float32 and out.total.device.type == "cpu"
    assert all(s.dtype == torch.float32 for s in out.per_expert.values())


def test_weighted_sum_and_normalisation():
    experts = [ConstantExpert("a", 0.5), ConstantExpert("b", 1.0), IndexExpert()]
    out = RewardEnsemble(experts, weights={"a": 2.0, "b": 0}).forward(*batch(2))
    torch.testing.assert_close(out.total, torch.tensor([2 * 0.5 + 0.0, 2 * 0.5 + 0.1]))
    norm = RewardEnsemble(experts, weights={"a": 2, "b": 1}, normalize_weights=True)
    assert norm.weights == {"a": 0.5, "b": 0.25, "index": 0.25}
    torch.testing.assert_close(norm(*batch(2)).total, torch.tensor([0.5, 0.525]))


def test_experts_are_registered_submodules():
    ensemble = RewardEnsemble([ConstantExpert("a", 0.1), ColorMatchExpert()])
    assert dict(ensemble.named_children())["experts"]["color"].name == "color"


@pytest.mark.parametrize(
    ("weights", "words"),
    [
        ({"nope": 1.0}, "'nope'"),
        ({"a": -1.0}, ">= 0"),
        ({"a": math.nan}, "finite"),
        ({"a": math.inf}, "finite"),
        ({"a": "1"}, "number"),
        ({"a": True}, "number"),
        ({"a": None}, "number"),
    ],
)
def test_bad_weights(weights, words):
    with pytest.raises(ValueError, match=words) as info:
        RewardEnsemble([ConstantExpert("a", 0.1), IndexExpert()], weights=weights)
    assert "['a', 'index']" in str(info.value)


def test_bad_expert_lists():
    with pytest.raises(ValueError, match="at least one"):
        RewardEnsemble([])
    with pytest.raises(ValueError, match="share the name 'a'"):
        RewardEnsemble([ConstantExpert("a", 0.1), ConstantExpert("a", 0.2)])
    with pytest.raises(ValueError, match="sum to 0"):
        RewardEnsemble([ConstantExpert("a", 0.1)], weights={"a": 0.0}, normalize_weights=True)
    with pytest.raises(ValueError, match="sum to 0"):  # normalised or not, nothing would learn
        RewardEnsemble([ConstantExpert("a", 0.1), IndexExpert()], weights={"a": 0.0, "index": 0.0})
    assert RewardEnsemble([ConstantExpert("a", 0.1), IndexExpert()], weights={"a": 0.0}).weights["a"] == 0.0
    with pytest.raises(ValueError, match="RewardExpert"):
        RewardEnsemble([torch.nn.Linear(1, 1)])


def test_expert_error_is_wrapped_with_its_name():
    ensemble = RewardEnsemble([ConstantExpert("a", 0.1), BrokenExpert()])
    with pytest.raises(RewardExpertError) as info:
        ensemble(*batch(3, prompt="a blue square"))
    message = str(info.value)
    assert "'broken'" in message and "3 images" in message and "a blue square" in message
    assert isinstance(info.value.__cause__, KeyError)


def test_on_error_zero_scores_the_failed_expert_zero_and_counts_it():
    ensemble = RewardEnsemble(
        [ConstantExpert("a", 0.25), BrokenExpert(), IndexExpert()], weights={"broken": 2.0}, on_error="zero"
    )
    with pytest.warns(UserWarning, match="'broken' failed on a batch of 3 images.*scoring it 0"):
        out = ensemble(*batch(3))
    assert out.failed == ("broken",) and out.per_expert["broken"].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(out.total, torch.tensor([0.25, 0.35, 0.45]))
    assert ensemble.errors == {"a": 0, "broken": 1, "index": 0}
    with pytest.warns(UserWarning, match="'broken' failed"):
        ensemble(*batch(2))
    assert ensemble.errors == {"a": 0, "broken": 2, "index": 0}
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'zero', got 'skip'"):
        RewardEnsemble([ConstantExpert("a", 0.1)], on_error="skip")


def test_an_expert_failed_on_another_process_is_zeroed_here():
    ensemble = RewardEnsemble([ConstantExpert("a", 0.25), IndexExpert()], weights={"a": 2.0})
    out = ensemble(*batch(3))
    assert ensemble.zero_failed_elsewhere(out, []) is out
    zeroed = ensemble.zero_failed_elsewhere(out, ["index"])
    assert zeroed.failed == ("index",) and zeroed.per_expert["index"].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(zeroed.per_expert["a"], out.per_expert["a"])
    torch.testing.assert_close(zeroed.total, torch.full((3,), 0.5))


def test_expert_input_check_is_wrapped_too():
    images, prompts = batch(2)
    with pytest.raises(RewardExpertError, match="'a'") as info:
        RewardEnsemble([ConstantExpert("a", 0.1)])(images.float(), prompts)
    assert isinstance(info.value.__cause__, ValueError)


# ----------------------------------------------------------------------------- ColorMatchExpert


def test_color_table_and_word_match():
    assert len(COLORS) >= 8
    assert first_color("A Blue circle left of a red square") == "blue"
    assert first_color("a reddish bored tiger") is None
    assert first_color("RED.") == "red"


def test_pure_red_matches_red_prompt():
    expert = ColorMatchExpert()
    images, _ = batch(3)
    prompts = [PromptRecord(prompt=p) for p in ("a red circle", "a blue circle", "a white circle")]
    scores = expert(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert scores[0].item() == pytest.approx(1.0)
    assert scores[1] < scores[0] and scores[2] < scores[0]
    # red (255, 0, 0) to blue (0, 0, 255): distance 255 * sqrt(2)
    assert scores[1].item() == pytest.approx(1 - math.sqrt(2) / math.sqrt(3), abs=1e-6)


def test_default_color_when_prompt_names_none():
    images, prompts = batch(2, prompt="a circle", color=(0, 0, 255))
    assert ColorMatchExpert(default_color="blue")(images, prompts).tolist() == pytest.approx([1.0, 1.0])
    assert ColorMatchExpert()(images, prompts)[0] < 0.5
    with pytest.raises(ValueError, match="unknown default_color 'teal'"):
        ColorMatchExpert(default_color="teal")
    assert ColorMatchExpert(default_color=" Blue ")(images, prompts).tolist() == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("shape", [(2, 0, 4, 3), (2, 4, 0, 3)])
def test_color_of_images_without_pixels_is_zero_and_counted(shape):
    expert = ColorMatchExpert()
    with pytest.warns(UserWarning, match="'color': 2 image"):  # as every expert's unreadable images
        scores = expert(torch.zeros(shape, dtype=torch.uint8), [PromptRecord(prompt="a red ball")] * 2)
    assert scores.tolist() == [0.0, 0.0] and expert.unreadable == 2


def test_color_scores_are_in_range_and_deterministic():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8, generator=generator)
    prompts = [PromptRecord(prompt=p) for p in ("black", "white", "a green cat", "orange", "x", "purple")]
    expert = ColorMatchExpert()
    scores = expert(images, prompts)
    assert scores.shape == (6,)
    assert bool(((scores >= 0) & (scores <= 1)).all())
    torch.testing.assert_close(scores, expert(images, prompts))
    white = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    assert expert(white, [PromptRecord(prompt="black")]).item() == pytest.approx(0.0, abs=1e-6)
