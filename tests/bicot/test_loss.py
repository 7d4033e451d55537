"""Hand-computed checks of the BiCoT-GRPO loss: advantages, KL estimators, clipping, aggregation, levels."""

import math

import pytest
import torch

from bicot.loss import (
    GRPOConfig,
    LossOutput,
    TokenTerms,
    aggregate,
    bicot_loss,
    clipped_surrogate,
    group_advantages,
    group_std,
    kl_penalty,
)

E = math.e
K3_PLUS_ONE = E - 2  # k3 at d = +1: exp(1) - 1 - 1
K3_MINUS_HALF = math.exp(-0.5) - 0.5  # k3 at d = -0.5: exp(-0.5) + 0.5 - 1 = 0.1065306597


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --------------------------------------------------------------------------- advantages


def test_group_advantages_scaled_uses_unbiased_std_plus_eps():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    # group 0: mean 2, unbiased var ((-1)^2 + 0 + 1^2) / (3 - 1) = 1 -> std 1; A = +-1 / (1 + 1e-4)
    # (population std sqrt(2/3) would give +-1.2247); group 1: identical rewards -> 0, not nan
    a = 1 / (1 + 1e-4)  # 0.99990001
    close(group_advantages(rewards, 3), [-a, 0.0, a, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_of_equal_rewards_are_exactly_zero(scale):
    # the float32 mean of eight rewards of 2.1 (a sum of the paper's four experts) is 2.1 + 2.4e-7, and
    # 2.4e-7 / (std + 1e-4) would give every sample of the group the same advantage of -2.4e-3, not 0
    rewards = torch.tensor([2.1] * 8 + [0.1, 0.3, 0.2, 0.9, 0.5, 0.5, 0.7, 0.8])
    out = group_advantages(rewards, 8, scale=scale)
    assert out[:8].tolist() == [0.0] * 8
    other = rewards[8:]
    centred = other - other.mean()
    close(out[8:], centred / (other.std() + 1e-4) if scale else centred)  # the other group is untouched


def test_group_advantages_eps_is_added_to_std():
    # std 1, eps 1 -> divide by 2 (not sqrt(var + eps) = 1.414)
    close(group_advantages(torch.tensor([1.0, 2.0, 3.0]), 3, eps=1.0), [-0.5, 0.0, 0.5])


def test_group_advantages_unscaled_only_centres():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    # means 2 and 20
    close(group_advantages(rewards, 3, scale=False), [-1.0, 0.0, 1.0, -10.0, 0.0, 10.0])


def test_group_advantages_are_prompt_major():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    # groups are indices {0,1,2} and {3,4,5}: stds 1 and 10
    # (a prompt-minor layout would group {1,3,20} and {2,10,30} and give other numbers)
    a, b = 1 / (1 + 1e-4), 10 / (10 + 1e-4)
    close(group_advantages(rewards, 3), [-a, 0.0, a, -b, 0.0, b])
    close(group_std(rewards, 3), [1.0, 10.0])


def test_group_std_two_samples():
    # G = 2: |a - b| / sqrt(2) -> 2 / sqrt(2) = 1.41421356
    close(group_std(torch.tensor([0.0, 2.0, 5.0, 5.0]), 2), [math.sqrt(2.0), 0.0])


def test_group_advantages_rejects_group_of_one():
    with pytest.raises(ValueError, match="group size must be >= 2"):
        group_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="group size must be >= 2"):
        group_std(torch.tensor([1.0, 2.0]), 1)


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="multiple of group size"):
        group_advantages(torch.arange(5.0), 2)


def test_group_advantages_rejects_rewards_that_are_not_flat():
    # [2, 3] would otherwise be read as two groups of three
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.ones(2, 3), 3)


def test_group_advantages_of_integer_rewards():
    # integer rewards (e.g. counts) are promoted to float: group 0 mean 2, unbiased std 1; group 1 equal -> 0
    a = 1 / (1 + 1e-4)
    out = group_advantages(torch.tensor([1, 2, 3, 4, 4, 4]), 3)
    assert out.dtype == torch.float32
    close(out, [-a, 0.0, a, 0.0, 0.0, 0.0])


# --------------------------------------------------------------------------- KL


LOGP = torch.tensor([-1.0, -2.0, -0.5])
REF = torch.tensor([-1.5, -1.0, -0.5])
# d = ref - logp = [-0.5, 1.0, 0.0]


