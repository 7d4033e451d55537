"""BiCoT-GRPO objective: group advantages, clipped surrogate and KL penalty over plan and image tokens."""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_KL_ESTIMATORS = ("k1", "k2", "k3")
_AGGREGATIONS = ("token_mean", "sequence_mean")
_LEVELS = ("both", "semantic", "token")


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"GRPOConfig.{field} must be one of {allowed}, got {value!r}")


def _check_non_negative(field: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"GRPOConfig.{field} must be a finite number >= 0, got {value!r}")


@dataclass
class GRPOConfig:
    """Hyperparameters of BiCoT-GRPO, validated on construction."""

    beta: float = 0.01
    """Weight of the per-token KL(pi || ref) penalty; 0 disables the reference model."""
    kl_estimator: str = "k3"
    """Estimator of the per-token KL: "k1" (logp - ref), "k2" (squared) or "k3" (unbiased, non-negative)."""
    clip_eps_low: float = 0.2
    """The importance ratio is clipped from below at 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """The importance ratio is clipped from above at 1 + clip_eps_high."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group's (unbiased) std."""
    adv_eps: float = 1e-4
    """Added to the group std so groups with identical rewards do not divide by zero."""
    aggregation: str = "token_mean"
    """"token_mean" (the paper: mean over all valid tokens of the batch) or "sequence_mean"."""
    levels: str = "both"
    """Which CoT levels are trained: "both", "semantic" (plan tokens only) or "token" (image tokens only)."""
    plan_weight: float = 1.0
    """Multiplies each plan token's loss before aggregation; token counts are unchanged."""
    image_weight: float = 1.0
    """Multiplies each image token's loss before aggregation; token counts are unchanged."""
    num_generations: int = 8
    """G, samples per prompt; must be >= 2, otherwise every advantage would be zero."""
    mu: int = 1
    """Optimisation epochs per rollout; with 1 the ratio is identically 1."""

    def __post_init__(self) -> None:
        _check_choice("kl_estimator", self.kl_estimator, _KL_ESTIMATORS)
        _check_choice("aggregation", self.aggregation, _AGGREGATIONS)
        _check_choice("levels", self.levels, _LEVELS)
        for field in ("beta", "clip_eps_low", "clip_eps_high", "plan_weight", "image_weight"):
            _check_non_negative(field, getattr(self, field))
        if not math.isfinite(self.adv_eps) or self.adv_eps <= 0:
            raise ValueError(f"GRPOConfig.adv_eps must be a finite number > 0, got {self.adv_eps!r}")
        active = {"plan_weight": self.train_plan, "image_weight": self.train_image}
        if all(getattr(self, name) == 0 for name, on in active.items() if on):
            names = [name for name, on in active.items() if on]
            raise ValueError(
                f"GRPOConfig: with levels={self.levels!r} at least one of {names} must be > 0, "
                f"got plan_weight={self.plan_weight!r}, image_weight={self.image_weight!r}"
            )
        if self.num_generations < 2:
            raise ValueError(
                f"GRPOConfig.num_generations must be >= 2 (group advantages need G >= 2), "
                f"got {self.num_generations!r}"
            )
        if self.mu < 1:
            raise ValueError(f"GRPOConfig.mu must be >= 1, got {self.mu!r}")
        if self.clip_eps_low >= 1:  # the ratio is positive: a lower bound 1 - eps <= 0 never clips
            raise ValueError(
                f"GRPOConfig.clip_eps_low must be < 1 (the ratio is clipped at 1 - it), got {self.clip_eps_low!r}"
            )

    @property
    def train_plan(self) -> bool:
        """Whether the semantic-level (plan text) tokens receive a loss."""
        return self.levels in ("both", "semantic")

    @property
    def train_image(self) -> bool:
        """Whether the token-level (image) tokens receive a loss."""
        return self.levels in ("both", "token")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 2:
        raise ValueError(f"group size must be >= 2 for group-relative advantages, got {group_size}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"number of rewards {rewards.shape[0]} is not a multiple of group size {group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    # prompt-major layout: sample g of prompt p sits at p*G + g
    return rewards.view(-1, group_size)  # [P, G]


def group_std(rewards: Tensor, group_size: int) -> Tensor:
    """Unbiased (Bessel-corrected, like ``torch.std``) standard deviation of each prompt's rewards.

    Args:
        rewards: ``[N]`` rewards, ``N = P * G``, prompt-major (sample ``g`` of prompt ``p`` at ``p*G + g``).
        group_size: ``G``, samples per prompt, ``>= 2``.

    Returns:
        ``[P]`` std of each group; 0 for groups whose rewards are all equal.

    Raises:
        ValueError: if ``G < 2``, ``rewards`` is not 1-D or ``N % G != 0``.
    """
    return _grouped(rewards, group_size).std(dim=1, unbiased=True)  # [P]


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages ``(r - mean_group) / (std_group + eps)``.

    The std is the unbiased (Bessel-corrected) one, as ``torch.std`` computes by default.

    Args:
        rewards: ``[N]`` rewards, ``N = P * G``, prompt-major (sample ``g`` of prompt ``p`` at ``p*G + g``).
        group_size: ``G``, samples per prompt, ``>= 2``.
        scale: divide by ``std_group + eps``; if False only the group mean is subtracted.
        eps: keeps groups of identical rewards (std 0) finite; their advantages are 0.

    Returns:
        ``[N]`` advantages in the same order as ``rewards``.

    Raises:
        ValueError: if ``G < 2``, ``rewards`` is not 1-D or ``N % G != 0``.
    """
    grouped = _grouped(rewards, group_size)  # [P, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [P, G]
    # a float32 mean of G equal rewards can be an ulp off them (8 x 2.1: 2.4e-7), which / eps is 2.4e-3
    same = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [P, 1]
    centred = centred.masked_fill(same, 0.0)  # [P, G]
    if scale:
        centred = centred / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)  # [P, G]
    return centred.reshape(-1)  # [N]


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi.

    With ``d = ref_logp - logp``: k1 = ``-d``, k2 = ``d**2 / 2``, k3 = ``exp(d) - d - 1``.
    ``ref_logp`` is detached: the reference is a constant anchor, never trained.

    Args:
        logp: ``[...]`` log-probs of the sampled tokens under the current policy.
        ref_logp: ``[...]`` log-probs of the same tokens under the reference policy.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``[...]`` per-token KL estimate, same shape as ``logp``.

    Raises:
        ValueError: on an unknown estimator.
    """
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {_KL_ESTIMATORS}, got {estimator!r}")
    d = ref_logp.detach() - logp  # [...]
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.pow(2)
    # expm1 keeps k3 accurate (and >= 0) when d is tiny
    return torch.expm1(d) - d


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate per token, ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``.

    ``old_logp`` is detached (the behaviour policy is a constant), so with one update per rollout
    the ratio is 1 but its gradient w.r.t. ``logp`` is ``-A``.

    Args:
        logp: ``[N, L]`` log-probs under the current policy.
        old_logp: ``[N, L]`` log-probs under the rollout policy.
        advantages: ``[N]`` one advantage per sequence, broadcast over its tokens.
        eps_low: lower clip range, the ratio is clipped at ``1 - eps_low``.
        eps_high: upper clip range, the ratio is clipped at ``1 + eps_high``.

    Returns:
        ``(loss, clipped)``: ``[N, L]`` per-token loss and ``[N, L]`` bool, True where the clipped
        objective is strictly smaller than the unclipped one, i.e. where the gradient is cut.
    """
    adv = advantages.to(logp.dtype).unsqueeze(-1)  # [N, 1]
    ratio = torch.exp(logp - old_logp.detach())  # [N, L]
    unclipped = ratio * adv  # [N, L]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # [N, L]
    # strict comparison: on ties the unclipped branch keeps the gradient (e.g. ratio == 1)
    is_clipped = clipped < unclipped  # [N, L]
    return -torch.where(is_clipped, clipped, unclipped), is_clipped


def aggregate(per_token: list[Tensor], masks: list[Tensor], weights: list[float], mode: str) -> Tensor:
    """Reduce per-token losses of several modalities to one scalar.

    Weights scale the numerators only; denominators count valid tokens. Masked positions are
    excluded with ``where`` rather than multiplied, so garbage (nan/inf) there cannot leak in.

    Args:
        per_token: ``K`` tensors ``[N, L_k]``, one per modality; ``L_k`` may differ, ``N`` may not.
        masks: ``K`` tensors ``[N, L_k]``, bool or 0/1 float, True for valid tokens.
        weights: ``K`` floats, one per modality.
        mode: ``"token_mean"``: weighted sum over all valid tokens / number of valid tokens
            (at least 1). ``"sequence_mean"``: the same per sequence, then the mean over sequences
            with at least one valid token (0 if none).

    Returns:
        ``[]`` scalar loss.

    Raises:
        ValueError: on an unknown mode, mismatched list lengths, shapes or batch sizes.
    """
    if mode not in _AGGREGATIONS:
        raise ValueError(f"aggregation mode must be one of {_AGGREGATIONS}, got {mode!r}")
    if not per_token or not (len(per_token) == len(masks) == len(weights)):
        raise ValueError(
            f"need one mask and weight per loss tensor, got {len(per_token)} losses, "
            f"{len(masks)} masks, {len(weights)} weights"
        )
    batch = per_token[0].shape[0]
    numer, denom = [], []
    for loss, mask, weight in zip(per_token, masks, weights, strict=True):
        if loss.shape != mask.shape or loss.dim() != 2 or loss.shape[0] != batch:
            raise ValueError(
                f"each loss and mask must be [N, L] with the same N, got loss {tuple(loss.shape)}, "
                f"mask {tuple(mask.shape)}, N={batch}"
            )
        valid = mask.bool()  # [N, L_k]
        numer.append(weight * torch.where(valid, loss, torch.zeros_like(loss)).sum(dim=1))  # [N]
        denom.append(valid.sum(dim=1))  # [N]
    seq_numer = torch.stack(numer).sum(dim=0)  # [N]
    seq_denom = torch.stack(denom).sum(dim=0)  # [N]
    if mode == "token_mean":
        return seq_numer.sum() / seq_denom.sum().clamp(min=1)
    # sequences without valid tokens have a zero numerator, so only the count must skip them
    per_seq = seq_numer / seq_denom.clamp(min=1)  # [N]
    return per_seq.sum() / (seq_denom > 0).sum().clamp(min=1)


@dataclass
class TokenTerms:
    """What the update knows of one modality's tokens."""

    logp: Tensor
    """``[N, L]`` current policy log-probs of the sampled tokens (with grad)."""
    old_logp: Tensor
    """``[N, L]`` log-probs under the rollout (behaviour) policy."""
    mask: Tensor
    """``[N, L]`` bool, True for valid tokens."""
    ref_logp: Tensor | None = None
    """``[N, L]`` reference-policy log-probs; None when ``beta == 0``."""


@dataclass
class LossOutput:
    """The scalar to backward and detached scalars to log."""

    loss: Tensor
    """``[]`` the objective to backward."""
    policy_loss: Tensor
    """``[]`` detached, the surrogate alone, aggregated like ``loss``."""
    kl: Tensor
    """``[]`` detached, mean KL over valid tokens of trained levels (0 without KL)."""
    kl_plan: Tensor
    """``[]`` detached, mean KL over valid plan tokens (0 if none or no reference)."""
    kl_image: Tensor
    """``[]`` detached, mean KL over valid image tokens (0 if none or no reference)."""
    kl_max: Tensor
    """``[]`` detached, max KL over valid tokens of trained levels (0 if none)."""
    clip_frac: Tensor
    """``[]`` detached, fraction of valid trained tokens whose gradient the clip cut."""
    num_tokens: Tensor
    """``[]`` int64, number of valid tokens that entered the loss (the denominator of ``clip_frac``)."""
    kl_tokens: Tensor
    """``[]`` int64, valid tokens behind ``kl``: with the token counts, means over several minibatches or
    processes can be merged exactly (``sum(mean * tokens) / sum(tokens)``)."""
    kl_plan_tokens: Tensor
    """``[]`` int64, valid plan tokens behind ``kl_plan`` (0 when it was not measured)."""
    kl_image_tokens: Tensor
    """``[]`` int64, valid image tokens behind ``kl_image`` (0 when it was not measured)."""


@dataclass
class _Prepared:
    logp: Tensor  # [N, L]
    old_logp: Tensor  # [N, L]
    ref_logp: Tensor | None  # [N, L]
    mask: Tensor  # [N, L] bool


def _prepare(terms: TokenTerms, batch: int, name: str, detach: bool) -> _Prepared:
    shape = terms.logp.shape
    others = {"old_logp": terms.old_logp, "mask": terms.mask, "ref_logp": terms.ref_logp}
    bad = {k: tuple(v.shape) for k, v in others.items() if v is not None and v.shape != shape}
    if len(shape) != 2 or shape[0] != batch or bad:
        raise ValueError(
            f"{name} terms must all be [N, L] with N={batch} (the number of advantages), "
            f"got logp {tuple(shape)}, mismatched: {bad}"
        )
    mask = terms.mask.bool()  # [N, L]
    # at least fp32: exp of bf16 log-ratios is too coarse; padded positions are zeroed so
    # whatever fills them (e.g. -inf) cannot produce nan values or gradients
    dtype = torch.promote_types(terms.logp.dtype, torch.float32)
    logp = terms.logp.detach() if detach else terms.logp

    def clean(t: Tensor) -> Tensor:
        return t.to(dtype).masked_fill(~mask, 0.0)

    ref = None if terms.ref_logp is None else clean(terms.ref_logp.detach())
    return _Prepared(clean(logp), clean(terms.old_logp.detach()), ref, mask)


def _masked_mean(values: list[Tensor], masks: list[Tensor], like: Tensor) -> Tensor:
    if not values:
        return like.new_zeros(())
    total = sum(torch.where(m, v, torch.zeros_like(v)).sum() for v, m in zip(values, masks, strict=True))
    count = sum(m.sum() for m in masks)
    return (total / count.clamp(min=1)).detach()


def _masked_max(values: list[Tensor], masks: list[Tensor], like: Tensor) -> Tensor:
    picked = [v[m] for v, m in zip(values, masks, strict=True)]  # each [n_valid]
    flat = torch.cat(picked) if picked else like.new_zeros((0,))  # [sum n_valid]
    return flat.max().detach() if flat.numel() else like.new_zeros(())


@dataclass
class _Trained:
    loss: Tensor  # [N, L] surrogate + beta * KL, with grad
    surrogate: Tensor  # [N, L] detached
    kl: Tensor | None  # [N, L] detached
    clipped: Tensor  # [N, L] bool
    mask: Tensor  # [N, L] bool
    weight: float


def _modality(
    name: str, terms: TokenTerms, train: bool, weight: float, advantages: Tensor, cfg: GRPOConfig
) -> tuple[_Trained | None, tuple[Tensor, Tensor] | None]:
    """Per-token terms of one modality: ``(_Trained or None if its level is off, (mean KL, its tokens) or None)``."""
    if train and cfg.beta > 0 and terms.ref_logp is None:
        raise ValueError(f"{name} terms need ref_logp when beta > 0 (beta={cfg.beta})")
    # an untrained level is only monitored, so it must not reach the graph
    prep = _prepare(terms, advantages.shape[0], name, detach=not train)
    kl, mean_kl = None, None
    if cfg.beta > 0 and prep.ref_logp is not None:
        kl = kl_penalty(prep.logp, prep.ref_logp, cfg.kl_estimator)  # [N, L]
        mean_kl = _masked_mean([kl.detach()], [prep.mask], kl), prep.mask.sum()
    if not train:
        return None, mean_kl
    surrogate, clipped = clipped_surrogate(
        prep.logp, prep.old_logp, advantages, cfg.clip_eps_low, cfg.clip_eps_high
    )  # [N, L], [N, L]
    loss = surrogate if kl is None else surrogate + cfg.beta * kl  # [N, L]
    detached_kl = None if kl is None else kl.detach()
    return _Trained(loss, surrogate.detach(), detached_kl, clipped, prep.mask, weight), mean_kl


def bicot_loss(
    plan: TokenTerms | None, image: TokenTerms | None, advantages: Tensor, cfg: GRPOConfig
) -> LossOutput:
    """BiCoT-GRPO loss over the semantic-level (plan) and token-level (image) CoT.

    Each trained modality gets ``clipped surrogate + beta * KL`` per token; both are aggregated
    together with ``cfg.aggregation`` and weights ``(plan_weight, image_weight)``. A level that
    ``cfg.levels`` turns off adds nothing to numerator, denominator or gradient; its KL is still
    reported in ``kl_plan``/``kl_image`` when its reference log-probs are given and ``beta > 0``.
    With ``beta == 0`` reference log-probs are ignored and every KL field is 0.

    Args:
        plan: plan text terms, each tensor ``[N, L_plan]``, or None.
        image: image token terms, each tensor ``[N, L_img]``, or None.
        advantages: ``[N]`` one advantage per sequence (see :func:`group_advantages`).
        cfg: hyperparameters.

    Returns:
        :class:`LossOutput`; every field but ``loss`` is detached.

    Raises:
        ValueError: if no trained modality is given, if ``beta > 0`` and a trained modality lacks
            ``ref_logp``, or on shape mismatches.
    """
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be 1-D [N], got shape {tuple(advantages.shape)}")
    specs = [
        ("plan", plan, cfg.train_plan, cfg.plan_weight),
        ("image", image, cfg.train_image, cfg.image_weight),
    ]
    trained: list[_Trained] = []
    monitor_kl: dict[str, tuple[Tensor, Tensor]] = {}  # level -> (mean KL, valid tokens)
    for name, terms, train, weight in specs:
        if terms is None:
            continue
        part, mean_kl = _modality(name, terms, train, weight, advantages, cfg)
        if part is not None:
            trained.append(part)
        if mean_kl is not None:
            monitor_kl[name] = mean_kl
    if not trained:
        raise ValueError(
            f"no trained modality present: levels={cfg.levels!r} trains plan={cfg.train_plan}, "
            f"image={cfg.train_image}, but got plan={plan is not None}, image={image is not None}"
        )
    masks = [t.mask for t in trained]
    weights = [t.weight for t in trained]
    with_kl = [t for t in trained if t.kl is not None]
    kls, kl_masks = [t.kl for t in with_kl], [t.mask for t in with_kl]
    like = trained[0].surrogate
    none = (like.new_zeros(()), masks[0].new_zeros((), dtype=torch.int64))
    kl_plan, kl_plan_tokens = monitor_kl.get("plan", none)
    kl_image, kl_image_tokens = monitor_kl.get("image", none)
    return LossOutput(
        loss=aggregate([t.loss for t in trained], masks, weights, cfg.aggregation),
        policy_loss=aggregate([t.surrogate for t in trained], masks, weights, cfg.aggregation).detach(),
        kl=_masked_mean(kls, kl_masks, like),
        kl_plan=kl_plan,
        kl_image=kl_image,
        kl_max=_masked_max(kls, kl_masks, like),
        clip_frac=_masked_mean([t.clipped.to(like.dtype) for t in trained], masks, like),
        num_tokens=sum(m.sum() for m in masks),
        kl_tokens=sum((m.sum() for m in kl_masks), masks[0].new_zeros((), dtype=torch.int64)),
        kl_plan_tokens=kl_plan_tokens,
        kl_image_tokens=kl_image_tokens,
    )
