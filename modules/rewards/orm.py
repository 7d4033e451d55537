"""Outcome reward model expert: a LLaVA-OneVision judge asked whether the image shows the prompt; P(yes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.processing_utils import ProcessorMixin

from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert
from modules.rewards.common import (
    answer_token_ids,
    check_batch_size,
    chunks,
    last_token_logits,
    load_model_and_processor,
    to_pil,
    yes_probability,
)

# Our wording. The ORM was fine-tuned on a question of its own; see the class docstring.
DEFAULT_QUESTION = (
    'Here is an image and a description of it: "{prompt}". '
    "Does the image show everything the description asks for, accurately? Answer Yes or No."
)


class ImageTextProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without its video processor.

    Building the full processor also builds its video processor, which needs torchvision; scoring
    images needs only the image processor, the tokenizer and the image-token arithmetic of the parent
    class, which this keeps. Loads the same ``save_pretrained`` folders.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs,
    ) -> None:
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token = video_token
        self.video_token_id = None
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def fill_question(template: str, prompt: str) -> str:
    """``template`` with ``{prompt}`` replaced verbatim (prompt text is data, never a format string)."""
    return template.replace("{prompt}", prompt)


class ORMExpert(RewardExpert):
    """Asks a LLaVA-OneVision judge whether the image accurately represents the prompt.

    Score: P(yes) / (P(yes) + P(no)) from the logits of the first answer token (every single-token
    spelling of "Yes"/"yes" counts as yes, likewise for no), in ``[0, 1]``.

    Not verified without the real weights: ``CaraJ/ORM-T2I-R1`` was fine-tuned with its own question
    and chat format. The question here is our wording (``question``); a wording far from the
    fine-tuning one may make the judge less sharp. The checkpoint must be in transformers'
    ``LlavaOnevisionForConditionalGeneration`` layout.

    Args:
        model_name_or_path: the judge, a local folder or hub id (default ``CaraJ/ORM-T2I-R1``).
        question: the user turn, with ``{prompt}`` where the prompt goes.
        system_prompt: a system turn before it (``None``: none, as the checkpoint's chat template writes by
            default). LLaVA-OneVision's Qwen conversations were trained with one; set it to match the judge's
            fine-tuning format where it is known.
        dtype: weight dtype (7B in bfloat16 needs ~16 GB).
        batch_size: images per forward (``None``: all at once).
        placement: ``device``, ``cpu`` or ``offload`` (see :class:`RewardExpert`).
        trust_remote_code: passed to ``from_pretrained``; never on unless set.
        attn_implementation: attention kernel (``sdpa``, ``eager``, ``flash_attention_2``).
    """

    name = "orm"

    def __init__(
        self,
        model_name_or_path: str = "CaraJ/ORM-T2I-R1",
        question: str = DEFAULT_QUESTION,
        system_prompt: str | None = None,
        dtype: str = "bfloat16",
        batch_size: int | None = 4,
        placement: str = "device",
        trust_remote_code: bool = False,
        attn_implementation: str | None = "sdpa",
    ) -> None:
        super().__init__(placement)
        if "{prompt}" not in question:
            raise ValueError(f"reward expert 'orm': question must contain '{{prompt}}', got {question!r}")
        self.question = question
        if system_prompt is not None and not (isinstance(system_prompt, str) and system_prompt.strip()):
            raise ValueError(f"reward expert 'orm': system_prompt must be a text or null, got {system_prompt!r}")
        self.system_prompt = system_prompt
        self.batch_size = check_batch_size(batch_size, self.name)
        self.model, self.processor = load_model_and_processor(
            LlavaOnevisionForConditionalGeneration,
            ImageTextProcessor,
            model_name_or_path,
            self.name,
            dtype,
            trust_remote_code,
            attn_implementation=attn_implementation,
        )
        tokenizer = self.processor.tokenizer
        self.yes_ids = answer_token_ids(tokenizer, ("Yes", "yes"))
        self.no_ids = answer_token_ids(tokenizer, ("No", "no"))

    def chat_text(self, prompt: str) -> str:
        """The judge's input text for one prompt: one image, the question, then the assistant's turn."""
        content = [{"type": "image"}, {"type": "text", "text": fill_question(self.question, prompt)}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def first_answer_logits(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``[n, V]`` float32 logits of the first answer token for uint8 images ``[n, H, W, 3]``."""
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "right"  # last real token = mask length - 1
        try:
            inputs = self.processor(
                images=to_pil(images),
                text=[self.chat_text(p) for p in prompts],
                padding=True,
                return_tensors="pt",
            )
        finally:
            tokenizer.padding_side = side
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        logits = self.model(**inputs).logits  # [n, L, V]
        return last_token_logits(logits, inputs["attention_mask"]).float()

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]`` in ``[0, 1]``: the judge's P(yes)."""
        n, height, width, _ = images.shape
        if height < 2 or width < 2:
            self.mark_unreadable(n, f"images of shape {tuple(images.shape)} are too small for the judge")
            return torch.zeros(n)
        scores = torch.empty(n)
        for rows in chunks(n, self.batch_size):
            logits = self.first_answer_logits(images[rows], [r.prompt for r in prompts[rows]])
            scores[rows] = yes_probability(logits, self.yes_ids, self.no_ids).cpu()
        return scores