def test_kl_k1():
    # -d
    close(kl_penalty(LOGP, REF, "k1"), [0.5, -1.0, 0.0])


def test_kl_k2():
    # d^2 / 2 = [0.25/2, 1/2, 0]
    close(kl_penalty(LOGP, REF, "k2"), [0.125, 0.5, 0.0])


def test_kl_k3():
    # exp(d) - d - 1 = [0.60653066 + 0.5 - 1, 2.71828183 - 1 - 1, 1 - 0 - 1]
    close(kl_penalty(LOGP, REF, "k3"), [K3_MINUS_HALF, K3_PLUS_ONE, 0.0])
    close(kl_penalty(LOGP, REF), [K3_MINUS_HALF, K3_PLUS_ONE, 0.0])  # k3 is the default


@pytest.mark.parametrize("d", [1e-3, -1e-3])
def test_kl_k3_is_accurate_for_tiny_log_ratios(d):
    # k3 = d^2/2 + d^3/6 + ... = 5.0e-7 at |d| = 1e-3; float32 exp(d) is only resolved to 1.2e-7 around 1, so
    # exp(d) - d - 1 would be off by up to 20%, where expm1(d) - d keeps float32's relative precision
    d = float(torch.tensor(d))  # the float32 value the tensor holds
    close(kl_penalty(torch.tensor([0.0]), torch.tensor([d]), "k3"), [math.expm1(d) - d], atol=5e-10)


def test_kl_k3_non_negative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, logp.clone(), "k3") == 0).all()


def test_kl_reference_is_not_trained():
    logp = LOGP.clone().requires_grad_()
    ref = REF.clone().requires_grad_()
    kl_penalty(logp, ref).sum().backward()
    assert ref.grad is None
    # d/dlogp (exp(ref - logp) - (ref - logp) - 1) = 1 - exp(d) = [1 - 0.60653066, 1 - e, 0]
    close(logp.grad, [1 - math.exp(-0.5), 1 - E, 0.0])


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(LOGP, REF, "k4")


# --------------------------------------------------------------------------- clipped surrogate


def test_clipped_surrogate_asymmetric_eps():
    ratios = torch.tensor([0.5, 1.0, 1.2, 1.5])
    logp = ratios.log().repeat(2, 1)  # [2, 4]
    old = torch.zeros(2, 4)
    adv = torch.tensor([2.0, -1.0])
    # clip range [1 - 0.1, 1 + 0.3] = [0.9, 1.3]
    loss, clipped = clipped_surrogate(logp, old, adv, eps_low=0.1, eps_high=0.3)
    # A = 2:  ratio*A = [1.0, 2.0, 2.4, 3.0], clip*A = [1.8, 2.0, 2.4, 2.6]; min = [1.0, 2.0, 2.4, 2.6]
    # A = -1: ratio*A = [-0.5, -1, -1.2, -1.5], clip*A = [-0.9, -1, -1.2, -1.3]; min = [-0.9, -1, -1.2, -1.5]
    # (1.2 is inside the range only because eps_high = 0.3; swapped eps would clip it to 1.1)
    close(loss, [[-1.0, -2.0, -2.4, -2.6], [0.9, 1.0, 1.2, 1.5]])
    assert clipped.dtype == torch.bool
    assert clipped.tolist() == [[False, False, False, True], [True, False, False, False]]


def test_clipped_surrogate_gradient_is_minus_advantage_at_ratio_one():
    old = torch.tensor([[-0.3, -1.2, -2.0], [-0.7, -0.1, -4.0]])
    logp = old.clone().requires_grad_()  # one update per rollout: ratio == 1
    old.requires_grad_()  # the behaviour policy must still be treated as a constant
    adv = torch.tensor([1.5, -0.25])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    close(loss.detach(), [[-1.5] * 3, [0.25] * 3])
    assert not clipped.any()
    loss.sum().backward()
    # d(-ratio*A)/dlogp = -ratio*A = -A per token
    close(logp.grad, [[-1.5] * 3, [0.25] * 3])
    assert old.grad is None


def test_clipped_surrogate_cuts_gradient_where_clipped():
    logp = torch.tensor([[0.0, math.log(1.5)]], requires_grad=True)
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([2.0]), 0.2, 0.2)
    loss.sum().backward()
    # token 0: -ratio*A = -2; token 1: clipped at 1.2, constant -> 0
    close(logp.grad, [[-2.0, 0.0]])


