"""RolloutStatistics: per-step statistics of the rollout that BiCoTGRPO does not log itself."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from bicot.rollout import Rollout


def sampled_nll(logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-prob of the sampled tokens: ``-sum(logp * mask) / sum(mask)``.

    When ``logp`` is the log-prob under the very distribution the tokens were drawn from, this is the
    Monte-Carlo estimate of the per-token entropy (unbiased, from one sample per position). It is
    not exactly that when sampling and scoring differ: top-k/top-p truncate where samples fall but
    ``logp`` is untruncated, and with ``sampling.image_logprob: conditional`` the image tokens come
    from the CFG mixture while ``logp`` is of the conditional logits (a cross-entropy, not an entropy).

    Args:
        logp: ``[R, T]`` log-probs of sampled tokens.
        mask: ``[R, T]`` bool, valid tokens (``None``: all).

    Returns:
        A scalar tensor (0 when no token is valid).
    """
    return masked_mean(-logp, mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """float32 mean of ``values`` over the positions where ``mask`` is set (all when ``None``; 0 when none)."""
    if mask is None:
        return values.float().mean()
    weight = mask.to(torch.float32)
    return (values.float() * weight).sum() / weight.sum().clamp(min=1.0)


def rollout_statistics(r: Rollout) -> dict[str, torch.Tensor]:
    """The statistics of one scored rollout, by metric name.

    Returns:
        ``train/advantage_mean``, ``train/reward_std/<expert>``, ``train/sampled_nll/image``,
        ``train/entropy/image`` and, with plans, ``train/sampled_nll/plan`` and ``train/entropy/plan``;
        scalar tensors.
    """
    out = {"train/advantage_mean": r.advantages.float().mean()}
    for name, scores in r.reward_per_expert.items():
        out[f"train/reward_std/{name}"] = scores.float().std() if r.num_rows > 1 else scores.new_zeros(())
    if r.plan_logp is not None:
        out["train/sampled_nll/plan"] = sampled_nll(r.plan_logp, r.plan_mask)
    out["train/sampled_nll/image"] = sampled_nll(r.image_logp)
    if r.plan_entropy is not None:
        out["train/entropy/plan"] = masked_mean(r.plan_entropy, r.plan_mask)
    if r.image_entropy is not None:
        out["train/entropy/image"] = masked_mean(r.image_entropy)
    return out


class RolloutStatistics(pl.Callback):
    """Logs, every step, what the issue's list asks for beyond what ``BiCoTGRPO`` logs itself.

    ``BiCoTGRPO`` already logs ``train/reward``, ``train/reward/<expert>``, ``train/reward_std``,
    ``train/zero_std_frac``, ``train/kl`` (+ ``_plan``, ``_image``, ``_max``), ``train/clip_frac``,
    ``train/advantage_std``, ``train/plan_tokens``, ``train/lr`` and ``train/grad_norm``. This adds:

    - ``train/advantage_mean``: mean advantage (about 0 by construction; drifts flag a bug);
    - ``train/reward_std/<expert>``: spread of each expert's scores over the step's samples;
    - ``train/sampled_nll/plan`` and ``train/sampled_nll/image``: mean ``-log p`` of the sampled
      tokens, the Monte-Carlo entropy estimate (see :func:`sampled_nll` for when it is exact);
    - ``train/entropy/plan`` and ``train/entropy/image``: the exact mean per-token entropy (nats) of the
      distributions the rollout sampled from (a sum over the vocabulary at every step; for image tokens
      the CFG mixture), from the temperature-scaled logits before top-k/top-p.

    Metrics are averaged over data-parallel ranks like the module's own, and written by rank 0.
    """

    def __init__(self) -> None:
        self._seen: Rollout | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        r = getattr(pl_module, "last_rollout", None)
        # a step that produced no new rollout must not log the previous step's numbers again
        if r is None or r is self._seen or r.advantages is None:
            return
        self._seen = r
        for name, value in rollout_statistics(r).items():
            pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=True, batch_size=r.num_rows)
