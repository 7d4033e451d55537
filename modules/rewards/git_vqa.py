"""GIT VQA expert: asks "{phrase}?" for each attribute phrase of the prompt and averages P(yes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoProcessor, GitForCausalLM

from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert
from modules.rewards.common import (
    answer_token_ids,
    check_batch_size,
    chunks,
    last_token_logits,
    load_model_and_processor,
    right_pad,
    to_pil,
    unique,
    yes_probability,
)

# Categories the VQA expert does not judge (REWARDS.md: 0 for spatial and numeracy prompts); GenEval
# calls them "position" and "counting".
UNJUDGED_TASKS: tuple[str, ...] = ("spatial", "numeracy", "position", "counting")


def vqa_phrases(record: PromptRecord) -> list[str] | None:
    """What to ask about: the attribute phrases, else the nouns; ``None`` for an unjudged category."""
    if record.task_type.strip().lower() in UNJUDGED_TASKS:
        return None
    return unique(record.attr_nouns) or unique(record.nouns)


def combine_answers(
    per_question: torch.Tensor, owner: Sequence[int], phrases: Sequence[list[str] | None]
) -> torch.Tensor:
    """Per-image scores from per-question P(yes): the mean, 0 for unjudged images, 1 without phrases.

    Args:
        per_question: float ``[Q]`` P(yes) of each question.
        owner: ``Q`` image indices, the image each question is about.
        phrases: ``N`` phrase lists (``None``: unjudged category).

    Returns:
        float32 ``[N]`` in ``[0, 1]``.
    """
    n = len(phrases)
    total = torch.zeros(n).index_add_(
        0, torch.tensor(list(owner), dtype=torch.long), per_question.float().cpu()
    )
    count = torch.tensor([len(p) if p else 0 for p in phrases], dtype=torch.float32)
    scores = torch.where(count > 0, total / count.clamp(min=1), torch.ones(n))
    unjudged = torch.tensor([p is None for p in phrases])
    return torch.where(unjudged, torch.zeros(n), scores)


class GitVQAExpert(RewardExpert):
    """GIT-large fine-tuned on VQAv2, asked one yes/no question per attribute phrase.

    For each phrase ("purple elephant"; the nouns when a prompt has no attribute phrases) the question
    is ``"{phrase}?"``; the answer's P(yes) / (P(yes) + P(no)) comes from the first answer token's
    logits, and an image's score is the mean over its phrases, in ``[0, 1]``. Spatial and numeracy
    prompts (T2I-R1 ``spatial``/``numeracy``, GenEval ``position``/``counting``) score 0; a prompt without
    nouns scores 1.

    Args:
        model_name_or_path: a local folder or hub id (default ``microsoft/git-large-vqav2``).
        dtype: weight dtype.
        batch_size: questions per forward (``None``: all at once).
        placement: ``device``, ``cpu`` or ``offload`` (see :class:`RewardExpert`).
        trust_remote_code: passed to ``from_pretrained``; never on unless set.
    """

    name = "git"

    def __init__(
        self,
        model_name_or_path: str = "microsoft/git-large-vqav2",
        dtype: str = "float32",
        batch_size: int | None = 64,
        placement: str = "device",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(placement)
        self.batch_size = check_batch_size(batch_size, self.name)
        self.model, self.processor = load_model_and_processor(
            GitForCausalLM, AutoProcessor, model_name_or_path, self.name, dtype, trust_remote_code
        )
        tokenizer = self.processor.tokenizer
        self.yes_ids = answer_token_ids(tokenizer, ("yes",))
        self.no_ids = answer_token_ids(tokenizer, ("no",))

    def question_ids(self, phrase: str) -> list[int]:
        """``[CLS]`` + the question's tokens, no ``[SEP]``: GIT continues the text with the answer."""
        tokenizer = self.processor.tokenizer
        return [tokenizer.cls_token_id, *tokenizer(f"{phrase}?", add_special_tokens=False).input_ids]

    def answer_yes(self, pixels: torch.Tensor, questions: Sequence[str]) -> torch.Tensor:
        """float32 ``[Q]`` P(yes) for questions about the images ``pixels`` ``[Q, 3, S, S]`` (one each)."""
        ids, mask = right_pad(
            [self.question_ids(q) for q in questions], self.processor.tokenizer.pad_token_id
        )
        out = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), pixel_values=pixels
        )
        # GIT's logits cover the image positions first, then the text: last_token_logits skips them.
        return yes_probability(last_token_logits(out.logits, mask.to(self.device)), self.yes_ids, self.no_ids)

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]`` in ``[0, 1]``."""
        n, height, width, _ = images.shape
        phrases = [vqa_phrases(record) for record in prompts]
        owner = [i for i, p in enumerate(phrases) for _ in (p or [])]  # [Q] image of each question
        questions = [q for p in phrases for q in (p or [])]  # [Q]
        if not questions:
            return combine_answers(torch.zeros(0), owner, phrases)
        if height < 2 or width < 2:
            self.mark_unreadable(n, f"images of shape {tuple(images.shape)} are too small to ask about")
            return torch.zeros(n)
        needed = sorted(set(owner))  # pixels only for the images that get questions
        pixels = self.processor.image_processor(
            images=to_pil(images[needed]), return_tensors="pt"
        ).pixel_values
        pixels = pixels.to(self.device, self.model.dtype)  # [n', 3, S, S]
        slot = {image: i for i, image in enumerate(needed)}
        which = torch.tensor([slot[i] for i in owner], device=self.device)  # [Q]
        answers = torch.empty(len(questions))
        for rows in chunks(len(questions), self.batch_size):
            answers[rows] = self.answer_yes(pixels[which[rows]], questions[rows]).cpu()
        return combine_answers(answers, owner, phrases)