# --------------------------------------------------------------------------- aggregation

NAN = float("nan")
PLAN_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN], [7.0, 8.0, 9.0]])  # [3, 3]
PLAN_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
IMAGE_LOSS = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])  # [3, 2]
IMAGE_MASK = torch.tensor([[1, 0], [0, 0], [0, 0]], dtype=torch.bool)
# valid: seq 0 -> plan 1, 2 and image 10; seq 1 -> plan 4; seq 2 -> nothing


def test_aggregate_token_mean():
    # (1 + 2 + 4 + 10) / 4 = 4.25; the masked nan must not leak in
    out = aggregate([PLAN_LOSS, IMAGE_LOSS], [PLAN_MASK, IMAGE_MASK], [1.0, 1.0], "token_mean")
    close(out, 4.25)


def test_aggregate_token_mean_weights_scale_numerator_only():
    # (2 * (1 + 2 + 4) + 0.5 * 10) / 4 = 19 / 4
    out = aggregate([PLAN_LOSS, IMAGE_LOSS], [PLAN_MASK, IMAGE_MASK], [2.0, 0.5], "token_mean")
    close(out, 4.75)


def test_aggregate_sequence_mean_skips_empty_sequences():
    # seq 0: (1 + 2 + 10) / 3; seq 1: 4 / 1; seq 2 empty -> ignored: (13/3 + 4) / 2 = 25/6
    out = aggregate([PLAN_LOSS, IMAGE_LOSS], [PLAN_MASK, IMAGE_MASK], [1.0, 1.0], "sequence_mean")
    close(out, 25 / 6)


def test_aggregate_sequence_mean_weights():
    # seq 0: (2*(1 + 2) + 0.5*10) / 3 = 11/3; seq 1: 2*4 / 1 = 8; (11/3 + 8) / 2 = 35/6
    out = aggregate([PLAN_LOSS, IMAGE_LOSS], [PLAN_MASK, IMAGE_MASK], [2.0, 0.5], "sequence_mean")
    close(out, 35 / 6)


def test_aggregate_float_masks_match_bool_masks():
    masks = [PLAN_MASK.float(), IMAGE_MASK.float()]
    close(aggregate([PLAN_LOSS, IMAGE_LOSS], masks, [1.0, 1.0], "token_mean"), 4.25)
    close(aggregate([PLAN_LOSS, IMAGE_LOSS], masks, [1.0, 1.0], "sequence_mean"), 25 / 6)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean"])
def test_aggregate_all_masked_is_zero(mode):
    empty = torch.zeros(3, 3, dtype=torch.bool)
    out = aggregate([PLAN_LOSS], [empty], [1.0], mode)
    assert out.item() == 0.0


def test_aggregate_rejects_bad_inputs():
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate([PLAN_LOSS], [PLAN_MASK], [1.0], "mean")
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        aggregate([PLAN_LOSS], [IMAGE_MASK], [1.0], "token_mean")
    with pytest.raises(ValueError, match="one mask and weight"):
        aggregate([PLAN_LOSS], [PLAN_MASK], [1.0, 2.0], "token_mean")
    with pytest.raises(ValueError, match="N=3"):  # the image terms of two sequences only
        aggregate([PLAN_LOSS, IMAGE_LOSS[:2]], [PLAN_MASK, IMAGE_MASK[:2]], [1.0, 1.0], "token_mean")


# --------------------------------------------------------------------------- bicot_loss

ADV = torch.tensor([1.0, -1.0])
NEG_INF = float("-inf")


def make_terms(with_ref: bool = True) -> tuple[TokenTerms, TokenTerms]:
    """Ratio 1 everywhere; one plan token with d = +1 and one image token with d = -0.5.

    Masked positions hold -inf to check that padding cannot produce nan.
    """
    plan_logp = torch.tensor([[-1.0, -2.0], [-1.0, NEG_INF]])  # [2, 2]
    plan_ref = torch.tensor([[0.0, -2.0], [-1.0, NEG_INF]])  # d = [[1, 0], [0, pad]]
    plan_mask = torch.tensor([[True, True], [True, False]])
    image_logp = torch.tensor([[-3.0, NEG_INF, NEG_INF], [-3.0, -4.0, -5.0]])  # [2, 3]
    image_ref = torch.tensor([[-3.0, NEG_INF, NEG_INF], [-3.0, -4.0, -5.5]])  # d = -0.5 at [1, 2]
    image_mask = torch.tensor([[True, False, False], [True, True, True]])
    plan = TokenTerms(
        plan_logp.clone().requires_grad_(), plan_logp.clone(), plan_mask, plan_ref if with_ref else None
    )
    image = TokenTerms(
        image_logp.clone().requires_grad_(), image_logp.clone(), image_mask, image_ref if with_ref else None
    )
    return plan, image


