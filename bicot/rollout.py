"""The typed container of one training step: what the rollout produced and what scoring added."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """One step's samples. ``R = P * G`` rows, prompt-major (sample g of prompt p is row ``p*G + g``).

    Plan fields are ``None`` when the policy draws without a plan.
    """

    records: list[Any]
    """``R`` prompt records (each prompt repeated G times), handed to the reward experts."""
    group_size: int
    """G, samples per prompt."""
    plan_context_ids: Tensor | None
    """``[R, Lc]`` left-padded reasoning contexts; ``plan_context_mask`` has the same shape."""
    plan_context_mask: Tensor | None
    plan_tokens: Tensor | None
    """``[R, T]`` sampled plan tokens, pad after EOS."""
    plan_mask: Tensor | None
    """``[R, T]`` bool, valid plan tokens (EOS included)."""
    plan_logp: Tensor | None
    """``[R, T]`` plan log-probs under the sampling policy."""
    plans: list[str] | None
    """``R`` decoded plans."""
    image_cond_ids: Tensor
    """``[R, L]`` left-padded generation contexts ending in begin-of-image; ``image_cond_mask`` too."""
    image_cond_mask: Tensor
    image_uncond_ids: Tensor
    """``[R, L]`` the CFG branch's contexts (prompt replaced by pad), same mask."""
    image_tokens: Tensor
    """``[R, N]`` sampled image tokens."""
    image_logp: Tensor
    """``[R, N]`` image log-probs under the sampling policy (conditional or guided, as configured)."""
    images: Tensor
    """``[R, H, W, 3]`` uint8 decoded images."""
    plan_entropy: Tensor | None = None
    """``[R, T]`` exact entropy of each plan step's sampling distribution (0 off ``plan_mask``)."""
    image_entropy: Tensor | None = None
    """``[R, N]`` exact entropy of each image step's sampling distribution (the CFG mixture)."""
    row_offset: int = 0
    """global index of the first row (rows of a group may sit on several processes)."""
    rewards: Tensor | None = None
    """``[R]`` weighted ensemble reward (filled by the score phase)."""
    global_rewards: Tensor | None = None
    """``[R_global]`` rewards of all processes' rows, in global order (group statistics use these)."""
    reward_per_expert: dict[str, Tensor] = field(default_factory=dict)
    """expert name -> ``[R]`` unweighted scores."""
    advantages: Tensor | None = None
    """``[R]`` group-normalised advantages."""
    ref_plan_logp: Tensor | None = None
    """``[R, T]`` reference log-probs of the plan tokens (``None`` when beta == 0)."""
    ref_image_logp: Tensor | None = None
    """``[R, N]`` reference log-probs of the image tokens."""

    @property
    def num_rows(self) -> int:
        """R, the number of samples."""
        return self.image_tokens.shape[0]

    def rows(self, index: slice) -> Rollout:
        """The same rollout restricted to a slice of rows (a minibatch); plan padding is trimmed."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "global_rewards":
                pass  # global by definition
            elif isinstance(value, Tensor) or (isinstance(value, list) and f.name in ("records", "plans")):
                value = value[index]
            elif isinstance(value, dict):
                value = {k: v[index] for k, v in value.items()}
            out[f.name] = value
        out["row_offset"] = self.row_offset + range(self.num_rows)[index].start
        sub = replace(self, **out)
        if sub.plan_mask is not None:
            width = max(int(sub.plan_mask.sum(1).max()), 1)
            for name in ("plan_tokens", "plan_mask", "plan_logp", "ref_plan_logp", "plan_entropy"):
                if getattr(sub, name) is not None:
                    setattr(sub, name, getattr(sub, name)[:, :width])
        return sub

    def to(self, device: torch.device) -> Rollout:
        """Move every tensor to ``device``."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device)
            elif isinstance(value, dict):
                value = {k: v.to(device) for k, v in value.items()}
            out[f.name] = value
        return replace(self, **out)
