"""The fit loop's three phases: rollout (no grad) -> score (no grad) -> update (grad), one function each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bicot.loss import GRPOConfig, LossOutput, TokenTerms, bicot_loss, group_advantages
from bicot.rollout import Rollout
from modules.policy import ImageContext, JanusPolicy, PlanBatch
from modules.reference import ReferencePolicy
from modules.rewards.ensemble import RewardEnsemble, RewardExpertError

# ---------------------------------------------------------------------------------------------
# Phase 1: rollout. Plans (semantic-level CoT), then image tokens with CFG (token-level CoT).
# ---------------------------------------------------------------------------------------------


@dataclass
class RowPlacement:
    """This process's rows of the global rollout, and the step's sampling seed.

    Every process receives the same global batch of P prompts; the ``P * G`` rollout rows are split
    into equal contiguous slices, one per process. A prompt's G samples may therefore span processes;
    group statistics are computed on the gathered rewards (:func:`score_phase`). Sampling noise is
    drawn for the global rows, so any split draws the same samples.
    """

    seed: int
    """seed of this step's sampling streams (plan and image streams derive from it)."""
    global_rows: int | None = None
    """rows of the global rollout (``None``: this process holds them all)."""
    offset: int = 0
    """global index of this process's first row."""
    rows: int | None = None
    """number of rows this process holds (``None``: all from ``offset``)."""


def rollout_phase(
    policy: JanusPolicy,
    records: Sequence,
    group_size: int,
    template: str | None,
    placement: RowPlacement,
) -> Rollout:
    """Sample G plans per prompt, one image per plan, and decode them (this process's rows only).

    Args:
        records: the global batch of ``P`` prompt records.
        template: the reasoning instruction around ``{prompt}``, or ``None`` to draw without a plan.

    Returns:
        A :class:`Rollout` of this process's rows (all ``P * G`` on one process), without rewards.
    """
    start = placement.offset
    repeated = [r for r in records for _ in range(group_size)]
    repeated = repeated[start : start + placement.rows if placement.rows is not None else None]
    noise = lambda stream: policy.noise(placement.seed * 2 + stream, placement.global_rows, start)  # noqa: E731
    plans = None
    was_training = policy.model.training
    policy.model.eval()  # sampling: no dropout, no activation checkpointing, caches on
    if template is not None:
        plans = policy.sample_plans([r.prompt for r in repeated], template, 1, noise(0))
    context = policy.image_context([r.prompt for r in repeated], plans.texts if plans else None)
    sample = policy.sample_images(context, noise(1))
    policy.end_rollout()  # before decoding: the engine's KV buffers need not outlive the sampling
    images = policy.decode(sample.tokens)
    policy.model.train(was_training)
    guided = policy.sampling.image_logprob == "guided"
    return Rollout(
        records=repeated,
        group_size=group_size,
        row_offset=start,
        plan_context_ids=plans.context_ids if plans else None,
        plan_context_mask=plans.context_mask if plans else None,
        plan_tokens=plans.tokens if plans else None,
        plan_mask=plans.mask if plans else None,
        plan_logp=plans.logp if plans else None,
        plans=plans.texts if plans else None,
        image_cond_ids=context.cond_ids,
        image_cond_mask=context.cond_mask,
        image_uncond_ids=context.uncond_ids,
        image_tokens=sample.tokens,
        image_logp=sample.logp_guided if guided else sample.logp_conditional,
        images=images,
        plan_entropy=plans.entropy if plans else None,
        image_entropy=sample.entropy,
    )


def plan_batch(r: Rollout) -> PlanBatch:
    """The rollout's plan fields as the policy's :class:`PlanBatch`."""
    return PlanBatch(r.plan_context_ids, r.plan_context_mask, r.plan_tokens, r.plan_mask, r.plan_logp, r.plans)


def image_context(r: Rollout) -> ImageContext:
    """The rollout's generation contexts as the policy's :class:`ImageContext`."""
    return ImageContext(r.image_cond_ids, r.image_cond_mask, r.image_uncond_ids)


def minibatches(num_rows: int, size: int | None) -> list[slice]:
    """Contiguous row slices of at most ``size`` rows (all rows when ``size`` is None)."""
    size = size or num_rows
    return [slice(start, min(start + size, num_rows)) for start in range(0, num_rows, size)]