def test_bicot_loss_token_mean_by_hand():
    plan, image = make_terms()
    out = bicot_loss(plan, image, ADV, GRPOConfig(beta=0.1))
    assert isinstance(out, LossOutput)
    # surrogate at ratio 1 is -A: plan (-1 - 1 + 1) + image (-1 + 1 + 1 + 1) = 1 over 3 + 4 = 7 tokens
    close(out.policy_loss, 1 / 7)
    # + beta * (k3(1) + k3(-0.5)) = (1 + 0.1 * 0.82481249) / 7 = 0.15464018
    close(out.loss, (1 + 0.1 * (K3_PLUS_ONE + K3_MINUS_HALF)) / 7)
    close(out.kl, (K3_PLUS_ONE + K3_MINUS_HALF) / 7)  # 0.11783036
    close(out.kl_plan, K3_PLUS_ONE / 3)  # 0.23942728
    close(out.kl_image, K3_MINUS_HALF / 4)  # 0.02663266
    close(out.kl_max, K3_PLUS_ONE)
    close(out.clip_frac, 0.0)
    assert out.num_tokens.item() == 7
    # the counts behind the KL means: 3 plan + 4 image tokens
    assert (out.kl_tokens.item(), out.kl_plan_tokens.item(), out.kl_image_tokens.item()) == (7, 3, 4)
    for field in ("policy_loss", "kl", "kl_plan", "kl_image", "kl_max", "clip_frac"):
        assert not getattr(out, field).requires_grad, field


def test_bicot_loss_gradient_by_hand():
    plan, image = make_terms()
    bicot_loss(plan, image, ADV, GRPOConfig(beta=0.1)).loss.backward()
    # per token (-A + beta * (1 - exp(d))) / 7; plan [0, 0] has d = 1: (-1 + 0.1 * (1 - e)) / 7
    close(plan.logp.grad, [[(-1 + 0.1 * (1 - E)) / 7, -1 / 7], [1 / 7, 0.0]])
    # image [1, 2] has d = -0.5: (1 + 0.1 * (1 - exp(-0.5))) / 7
    close(image.logp.grad, [[-1 / 7, 0.0, 0.0], [1 / 7, 1 / 7, (1 + 0.1 * (1 - math.exp(-0.5))) / 7]])


def test_bicot_loss_sequence_mean_by_hand():
    plan, image = make_terms()
    out = bicot_loss(plan, image, ADV, GRPOConfig(beta=0.1, aggregation="sequence_mean"))
    # seq 0: plan -1 - 1 (+0.1 * k3(1)) and image -1 over 3 tokens -> (-3 + 0.07182818) / 3
    # seq 1: plan +1 and image +1 +1 +1 (+0.1 * k3(-0.5)) over 4 tokens -> (4 + 0.01065307) / 4
    seq0 = (-3 + 0.1 * K3_PLUS_ONE) / 3  # -0.97605727
    seq1 = (4 + 0.1 * K3_MINUS_HALF) / 4  # 1.00266327
    close(out.loss, (seq0 + seq1) / 2)  # 0.01330300
    close(out.policy_loss, (-3 / 3 + 4 / 4) / 2)  # 0


def test_bicot_loss_modality_weights():
    plan, image = make_terms()
    out = bicot_loss(plan, image, ADV, GRPOConfig(beta=0.1, plan_weight=2.0, image_weight=0.0))
    # 2 * (plan: -1 - 1 + 1 + 0.1 * k3(1)) / 7 -- image tokens still count in the denominator
    close(out.loss, 2 * (-1 + 0.1 * K3_PLUS_ONE) / 7)  # -0.26519195
    assert out.num_tokens.item() == 7


def test_bicot_loss_clip_frac_counts_valid_trained_tokens():
    logp = torch.tensor([[math.log(1.5), 0.0, 0.0, 0.0, math.log(1.5)]], requires_grad=True)
    mask = torch.tensor([[True, True, True, True, False]])  # the second clipped token is padding
    plan = TokenTerms(logp, torch.zeros(1, 5), mask)
    out = bicot_loss(plan, None, torch.tensor([1.0]), GRPOConfig(beta=0.0, levels="semantic"))
    # 1 clipped of 4 valid; loss: (-1.2 - 1 - 1 - 1) / 4
    close(out.clip_frac, 0.25)
    close(out.loss, -4.2 / 4)


