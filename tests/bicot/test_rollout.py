"""The Rollout container: consistent row slicing, plan padding trimmed per slice, moving devices."""

import torch

from bicot.rollout import Rollout

PLAN_LENGTHS = [2, 5, 1, 3]  # valid plan tokens per row; the plan tensors are 6 wide
R, T, N, L = 4, 6, 3, 5


def make_rollout(with_plans: bool = True, scored: bool = True) -> Rollout:
    """A hand-built rollout of R = 2 prompts x 2 samples whose every value names its row."""
    rows = torch.arange(R, dtype=torch.float32)[:, None]  # [R, 1]
    mask = torch.arange(T)[None] < torch.tensor(PLAN_LENGTHS)[:, None]  # [R, T]
    plan = dict(
        plan_context_ids=torch.arange(R * 7).view(R, 7),
        plan_context_mask=torch.ones(R, 7, dtype=torch.long),
        plan_tokens=torch.where(
            mask, torch.arange(R * T).view(R, T) + 10, torch.zeros(R, T, dtype=torch.long)
        ),
        plan_mask=mask,
        plan_logp=torch.where(mask, -(rows + 1) - torch.arange(T) / 10, torch.zeros(R, T)),
        plans=[f"plan {i}" for i in range(R)],
    )
    if not with_plans:
        plan = {k: None for k in plan}
    r = Rollout(
        records=[f"record {i // 2}" for i in range(R)],
        group_size=2,
        **plan,
        image_cond_ids=torch.arange(R * L).view(R, L),
        image_cond_mask=torch.ones(R, L, dtype=torch.long),
        image_uncond_ids=torch.arange(R * L).view(R, L) + 100,
        image_tokens=torch.arange(R * N).view(R, N),
        image_logp=-rows.expand(R, N) / 7,
        images=torch.arange(R, dtype=torch.uint8).view(R, 1, 1, 1).expand(R, 2, 2, 3).contiguous(),
    )
    if scored:
        r.rewards = rows.squeeze(1) / 10
        r.reward_per_expert = {"a": rows.squeeze(1) + 0.5, "b": -rows.squeeze(1)}
        r.advantages = rows.squeeze(1) - 1.5
        r.ref_image_logp = r.image_logp - 0.25
        if with_plans:
            r.ref_plan_logp = torch.where(mask, r.plan_logp - 0.5, torch.zeros(R, T))
    return r


def test_num_rows_counts_image_rows():
    assert make_rollout().num_rows == R


def test_rows_slices_every_per_row_field_consistently():
    r = make_rollout()
    sub = r.rows(slice(1, 3))
    assert sub.num_rows == 2
    assert sub.group_size == 2
    assert sub.records == ["record 0", "record 1"]
    assert sub.plans == ["plan 1", "plan 2"]
    for name in (
        "plan_context_ids",
        "plan_context_mask",
        "image_cond_ids",
        "image_cond_mask",
        "image_uncond_ids",
        "image_tokens",
        "image_logp",
        "images",
        "rewards",
        "advantages",
        "ref_image_logp",
    ):
        torch.testing.assert_close(getattr(sub, name), getattr(r, name)[1:3], msg=name)
    assert set(sub.reward_per_expert) == {"a", "b"}
    for name, scores in sub.reward_per_expert.items():
        torch.testing.assert_close(scores, r.reward_per_expert[name][1:3])


def test_rows_trims_plan_padding_to_the_longest_plan_of_the_slice():
    r = make_rollout()
    # rows 1..2 have 5 and 1 valid tokens: width 5 of 6
    sub = r.rows(slice(1, 3))
    for name in ("plan_tokens", "plan_mask", "plan_logp", "ref_plan_logp"):
        torch.testing.assert_close(getattr(sub, name), getattr(r, name)[1:3, :5], msg=name)
    # rows 2..3 have 1 and 3: width 3
    assert r.rows(slice(2, 4)).plan_tokens.shape == (2, 3)
    assert r.rows(slice(2, 4)).ref_plan_logp.shape == (2, 3)
    # a single one-token plan keeps exactly one column
    one = r.rows(slice(2, 3))
    assert one.plan_mask.shape == (1, 1) and bool(one.plan_mask.all())
    # the whole batch keeps its longest plan (5), dropping the all-padding last column
    assert r.rows(slice(0, R)).plan_tokens.shape == (R, 5)
    # trimming never drops a valid token
    for rows in (slice(0, 1), slice(1, 2), slice(2, 4), slice(0, R)):
        assert int(r.rows(rows).plan_mask.sum()) == int(r.plan_mask[rows].sum())


