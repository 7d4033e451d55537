"""Tests for the ORM expert: yes/no arithmetic, the question text, and a tiny LLaVA-OneVision saved and loaded back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from datamodules.records import PromptRecord
from modules.rewards.common import ExpertCheckpointError, yes_probability
from modules.rewards.orm import DEFAULT_QUESTION, ORMExpert, fill_question
from modules.rewards.tiny import save_tiny_orm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_orm(tmp_path_factory.mktemp("orm"))


@pytest.fixture(scope="module")
def expert(tiny_dir):
    return ORMExpert(str(tiny_dir), dtype="float32")


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 20, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_yes_no_arithmetic_with_the_judges_answer_ids(expert):
    vocab = expert.processor.tokenizer.get_vocab()
    assert sorted(expert.yes_ids) == sorted([vocab["Yes"], vocab["yes"]])
    assert sorted(expert.no_ids) == sorted([vocab["No"], vocab["no"]])
    logits = torch.zeros(1, len(vocab))
    logits[0, vocab["Yes"]] = math.log(3.0)  # P(Yes) : P(yes) : P(No) : P(no) = 3 : 1 : 1 : 1
    torch.testing.assert_close(yes_probability(logits, expert.yes_ids, expert.no_ids), torch.tensor([4 / 6]))


def test_question_holds_the_prompt_verbatim():
    assert "{prompt}" in DEFAULT_QUESTION
    text = fill_question(DEFAULT_QUESTION, 'a sign that says "{hello}"')
    assert 'a sign that says "{hello}"' in text and "{prompt}" not in text
    # Other braces of the question are text too, not format fields.
    assert fill_question('Say {"ok": 1}. "{prompt}"?', "a cat") == 'Say {"ok": 1}. "a cat"?'
    with pytest.raises(ValueError, match="must contain"):
        ORMExpert("unused", question="Is it good?")


def test_saved_like_a_real_checkpoint(tiny_dir):
    assert (
        json.loads((tiny_dir / "processor_config.json").read_text())["processor_class"]
        == "LlavaOnevisionProcessor"
    )


def test_chat_text_has_one_image_and_ends_at_the_answer(expert):
    text = expert.chat_text("a red ball")
    assert text.count("<image>") == 1 and "a red ball" in text
    assert text.index("<image>") < text.index("a red ball")  # the image, then the question
    assert text.endswith("<|im_start|>assistant\n")


def test_system_prompt_comes_first_when_set(tiny_dir, expert):
    judge = ORMExpert(str(tiny_dir), dtype="float32", system_prompt="You are a careful judge of images.")
    text = judge.chat_text("a red ball")
    assert text.startswith("<|im_start|>system\nYou are a careful judge of images.")
    assert text.endswith(expert.chat_text("a red ball"))  # the user turn as without it
    assert "system" not in expert.chat_text("a red ball")
    with pytest.raises(ValueError, match="system_prompt must be a text"):
        ORMExpert("unused", system_prompt="  ")


def test_scores_match_one_image_at_a_time(tiny_dir, expert):
    prompts = [PromptRecord("a red ball"), PromptRecord("two cats near a tv on the left of a photo")]
    scores = expert(images(2), prompts)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and ((scores > 0) & (scores < 1)).all()
    torch.testing.assert_close(
        ORMExpert(str(tiny_dir), dtype="float32", batch_size=1)(images(2), prompts), scores
    )
    # The first image by hand: no padding, the logits after the last prompt token.
    inputs = expert.processor(
        images=[images(2)[0].numpy()], text=[expert.chat_text("a red ball")], return_tensors="pt"
    )
    with torch.no_grad():
        logits = expert.model(**inputs).logits[:, -1]
    torch.testing.assert_close(scores[:1], yes_probability(logits, expert.yes_ids, expert.no_ids))


def test_bfloat16_default_and_missing_checkpoint(tiny_dir, tmp_path):
    half = ORMExpert(str(tiny_dir))
    assert half.model.dtype == torch.bfloat16
    scores = half(images(1), [PromptRecord("a red ball")])
    assert scores.dtype == torch.float32 and 0 <= scores.item() <= 1
    with pytest.raises(ExpertCheckpointError, match=r"'orm'.*not found: .*no_orm.*huggingface-cli download"):
        ORMExpert(str(tmp_path / "no_orm"))


def test_tiny_images_score_zero_and_are_counted(expert):
    before = expert.unreadable
    with pytest.warns(UserWarning, match="too small"):
        scores = expert(torch.zeros(1, 1, 1, 3, dtype=torch.uint8), [PromptRecord("a red ball")])
    assert scores.tolist() == [0.0] and expert.unreadable == before + 1