def test_bicot_loss_computes_in_float32_from_bfloat16_logprobs():
    # bf16 log-probs (every value below is exact in bf16) with d = 1/16 from the old and the reference policy:
    # ratio exp(1/16) = 1.0644945 and k3 = expm1(1/16) - 1/16 = 2.0133e-3 in float32, where bf16 arithmetic
    # gives 1.0625 and 1.95e-3
    logp = torch.tensor([[-10.0]], dtype=torch.bfloat16, requires_grad=True)
    old = torch.tensor([[-10.0625]], dtype=torch.bfloat16)
    ref = torch.tensor([[-9.9375]], dtype=torch.bfloat16)
    plan = TokenTerms(logp, old, torch.ones(1, 1, dtype=torch.bool), ref)
    out = bicot_loss(plan, None, torch.tensor([1.0]), GRPOConfig(beta=0.1, levels="semantic"))
    k3 = math.expm1(0.0625) - 0.0625
    assert out.loss.dtype == out.kl.dtype == torch.float32
    close(out.kl, k3, atol=1e-8)
    close(out.loss, -math.exp(0.0625) + 0.1 * k3, atol=1e-6)  # A = 1, ratio inside the clip range


def _scalars(out: LossOutput) -> dict[str, float]:
    names = ("loss", "policy_loss", "kl", "kl_max", "clip_frac", "num_tokens")
    return {name: getattr(out, name).detach().item() for name in names}


def test_semantic_level_ignores_image_tokens():
    cfg = GRPOConfig(beta=0.1, levels="semantic")
    plan, image = make_terms()
    base = bicot_loss(plan, image, ADV, cfg)
    plan2, image2 = make_terms()
    with torch.no_grad():
        image2.logp.add_(0.7)  # ratio and KL of image tokens change
    moved = bicot_loss(plan2, image2, ADV, cfg)
    alone = bicot_loss(make_terms()[0], None, ADV, cfg)
    assert _scalars(moved) == _scalars(base) == _scalars(alone)
    assert base.num_tokens.item() == 3
    # plan only: (-1 - 1 + 1 + 0.1 * k3(1)) / 3
    close(base.loss, (-1 + 0.1 * K3_PLUS_ONE) / 3)
    # the image KL is still monitored, and does move
    assert moved.kl_image.item() != pytest.approx(base.kl_image.item())
    moved.loss.backward()
    assert image2.logp.grad is None


def test_token_level_ignores_plan_tokens():
    cfg = GRPOConfig(beta=0.1, levels="token")
    plan, image = make_terms()
    base = bicot_loss(plan, image, ADV, cfg)
    plan2, image2 = make_terms()
    with torch.no_grad():
        plan2.logp.sub_(0.4)
    moved = bicot_loss(plan2, image2, ADV, cfg)
    alone = bicot_loss(None, make_terms()[1], ADV, cfg)
    assert _scalars(moved) == _scalars(base) == _scalars(alone)
    assert base.num_tokens.item() == 4
    # image only: (-1 + 1 + 1 + 1 + 0.1 * k3(-0.5)) / 4
    close(base.loss, (2 + 0.1 * K3_MINUS_HALF) / 4)
    moved.loss.backward()
    assert plan2.logp.grad is None


def test_beta_zero_ignores_reference():
    cfg = GRPOConfig(beta=0.0)
    with_ref = bicot_loss(*make_terms(), ADV, cfg)
    plan, image = make_terms(with_ref=False)
    without = bicot_loss(plan, image, ADV, cfg)
    plan_nan, image_nan = make_terms()
    plan_nan.ref_logp = torch.full_like(plan_nan.logp, NAN)  # would poison the loss if read
    poisoned = bicot_loss(plan_nan, image_nan, ADV, cfg)
    close(with_ref.loss, 1 / 7)
    close(without.loss, 1 / 7)
    close(poisoned.loss, 1 / 7)
    for out in (with_ref, without, poisoned):
        assert out.kl.item() == out.kl_plan.item() == out.kl_image.item() == out.kl_max.item() == 0.0
        # no KL measured: no tokens behind it (a merge over minibatches must not count them)
        assert out.kl_tokens.item() == out.kl_plan_tokens.item() == out.kl_image_tokens.item() == 0


