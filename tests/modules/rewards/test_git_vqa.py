"""Tests for the GIT VQA expert: yes/no arithmetic from given logits, phrase choice, and a tiny GIT end to end."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.prompts import load_prompts
from datamodules.records import PromptRecord
from modules.rewards.common import (
    ExpertCheckpointError,
    answer_token_ids,
    last_token_logits,
    right_pad,
    yes_probability,
)
from modules.rewards.git_vqa import GitVQAExpert, combine_answers, vqa_phrases
from modules.rewards.tiny import save_tiny_git

# ----------------------------------------------------------------------------- arithmetic


def test_yes_probability_from_logits():
    logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 0.0, -3.0], [-1.0, 3.0, 0.0]])  # ids: 0 yes, 1 no, 2 other
    expected = [math.exp(2) / (math.exp(2) + 1), 0.5, math.exp(-1) / (math.exp(-1) + math.exp(3))]
    torch.testing.assert_close(yes_probability(logits, [0], [1]), torch.tensor(expected))


def test_several_spellings_add_their_probability():
    logits = torch.tensor([[0.0, 0.0, math.log(2.0), -9.0]])  # "Yes", "yes" (mass 1 + 1) vs "No" (mass 2)
    torch.testing.assert_close(yes_probability(logits, [0, 1], [2]), torch.tensor([0.5]))


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1000.0, -1000.0], [-1000.0, 1000.0]], dtype=torch.bfloat16)
    assert yes_probability(logits, [0], [1]).tolist() == [1.0, 0.0]


def test_last_token_logits_skips_image_positions_and_padding():
    ids, mask = right_pad([[5, 6, 7], [5]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [5, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    positions = torch.arange(4 + 3, dtype=torch.float32)  # 4 image positions, then 3 text positions
    logits = positions[None, :, None].expand(2, -1, 2)  # the logit says which position it came from
    assert last_token_logits(logits, mask)[:, 0].tolist() == [6.0, 4.0]


def test_combine_answers():
    phrases = [["red ball", "blue cube"], None, [], ["cat"]]
    scores = combine_answers(torch.tensor([0.2, 0.6, 0.9]), [0, 0, 3], phrases)
    torch.testing.assert_close(scores, torch.tensor([0.4, 0.0, 1.0, 0.9]))


def test_vqa_phrases():
    color = PromptRecord(
        "x", "color", ("elephant", "bear"), ("purple elephant", "blue bear", "purple elephant")
    )
    assert vqa_phrases(color) == ["purple elephant", "blue bear"]
    assert vqa_phrases(PromptRecord("x", "non", ("airplane",))) == ["airplane"]
    assert vqa_phrases(PromptRecord("a quiet evening", "complex")) == []
    for task in ("spatial", "numeracy", "position", "counting", " Spatial "):
        assert vqa_phrases(PromptRecord("x", task, ("car",), ("red car",))) is None


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_git(tmp_path_factory.mktemp("git"))


@pytest.fixture(scope="module")
def expert(tiny_dir):
    return GitVQAExpert(str(tiny_dir))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 20, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_answer_ids_of_the_tiny_tokenizer(expert):
    tokenizer = expert.processor.tokenizer
    assert expert.yes_ids == [tokenizer.convert_tokens_to_ids("yes")]
    assert expert.no_ids == [tokenizer.convert_tokens_to_ids("no")]
    with pytest.raises(ValueError, match="single token"):
        answer_token_ids(tokenizer, ("maybe",))  # not in the tiny vocabulary: [UNK]
    ids = expert.question_ids("red ball")
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "red", "ball", "?"]  # "{phrase}?", no [SEP]


def test_scores_per_category(expert):
    records = load_prompts("datamodules/fixtures/t2i_r1_sample.jsonl")[::8]
    scores = expert(images(len(records)), records)
    assert scores.shape == (len(records),) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    for record, score in zip(records, scores.tolist(), strict=True):
        if record.task_type in ("spatial", "numeracy"):
            assert score == 0.0
        else:
            assert 0.0 < score < 1.0  # a random model is unsure


def test_each_question_sees_its_own_image(expert):
    # Unjudged and noun-less records get no pixels; the images after them must still be their own.
    cat = PromptRecord("a cat", "object", ("cat",))
    pictures = images(4)
    mixed = expert(pictures, [PromptRecord("x", "spatial", ("car",)), PromptRecord("dusk", "non"), cat, cat])
    assert mixed[:2].tolist() == [0.0, 1.0] and mixed[2] != mixed[3]
    torch.testing.assert_close(mixed[2:], expert(pictures[2:], [cat, cat]))


def test_too_small_images_score_zero_and_are_counted(expert):
    before = expert.unreadable
    cats = [PromptRecord("a cat", "object", ("cat",))] * 2
    with pytest.warns(UserWarning, match="too small"):
        scores = expert(torch.zeros(2, 1, 1, 3, dtype=torch.uint8), cats)
    assert scores.tolist() == [0.0, 0.0] and expert.unreadable == before + 2


def test_no_nouns_scores_one_without_the_model(expert, monkeypatch):
    monkeypatch.setattr(expert, "answer_yes", lambda *a: pytest.fail("asked a question without phrases"))
    assert expert(images(2), [PromptRecord("a quiet evening", "complex")] * 2).tolist() == [1.0, 1.0]


def test_padded_batches_match_one_question_at_a_time(tiny_dir, expert):
    records = [
        PromptRecord("x", "color", ("ball",), ("red ball", "blue teddy bear")),
        PromptRecord("y", "object", ("cat",)),
    ]
    batched = expert(images(2), records)
    one_by_one = GitVQAExpert(str(tiny_dir), batch_size=1)(images(2), records)
    torch.testing.assert_close(batched, one_by_one)
    # The second record by hand: one unpadded forward, the logits after the last question token.
    pixels = expert.processor.image_processor(images=[images(2)[1].numpy()], return_tensors="pt").pixel_values
    with torch.no_grad():
        logits = expert.model(
            input_ids=torch.tensor([expert.question_ids("cat")]), pixel_values=pixels
        ).logits[:, -1]
    torch.testing.assert_close(batched[1:], yes_probability(logits, expert.yes_ids, expert.no_ids))


def test_bfloat16_and_missing_checkpoint(tiny_dir, tmp_path):
    half = GitVQAExpert(str(tiny_dir), dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    scores = half(images(1), [PromptRecord("x", "object", ("cat",))])
    assert scores.dtype == torch.float32 and 0 <= scores.item() <= 1
    with pytest.raises(ExpertCheckpointError, match=r"'git'.*not found: .*no_git"):
        GitVQAExpert(str(tmp_path / "no_git"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        GitVQAExpert(str(tiny_dir), dtype="int8")


def test_a_config_that_does_not_match_the_weights_is_one_message(tiny_dir, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(tiny_dir, tmp_path / "git")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2  # every MLP weight of the checkpoint now has the wrong shape
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExpertCheckpointError, match=r"'git'.*config.json does not match its weights"):
        GitVQAExpert(str(folder))