def test_rows_keeps_at_least_one_plan_column_when_the_slice_has_no_valid_token():
    r = make_rollout()
    r.plan_mask[2] = False
    sub = r.rows(slice(2, 3))
    assert sub.plan_tokens.shape == (1, 1)


def test_rows_leaves_the_original_untouched():
    r = make_rollout()
    before = r.plan_tokens.clone(), list(r.records), r.reward_per_expert["a"].clone()
    r.rows(slice(0, 1))
    torch.testing.assert_close(r.plan_tokens, before[0])
    assert r.records == before[1]
    torch.testing.assert_close(r.reward_per_expert["a"], before[2])
    assert r.num_rows == R


def test_rows_without_plans_or_scores_keeps_them_none():
    r = make_rollout(with_plans=False, scored=False)
    sub = r.rows(slice(0, 3))
    assert sub.num_rows == 3
    for name in (
        "plan_context_ids",
        "plan_context_mask",
        "plan_tokens",
        "plan_mask",
        "plan_logp",
        "plans",
        "rewards",
        "advantages",
        "ref_plan_logp",
        "ref_image_logp",
    ):
        assert getattr(sub, name) is None, name
    assert sub.reward_per_expert == {}
    torch.testing.assert_close(sub.image_tokens, r.image_tokens[:3])


def test_to_keeps_values_dtypes_and_fields():
    r = make_rollout()
    moved = r.to(torch.device("cpu"))
    assert moved.records == r.records and moved.plans == r.plans and moved.group_size == r.group_size
    for name in (
        "plan_tokens",
        "plan_mask",
        "plan_logp",
        "image_tokens",
        "image_logp",
        "images",
        "rewards",
        "advantages",
        "ref_plan_logp",
        "ref_image_logp",
        "image_uncond_ids",
    ):
        a, b = getattr(moved, name), getattr(r, name)
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, msg=name)
    assert set(moved.reward_per_expert) == {"a", "b"}
    torch.testing.assert_close(moved.reward_per_expert["b"], r.reward_per_expert["b"])


def test_to_moves_every_tensor_including_per_expert_scores():
    moved = make_rollout().to(torch.device("meta"))
    tensors = {name: value for name, value in vars(moved).items() if isinstance(value, torch.Tensor)}
    assert len(tensors) == 15
    assert all(t.device.type == "meta" for t in tensors.values())
    assert all(t.device.type == "meta" for t in moved.reward_per_expert.values())
    assert moved.records == make_rollout().records


def test_rows_moves_the_row_offset_slices_entropies_and_keeps_global_rewards_whole():
    """A slice's first row is row ``row_offset + start`` of the global batch (advantages are read there); the global
    rewards stay whole (group statistics need every row); plan entropies are trimmed with the plan."""
    r = make_rollout()
    r.row_offset = 8
    r.global_rewards = torch.arange(12, dtype=torch.float32)
    r.plan_entropy = torch.where(r.plan_mask, r.plan_logp.neg(), torch.zeros(R, T))
    r.image_entropy = torch.arange(R * N, dtype=torch.float32).view(R, N)
    sub = r.rows(slice(1, 3))
    assert sub.row_offset == 9 and sub.rows(slice(1, 2)).row_offset == 10
    torch.testing.assert_close(sub.global_rewards, r.global_rewards)
    torch.testing.assert_close(sub.plan_entropy, r.plan_entropy[1:3, :5])  # rows 1..2: 5 and 1 valid tokens
    torch.testing.assert_close(sub.image_entropy, r.image_entropy[1:3])