def test_kl_of_a_level_without_valid_tokens_is_zero():
    plan, image = make_terms()
    plan.mask = torch.zeros_like(plan.mask)  # e.g. a minibatch of empty plans
    out = bicot_loss(plan, image, ADV, GRPOConfig(beta=0.1))
    # image only: (-1 + 1 + 1 + 1 + 0.1 * k3(-0.5)) / 4
    close(out.loss, (2 + 0.1 * K3_MINUS_HALF) / 4)
    assert out.kl_plan.item() == 0.0 and out.kl_plan_tokens.item() == 0
    close(out.kl_image, K3_MINUS_HALF / 4)
    close(out.kl, K3_MINUS_HALF / 4)


def test_kl_max_is_over_valid_tokens_only():
    # k1 = logp - ref is negative on both valid tokens (-0.5, -1.0): its max is -0.5, not the 0 of the padding
    # nor the largest magnitude 1.0
    logp = torch.tensor([[-1.0, -2.0, NEG_INF]], requires_grad=True)
    ref = torch.tensor([[-0.5, -1.0, NEG_INF]])
    plan = TokenTerms(logp, logp.detach().clone(), torch.tensor([[True, True, False]]), ref)
    out = bicot_loss(plan, None, torch.tensor([1.0]), GRPOConfig(beta=0.1, kl_estimator="k1", levels="semantic"))
    close(out.kl_max, -0.5)
    close(out.kl, -0.75)


def test_beta_positive_needs_reference_for_trained_levels():
    plan, image = make_terms(with_ref=False)
    with pytest.raises(ValueError, match="ref_logp"):
        bicot_loss(plan, image, ADV, GRPOConfig(beta=0.1))
    # an untrained level's reference is optional: it is only monitored
    plan, _ = make_terms()
    out = bicot_loss(plan, image, ADV, GRPOConfig(beta=0.1, levels="semantic"))
    assert out.kl_image.item() == 0.0


def test_no_trained_modality_raises():
    plan, _ = make_terms()
    with pytest.raises(ValueError, match="no trained modality"):
        bicot_loss(plan, None, ADV, GRPOConfig(levels="token"))
    with pytest.raises(ValueError, match="no trained modality"):
        bicot_loss(None, None, ADV, GRPOConfig())


def test_bicot_loss_rejects_batch_mismatch():
    plan, image = make_terms()
    with pytest.raises(ValueError, match="N=3"):
        bicot_loss(plan, image, torch.tensor([1.0, -1.0, 0.0]), GRPOConfig())
    with pytest.raises(ValueError, match="1-D"):
        bicot_loss(plan, image, ADV[:, None], GRPOConfig())


# --------------------------------------------------------------------------- config


def test_config_defaults_and_levels():
    cfg = GRPOConfig()
    assert (cfg.beta, cfg.kl_estimator, cfg.aggregation, cfg.levels) == (0.01, "k3", "token_mean", "both")
    assert (cfg.adv_eps, cfg.num_generations, cfg.mu) == (1e-4, 8, 1)
    assert cfg.train_plan and cfg.train_image
    semantic, token = GRPOConfig(levels="semantic"), GRPOConfig(levels="token")
    assert semantic.train_plan and not semantic.train_image
    assert token.train_image and not token.train_plan
    # an off level's weight may be zero
    GRPOConfig(levels="token", plan_weight=0.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kl_estimator", "k4"),
        ("aggregation", "mean"),
        ("levels", "all"),
        ("beta", -0.1),
        ("beta", float("inf")),
        ("clip_eps_low", -0.1),
        ("clip_eps_low", 1.0),
        ("clip_eps_high", -0.5),
        ("adv_eps", 0.0),
        ("plan_weight", -1.0),
        ("image_weight", -2.0),
        ("num_generations", 1),
        ("mu", 0),
    ],
)
def test_config_rejects_bad_value(field, value):
    with pytest.raises(ValueError) as info:
        GRPOConfig(**{field: value})
    assert field in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"plan_weight": 0.0, "image_weight": 0.0}, "plan_weight"),
        ({"levels": "semantic", "plan_weight": 0.0}, "plan_weight"),
        ({"levels": "token", "image_weight": 0.0}, "image_weight"),
    ],
)
def test_config_rejects_all_active_weights_zero(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**kwargs)
