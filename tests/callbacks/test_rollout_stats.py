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


def split_rollout() -> Rollout:
    """Three prompts of two samples: on two processes the middle group is split between them, and the processes'
    plans differ in length (one holds 5 plan tokens, the other 3)."""
    ids = torch.zeros(6, 3, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    logp = -torch.arange(1.0, 19.0).reshape(6, 3)
    return Rollout(
        records=[PromptRecord(p) for p in ("a", "a", "b", "b", "c", "c")],
        group_size=2,
        plan_context_ids=ids,
        plan_context_mask=ids,
        plan_tokens=ids,
        plan_mask=mask,
        plan_logp=logp,
        plans=["p"] * 6,
        image_cond_ids=ids,
        image_cond_mask=ids,
        image_uncond_ids=ids,
        image_tokens=torch.zeros(6, 2, dtype=torch.long),
        image_logp=-torch.arange(1.0, 13.0).reshape(6, 2),
        images=torch.zeros(6, 4, 4, 3, dtype=torch.uint8),
        rewards=torch.zeros(6),
        reward_per_expert={"color": torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0])},
        advantages=torch.tensor([-0.5, 0.5, -0.5, 0.5, 0.0, 0.0]),
        plan_entropy=-logp * mask,
        image_entropy=torch.arange(12.0).reshape(6, 2),
    )


def in_lockstep(world: int, work) -> dict[int, dict]:
    """``work(rank, gather)`` on ``world`` threads whose ``gather`` is an all-gather: each call hands in this
    rank's rows and returns every rank's, in rank order, as torch.distributed's would (the real collective,
    ``BiCoTGRPO.gather_rows``, is what the callback calls)."""
    import threading

    slots: list = [None] * world
    barrier = threading.Barrier(world)
    results: dict[int, dict] = {}

    def gather_for(rank: int):
        def gather(values: torch.Tensor) -> torch.Tensor:
            slots[rank] = values
            barrier.wait()
            out = torch.cat(list(slots))
            barrier.wait()  # every rank has read this call's rows before the next call overwrites them
            return out

        return gather

    def run(rank: int) -> None:
        results[rank] = work(rank, gather_for(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == world, "a rank did not finish"
    return results


def test_several_processes_log_what_one_process_would():
    full = split_rollout()
    one = {name: value.item() for name, value in rollout_statistics(full).items()}
    assert one["train/reward_std/color"] == pytest.approx(2 * 2**-0.5 / 3)  # groups {0,1}, {0,1}, {1,1}
    # the mean of each process's own token mean is not the step's (5 plan tokens on one, 3 on the other)
    shares = [full.rows(slice(3 * k, 3 * k + 3)) for k in range(2)]
    per_process = [sampled_nll(s.plan_logp, s.plan_mask).item() for s in shares]
    assert sum(per_process) / 2 != pytest.approx(one["train/sampled_nll/plan"])

    def statistics(rank, gather):
        return {name: value.item() for name, value in rollout_statistics(shares[rank], gather).items()}

    for rank, stats in in_lockstep(2, statistics).items():
        assert stats == pytest.approx(one), rank
