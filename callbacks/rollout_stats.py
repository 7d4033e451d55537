"""RolloutStatistics: per-step statistics of the rollout that BiCoTGRPO does not log itself."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch

from bicot.loss import group_std
from bicot.rollout import Rollout

Gather = Callable[[torch.Tensor], torch.Tensor]  # [R] -> [R_global]: every process's rows, in global order


def _own_rows(values: torch.Tensor) -> torch.Tensor:
    return values


def sampled_nll(
    logp: torch.Tensor, mask: torch.Tensor | None = None, gather: Gather = _own_rows
) -> torch.Tensor:
    """Mean negative log-prob of the sampled tokens: ``-sum(logp * mask) / sum(mask)``.

    When ``logp`` is the log-prob under the very distribution the tokens were drawn from, this is the
    Monte-Carlo estimate of the per-token entropy (unbiased, from one sample per position). It is
    not exactly that when sampling and scoring differ: top-k/top-p truncate where samples fall but
    ``logp`` is untruncated, and with ``sampling.image_logprob: conditional`` the image tokens come
    from the CFG mixture while ``logp`` is of the conditional logits (a cross-entropy, not an entropy).

    Args:
        logp: ``[R, T]`` log-probs of sampled tokens.
        mask: ``[R, T]`` bool, valid tokens (``None``: all).
        gather: the other processes' rows too (see :func:`masked_mean`).

    Returns:
        A scalar tensor (0 when no token is valid).
    """
    return masked_mean(-logp, mask, gather)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor | None = None, gather: Gather = _own_rows
) -> torch.Tensor:
    """float32 mean of ``values`` ``[R, T]`` where ``mask`` is set (everywhere when ``None``; 0 when nowhere),
    over every process's rows when ``gather`` collects them: processes hold different numbers of plan tokens,
    so a mean of each process's mean would be off."""
    weight = torch.ones_like(values, dtype=torch.float32) if mask is None else mask.to(torch.float32)
    sums, counts = gather((values.float() * weight).sum(1)), gather(weight.sum(1))  # [R_global] each
    return sums.sum() / counts.sum().clamp(min=1.0)


def rollout_statistics(r: Rollout, gather: Gather = _own_rows) -> dict[str, torch.Tensor]:
    """The statistics of one scored rollout, by metric name, over the whole step's rows.

    Args:
        r: this process's rows of the step.
        gather: ``[R] -> [R_global]``, every process's rows in global order (a collective: every process makes
            the same calls); by default this process's rows alone, the whole step on one process.

    Returns:
        ``train/advantage_mean``, ``train/reward_std/<expert>`` (the mean spread within groups, as
        ``train/reward_std``), ``train/sampled_nll/image``, ``train/entropy/image`` and, with plans,
        ``train/sampled_nll/plan`` and ``train/entropy/plan``; scalar tensors, the same on every process.
    """
    out = {"train/advantage_mean": gather(r.advantages.float()).mean()}
    for name, scores in r.reward_per_expert.items():
        out[f"train/reward_std/{name}"] = group_std(gather(scores.float()), r.group_size).mean()
    if r.plan_logp is not None:
        out["train/sampled_nll/plan"] = sampled_nll(r.plan_logp, r.plan_mask, gather)
    out["train/sampled_nll/image"] = sampled_nll(r.image_logp, None, gather)
    if r.plan_entropy is not None:
        out["train/entropy/plan"] = masked_mean(r.plan_entropy, r.plan_mask, gather)
    if r.image_entropy is not None:
        out["train/entropy/image"] = masked_mean(r.image_entropy, None, gather)
    return out


class RolloutStatistics(pl.Callback):
    """Logs, every step, what the issue's list asks for beyond what ``BiCoTGRPO`` logs itself.

    ``BiCoTGRPO`` already logs ``train/reward``, ``train/reward/<expert>``, ``train/reward_std``,
    ``train/zero_std_frac``, ``train/kl`` (+ ``_plan``, ``_image``, ``_max``), ``train/clip_frac``,
    ``train/advantage_std``, ``train/plan_tokens``, ``train/lr`` and ``train/grad_norm``. This adds:

    - ``train/advantage_mean``: mean advantage (about 0 by construction; drifts flag a bug);
    - ``train/reward_std/<expert>``: spread of each expert's scores within a group, averaged over the groups
      (as ``train/reward_std``): an expert whose scores never differ within a group gives no advantage;
    - ``train/sampled_nll/plan`` and ``train/sampled_nll/image``: mean ``-log p`` of the sampled
      tokens, the Monte-Carlo entropy estimate (see :func:`sampled_nll` for when it is exact);
    - ``train/entropy/plan`` and ``train/entropy/image``: the exact mean per-token entropy (nats) of the
      distributions the rollout sampled from (a sum over the vocabulary at every step; for image tokens
      the CFG mixture), from the temperature-scaled logits before top-k/top-p.

    Each is taken over the rows of every data-parallel process together (their shares gathered), so N
    processes log what one process would; rank 0 writes them.
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
        for name, value in rollout_statistics(r, pl_module.gather_rows).items():
            # already over every process's rows: the same value on each, nothing left to reduce
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=r.num_rows)
