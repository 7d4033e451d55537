"""Rollout statistics: hand-checked values, the entropy estimate's meaning, and the metrics a fit logs."""

from __future__ import annotations

import pytest
import torch
from toyfit import MAX_STEPS

from bicot.rollout import Rollout
from callbacks.rollout_stats import rollout_statistics, sampled_nll
from datamodules.records import PromptRecord

# Everything the issue lists, whether BiCoTGRPO or a callback logs it.
ISSUE_METRICS = (
    "train/kl",
    "train/kl_max",
    "train/kl_plan",
    "train/kl_image",
    "train/reward",
    "train/reward/toy_orm",
    "train/reward/toy_detector",
    "train/reward_std",
    "train/reward_std/toy_orm",
    "train/zero_std_frac",
    "train/advantage_mean",
    "train/advantage_std",
    "train/clip_frac",
    "train/sampled_nll/plan",
    "train/sampled_nll/image",
    "train/entropy/plan",
    "train/entropy/image",
    "train/plan_tokens",
    "train/lr",
    "train/grad_norm",
    "time/rollout_s",
    "time/score_s",
    "time/update_s",
    "perf/images_per_s",
)


def hand_rollout(with_plan: bool = True) -> Rollout:
    """Two rows of one group with numbers small enough to check by hand."""
    ids = torch.zeros(2, 3, dtype=torch.long)
    return Rollout(
        records=[PromptRecord("a red circle")] * 2,
        group_size=2,
        plan_context_ids=ids if with_plan else None,
        plan_context_mask=ids if with_plan else None,
        plan_tokens=ids if with_plan else None,
        plan_mask=torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool) if with_plan else None,
        plan_logp=torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]]) if with_plan else None,
        plans=["x y", "z"] if with_plan else None,
        image_cond_ids=ids,
        image_cond_mask=ids,
        image_uncond_ids=ids,
        image_tokens=torch.zeros(2, 2, dtype=torch.long),
        image_logp=torch.tensor([[-1.0, -1.0], [-2.0, -2.0]]),
        images=torch.zeros(2, 4, 4, 3, dtype=torch.uint8),
        rewards=torch.tensor([0.0, 1.0]),
        reward_per_expert={"color": torch.tensor([0.0, 1.0]), "count": torch.tensor([0.5, 0.5])},
        advantages=torch.tensor([0.5, -0.1]),
        plan_entropy=torch.tensor([[0.5, 1.5, 0.0], [4.0, 0.0, 0.0]]) if with_plan else None,
        image_entropy=torch.tensor([[1.0, 2.0], [3.0, 6.0]]),
    )


def test_statistics_by_hand():
    stats = rollout_statistics(hand_rollout())
    assert stats["train/advantage_mean"].item() == pytest.approx(0.2)
    assert stats["train/reward_std/color"].item() == pytest.approx(2**-0.5)  # unbiased std of {0, 1}
    assert stats["train/reward_std/count"].item() == 0.0
    # masked tokens (the -9s) do not count: (1 + 2 + 3) / 3 valid tokens
    assert stats["train/sampled_nll/plan"].item() == pytest.approx(2.0)
    assert stats["train/sampled_nll/image"].item() == pytest.approx(1.5)
    assert stats["train/entropy/plan"].item() == pytest.approx(2.0)  # (0.5 + 1.5 + 4) / 3 valid tokens
    assert stats["train/entropy/image"].item() == pytest.approx(3.0)


def test_no_plan_metric_without_plans():
    stats = rollout_statistics(hand_rollout(with_plan=False))
    assert "train/sampled_nll/plan" not in stats and "train/entropy/plan" not in stats
    assert "train/sampled_nll/image" in stats and "train/entropy/image" in stats


def test_sampled_nll_estimates_the_entropy_of_the_sampling_distribution():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 16, generator=generator) * 2
    logp = logits.log_softmax(-1)  # [4, V], four positions with different entropies
    entropy = -(logp.exp() * logp).sum(-1).mean()
    tokens = torch.multinomial(logp.exp(), 20_000, replacement=True, generator=generator)  # [4, S]
    estimate = sampled_nll(logp.gather(-1, tokens))
    assert estimate.item() == pytest.approx(entropy.item(), abs=0.03)
    # scored under another distribution it is a cross-entropy, larger than the entropy
    other = torch.randn(4, 16, generator=generator).log_softmax(-1)
    assert sampled_nll(other.gather(-1, tokens)).item() > entropy.item() + 0.1


def test_fit_logs_every_metric_of_the_issue_at_every_step(toy_run):
    for name in ISSUE_METRICS:
        history = toy_run.client.get_metric_history(toy_run.run_id, name)
        assert [m.step for m in history] == list(range(MAX_STEPS)), name
    for name in ("train/sampled_nll/plan", "train/sampled_nll/image", "train/entropy/plan", "train/entropy/image"):
        assert all(m.value > 0 for m in toy_run.client.get_metric_history(toy_run.run_id, name)), name


def test_progress_bar_shows_reward_and_kl(toy_run):
    shown = toy_run.module.trainer.progress_bar_metrics  # what Lightning's bar prints beside the step
    assert {"train/reward", "train/kl"} <= set(shown)