# ---------------------------------------------------------------------------------------------
# Phase 2: score. Rewards, group advantages, reference log-probs.
# ---------------------------------------------------------------------------------------------


def global_advantages(r: Rollout, algo: GRPOConfig) -> torch.Tensor:
    """``[R_global]`` advantages of every process's rows, from the gathered rewards (no collective)."""
    return group_advantages(r.global_rewards, r.group_size, algo.scale_rewards, algo.adv_eps)


@torch.no_grad()
def score_phase(
    r: Rollout,
    rewards: RewardEnsemble,
    algo: GRPOConfig,
    policy: JanusPolicy,
    reference: ReferencePolicy | None,
    minibatch_size: int | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Fill ``r``'s rewards and advantages, and its reference log-probs when ``beta > 0``.

    Args:
        gather: ``[R] -> [R_global]``, the rewards of every process in global row order. Only these
            scalars cross the network; groups split across processes get the right statistics.

    Raises:
        RewardExpertError: an expert raised (``rewards.on_error: raise``) on this process or on another; every
            process raises at the same point, so none is left waiting for the others in a collective.
    """
    device = r.image_tokens.device
    failure: RewardExpertError | None = None
    try:
        out = rewards(r.images, r.records)
    except RewardExpertError as err:
        if gather is None:
            raise
        failure, out = err, None
    if gather is not None:  # what failed where: [raised, zeroed expert 1, ...] over every process
        names = rewards.names
        flags = [float(out is None), *(float(out is not None and name in out.failed) for name in names)]
        seen = gather(torch.tensor(flags, device=device)).reshape(-1, len(names) + 1).amax(0).tolist()
        if seen[0]:
            if failure is not None:
                raise failure
            raise RewardExpertError(
                "a reward expert raised on another process (its message is in that process's output); every "
                "process stops with it"
            )
        # an expert zeroed on one process is zeroed on all (rewards.on_error: zero)
        out = rewards.zero_failed_elsewhere(out, [n for n, f in zip(names, seen[1:], strict=True) if f])
    r.rewards = out.total.to(device)  # [R]
    r.reward_per_expert = {name: score.to(device) for name, score in out.per_expert.items()}
    r.global_rewards = gather(r.rewards) if gather is not None else r.rewards  # [R_global]
    r.advantages = global_advantages(r, algo)[r.row_offset : r.row_offset + r.num_rows]  # [R]
    if reference is None or algo.beta == 0:
        return
    plan_parts, image_parts = [], []
    for rows in minibatches(r.num_rows, minibatch_size):
        sub = r.rows(rows)
        if algo.train_plan and r.plan_tokens is not None:
            lp = reference.plan_logprobs(policy, plan_batch(sub))  # [r, T_sub]
            plan_parts.append(torch.nn.functional.pad(lp, (0, r.plan_tokens.shape[1] - lp.shape[1])))
        if algo.train_image:
            image_parts.append(reference.image_logprobs(policy, image_context(sub), sub.image_tokens))
    # Only the levels that train need the reference (the KL of the other level is not monitored).
    r.ref_plan_logp = torch.cat(plan_parts) if plan_parts else None  # [R, T]
    r.ref_image_logp = torch.cat(image_parts) if image_parts else None  # [R, N]


# ---------------------------------------------------------------------------------------------
# Phase 3: update. mu epochs; each accumulates gradients over minibatches, then one optimizer step.
# ---------------------------------------------------------------------------------------------


def loss_denominator(r: Rollout, algo: GRPOConfig) -> float:
    """What the aggregation divides by over this process's rows: valid tokens, or sequences."""
    if algo.aggregation == "sequence_mean":
        return float(r.num_rows)
    tokens = 0.0
    if algo.train_plan and r.plan_mask is not None:
        tokens += float(r.plan_mask.sum())
    if algo.train_image:
        tokens += float(r.image_tokens.numel())
    return tokens


def trained_levels(r: Rollout, algo: GRPOConfig) -> tuple[str, ...]:
    """The levels whose log-probs the update recomputes: ``plan`` when it trains and the rollout drew
    plans, ``image`` when it trains. The same for every step of a run."""
    plan = algo.train_plan and r.plan_tokens is not None
    return tuple(level for level, on in (("plan", plan), ("image", algo.train_image)) if on)


def minibatch_loss(
    policy: JanusPolicy, sub: Rollout, algo: GRPOConfig, old: dict[str, torch.Tensor] | None
) -> tuple[LossOutput, dict[str, torch.Tensor]]:
    """Recompute log-probs of a minibatch and evaluate the BiCoT-GRPO loss.

    ``old`` holds the log-probs of the first epoch (detached): the ratio's denominator. In the first
    epoch it is ``None`` and the current log-probs, detached, stand in (ratio exactly 1, as the paper).
    """
    plan = image = None
    current = {}
    levels = trained_levels(sub, algo)
    if "plan" in levels:
        current["plan"] = policy.plan_logprobs(plan_batch(sub))  # [r, T]
        old_plan = current["plan"].detach() if old is None else old["plan"]
        plan = TokenTerms(current["plan"], old_plan, sub.plan_mask, sub.ref_plan_logp)
    if "image" in levels:
        current["image"] = policy.image_logprobs(image_context(sub), sub.image_tokens)  # [r, N]
        old_image = current["image"].detach() if old is None else old["image"]
        mask = torch.ones_like(sub.image_tokens, dtype=torch.bool)
        image = TokenTerms(current["image"], old_image, mask, sub.ref_image_logp)
    out = bicot_loss(plan, image, sub.advantages, algo)
    return out, {k: v.detach() for k, v in current.items()}


TOKEN_MEANS = ("kl", "kl_plan", "kl_image", "clip_frac", "rollout_kl/plan", "rollout_kl/image")
"""The update's metrics that are means over valid tokens: :attr:`UpdateStats.token_sums` holds each one's sum
and count, so that every process's can be merged into the exact mean over the global batch."""


class _TokenMean:
    """A read-only attribute of :class:`UpdateStats`: the token mean of its own name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, stats: UpdateStats | None, owner: type | None = None):
        return self if stats is None else stats.token_mean(self.name)


@dataclass
class UpdateStats:
    """Means over the update of the loss parts (weighted like the loss), and the last step's numbers.

    The token means (:data:`TOKEN_MEANS`: ``kl``, ``kl_plan``, ``kl_image``, ``clip_frac``, ``rollout_kl``) are
    read from ``token_sums``: exact over this process's valid tokens of every minibatch and epoch, whatever the
    minibatches' lengths, and mergeable over processes.
    """

    loss: float = 0.0
    policy_loss: float = 0.0
    kl_max: float = 0.0
    grad_norm: float = 0.0
    skipped: int = 0
    rollout_logp_gap_max: float = 0.0
    """max ``|logp_update - logp_rollout|`` over both levels' valid tokens of the first epoch."""
    token_sums: dict[str, tuple[float, int]] = field(default_factory=dict)
    """name in :data:`TOKEN_MEANS` -> ``(sum over valid tokens, valid tokens)`` on this process; a name that
    was not measured is absent."""

    def add_tokens(self, name: str, total: float, tokens: int) -> None:
        before, count = self.token_sums.get(name, (0.0, 0))
        self.token_sums[name] = (before + total, count + tokens)

    def token_mean(self, name: str) -> float:
        total, count = self.token_sums.get(name, (0.0, 0))
        return total / count if count else 0.0

    kl = _TokenMean()  # over the valid tokens of the trained levels (0 without KL)
    kl_plan = _TokenMean()
    kl_image = _TokenMean()
    clip_frac = _TokenMean()

    @property
    def rollout_kl(self) -> dict[str, float]:
        """level (``plan``, ``image``; the levels that train) -> k3 estimate of KL(rollout policy || update
        policy), the mean over the level's valid tokens of the first epoch (see :func:`rollout_mismatch`)."""
        prefix = "rollout_kl/"
        return {k.removeprefix(prefix): self.token_mean(k) for k in self.token_sums if k.startswith(prefix)}


def update_phase(
    policy: JanusPolicy,
    r: Rollout,
    algo: GRPOConfig,
    backward: Callable[[torch.Tensor], None],
    step: Callable[[], tuple[float, bool]],
    global_denominator: float,
    world_size: int = 1,
    minibatch_size: int | None = None,
) -> UpdateStats:
    """Run ``algo.mu`` optimisation epochs over the rollout.

    Each minibatch's loss is rescaled so that the accumulated gradient equals the gradient of the
    aggregation over the *global* batch, once data-parallel gradients are averaged over
    ``world_size`` processes: a 2-process run and a 1-process run take the same step.

    Args:
        backward: ``loss -> None`` (the LightningModule's ``manual_backward``).
        step: clips, steps the optimizer and scheduler, zeroes grads; returns ``(grad_norm, applied)``.
        global_denominator: :func:`loss_denominator` summed over all processes.
    """
    stats = UpdateStats()
    slices = minibatches(r.num_rows, minibatch_size)
    olds: list[dict[str, torch.Tensor] | None] = [None] * len(slices)
    for _epoch in range(algo.mu):
        for i, rows in enumerate(slices):
            sub = r.rows(rows)
            out, current = minibatch_loss(policy, sub, algo, olds[i])
            if olds[i] is None:  # first epoch: the weights the rollout sampled with
                for level, (k3_sum, tokens, gap) in rollout_mismatch(sub, current).items():
                    stats.add_tokens(f"rollout_kl/{level}", k3_sum, tokens)
                    stats.rollout_logp_gap_max = max(stats.rollout_logp_gap_max, gap)
            olds[i] = olds[i] or current
            share = loss_denominator(sub, algo) / global_denominator  # this minibatch's part of the whole
            backward(out.loss * share * world_size)
            _accumulate(stats, out, share / algo.mu)
        grad_norm, applied = step()
        stats.grad_norm = grad_norm
        stats.skipped += 0 if applied else 1
    return stats


def rollout_mismatch(sub: Rollout, current: dict[str, torch.Tensor]) -> dict[str, tuple[float, int, float]]:
    """How far the rollout's log-probs are from the ones the update recomputed, per level.

    The two differ only through the train-inference mismatch: bf16 rounding, the static engine's kernels,
    LoRA dropout in the update. With ``d = logp_update - logp_rollout`` per valid token, ``exp(d) - 1 - d``
    (k3) is a non-negative, unbiased estimate of KL(rollout policy || update policy) on tokens the rollout
    sampled.

    Args:
        sub: a minibatch of the rollout (``plan_logp`` ``[r, T]`` valid where ``plan_mask``; ``image_logp``
            ``[r, N]``, all valid).
        current: :func:`minibatch_loss`'s detached log-probs of the levels that train, same shapes.

    Returns:
        level -> ``(sum of k3 over its valid tokens, valid tokens, max |d|)``.
    """
    sampled = {"plan": (sub.plan_logp, sub.plan_mask), "image": (sub.image_logp, None)}
    out = {}
    for level, logp in current.items():
        rollout, mask = sampled[level]
        d = logp.detach().float() - rollout.float()  # [r, T] or [r, N]
        if mask is not None:
            d = torch.where(mask, d, torch.zeros_like(d))  # k3(0) = |0| = 0: padding adds nothing
        k3_sum, gap = torch.stack([(torch.expm1(d) - d).sum(), d.abs().amax()]).tolist()
        tokens = int(mask.sum()) if mask is not None else d.numel()
        out[level] = (k3_sum, tokens, gap)
    return out


def _accumulate(stats: UpdateStats, out: LossOutput, weight: float) -> None:
    """Add one minibatch: ``loss`` and ``policy_loss`` by ``weight`` (its share of the objective), the token
    means by their tokens, with one copy of the scalars to the host."""
    means = ("kl", "kl_plan", "kl_image", "clip_frac")
    counts = (out.kl_tokens, out.kl_plan_tokens, out.kl_image_tokens, out.num_tokens)
    scalars = [out.loss.detach(), out.policy_loss, out.kl_max, *(getattr(out, n) for n in means), *counts]
    values = torch.stack([v.double() for v in scalars]).tolist()  # float64 keeps the counts exact
    loss, policy_loss, kl_max = values[:3]
    stats.loss += loss * weight
    stats.policy_loss += policy_loss * weight
    stats.kl_max = max(stats.kl_max, kl_max)
    for name, mean, tokens in zip(means, values[3:7], values[7:], strict=True):
        if tokens:
            stats.add_tokens(name, mean * tokens, int(tokens))
