"""The fit loop's phases on a tiny random Janus: rollout shapes and seeding, scoring, and the update's
gradient-accumulation and data-parallel contracts."""

import math
import statistics

import pytest
import torch

from bicot import loop
from bicot.loop import RowPlacement, image_context, loss_denominator, plan_batch, rollout_phase, score_phase
from bicot.loss import GRPOConfig
from bicot.templates import resolve_template
from datamodules.records import PromptRecord
from modules.policy import JanusPolicy, SamplingConfig
from modules.reference import ReferencePolicy
from modules.rewards.base import RewardExpert
from modules.rewards.ensemble import RewardEnsemble, RewardExpertError
from modules.tiny import TinyJanusSpec

G = 3
RECORDS = [
    PromptRecord("a red circle", task_type="color"),
    PromptRecord("two blue squares", task_type="numeracy"),
]
R = len(RECORDS) * G
PLAN_MAX = 6
PLAN_LENGTHS = [6, 2, 4, 1, 3, 5]  # forced valid plan tokens per row, so minibatches trim differently
TEMPLATE = resolve_template("default")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine the threads'
    spin-waiting makes these tests an order of magnitude slower. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Brightness(RewardExpert):
    """Mean pixel value in [0, 1]: deterministic, and different for different images."""

    name = "brightness"

    def score(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3)) / 255


class Table(RewardExpert):
    """Fixed scores by row."""

    name = "table"

    def __init__(self, values=(0.1, 0.5, 0.9, 0.3, 0.8, 0.6)) -> None:
        super().__init__()
        self.values = values

    def score(self, images, prompts):
        return torch.tensor(self.values[: images.shape[0]])


def make_policy(image_logprob: str = "conditional", seed: int = 0, use_plan: bool = True) -> JanusPolicy:
    sampling = SamplingConfig(plan_max_tokens=PLAN_MAX, image_logprob=image_logprob, cfg_scale=5.0)
    return JanusPolicy(tiny=TinyJanusSpec(seed=seed), trainable=["all"], sampling=sampling, use_plan=use_plan)


def other_reference() -> ReferencePolicy:
    """A reference with other weights (same tokenizer), so KL terms and their gradients are not zero."""
    return ReferencePolicy.from_policy(make_policy(seed=1))


def make_rollout(policy: JanusPolicy, seed: int = 7, template: str | None = TEMPLATE):
    return rollout_phase(policy, RECORDS, G, template, RowPlacement(seed))


def force_plan_lengths(r, lengths=PLAN_LENGTHS, pad_id: int = 0) -> None:
    """Give the rows plans of different lengths (a random tiny model rarely samples EOS)."""
    width = r.plan_tokens.shape[1]
    assert width == PLAN_MAX
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]  # [R, T]
    r.plan_mask = mask
    r.plan_tokens = torch.where(mask, r.plan_tokens, torch.full_like(r.plan_tokens, pad_id))
    r.plan_logp = torch.where(mask, r.plan_logp, torch.zeros_like(r.plan_logp))


def ensemble() -> RewardEnsemble:
    return RewardEnsemble([Brightness(), Table()], weights={"brightness": 0.5, "table": 2.0})


def scored_rollout(policy: JanusPolicy, algo: GRPOConfig, reference: ReferencePolicy | None):
    r = make_rollout(policy)
    force_plan_lengths(r, pad_id=policy.pad_id)
    score_phase(r, ensemble(), algo, policy, reference)
    return r


class GradRecorder:
    """A ``step`` callable that records a copy of the trainable gradients, then zeroes them."""

    def __init__(self, policy: JanusPolicy) -> None:
        self.named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
        self.steps: list[dict[str, torch.Tensor | None]] = []

    def __call__(self) -> tuple[float, bool]:
        self.steps.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in self.named})
        for _, p in self.named:
            p.grad = None
        return 0.0, True

    def flat(self, index: int = -1) -> torch.Tensor:
        grads = self.steps[index]
        return torch.cat(
            [(grads[n] if grads[n] is not None else torch.zeros_like(p)).flatten() for n, p in self.named]
        )


def backward(loss: torch.Tensor) -> None:
    loss.backward()


def run_update(policy, r, algo, minibatch_size=None, world_size=1, global_denominator=None):
    recorder = GradRecorder(policy)
    denominator = loss_denominator(r, algo) if global_denominator is None else global_denominator
    stats = loop.update_phase(policy, r, algo, backward, recorder, denominator, world_size, minibatch_size)
    return recorder, stats


# --------------------------------------------------------------------------- rollout phase


def test_rollout_shapes_are_prompt_major_with_records_repeated():
    policy = make_policy()
    r = make_rollout(policy)
    n = policy.num_image_tokens
    assert r.num_rows == R and r.group_size == G
    assert all(r.records[p * G + g] is RECORDS[p] for p in range(2) for g in range(G))
    assert r.image_tokens.shape == (R, n) and r.image_logp.shape == (R, n)
    assert r.images.dtype == torch.uint8 and r.images.shape[0] == R and r.images.shape[-1] == 3
    assert r.image_cond_ids.shape == r.image_cond_mask.shape == r.image_uncond_ids.shape
    assert bool((r.image_cond_ids[:, -1] == policy.boi_id).all())
    width = r.plan_tokens.shape[1]
    assert 1 <= width <= PLAN_MAX
    assert r.plan_mask.shape == r.plan_logp.shape == (R, width)
    assert len(r.plans) == R and all(isinstance(p, str) for p in r.plans)
    # prompt-major: the G reasoning contexts of a prompt are identical, the two prompts' differ
    ctx = r.plan_context_ids
    assert all(torch.equal(ctx[p * G], ctx[p * G + g]) for p in range(2) for g in range(G))
    assert not torch.equal(ctx[0], ctx[G])
    assert r.rewards is None and r.advantages is None and r.ref_image_logp is None


def test_rollout_images_are_conditioned_on_prompt_and_plan():
    policy = make_policy()
    r = make_rollout(policy)
    expected = policy.image_context([rec.prompt for rec in r.records], r.plans)
    torch.testing.assert_close(r.image_cond_ids, expected.cond_ids)
    torch.testing.assert_close(r.image_uncond_ids, expected.uncond_ids)


def test_rollout_without_template_has_no_plans():
    policy = make_policy(use_plan=False)
    r = make_rollout(policy, template=None)
    for name in ("plan_context_ids", "plan_context_mask", "plan_tokens", "plan_mask", "plan_logp", "plans"):
        assert getattr(r, name) is None, name
    assert r.image_tokens.shape == (R, policy.num_image_tokens)
    expected = policy.image_context([rec.prompt for rec in r.records], None)
    torch.testing.assert_close(r.image_cond_ids, expected.cond_ids)


@pytest.mark.parametrize("mode", ["conditional", "guided"])
def test_rollout_image_logp_follows_the_configured_mode(mode):
    policy = make_policy(image_logprob=mode)
    r = make_rollout(policy)
    # the update recomputes these teacher-forced: at the rollout's weights they must agree
    torch.testing.assert_close(
        policy.image_logprobs(image_context(r), r.image_tokens), r.image_logp, atol=1e-4, rtol=1e-4
    )
    other = make_policy(image_logprob="guided" if mode == "conditional" else "conditional")
    other_logp = other.image_logprobs(image_context(r), r.image_tokens)
    assert (other_logp - r.image_logp).abs().max() > 1e-2  # CFG 5 makes the two clearly different


def test_rollout_modes_sample_the_same_tokens():
    a = make_rollout(make_policy("conditional"))
    b = make_rollout(make_policy("guided"))
    assert torch.equal(a.image_tokens, b.image_tokens)
    assert not torch.allclose(a.image_logp, b.image_logp)


def test_rollout_is_deterministic_for_a_seed_and_differs_for_another():
    policy = make_policy()
    a, b, c = make_rollout(policy, seed=3), make_rollout(policy, seed=3), make_rollout(policy, seed=4)
    assert torch.equal(a.plan_tokens, b.plan_tokens)
    assert a.plans == b.plans
    assert torch.equal(a.image_tokens, b.image_tokens)
    assert torch.equal(a.images, b.images)
    torch.testing.assert_close(a.image_logp, b.image_logp)
    assert not torch.equal(a.image_tokens, c.image_tokens)
    assert a.plans != c.plans


@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_rollout_is_split_invariant_across_row_placements(template):
    # One process drawing every row == processes drawing contiguous slices of the global rows,
    # including a split inside a prompt's group (rows 0..1 and 1..R).
    policy = make_policy(use_plan=template is not None)
    whole = rollout_phase(policy, RECORDS, G, template, RowPlacement(5))
    for cut in (G, 1):
        first = rollout_phase(policy, RECORDS, G, template, RowPlacement(5, global_rows=R, offset=0, rows=cut))
        second = rollout_phase(policy, RECORDS, G, template, RowPlacement(5, global_rows=R, offset=cut))
        assert first.records + second.records == whole.records
        assert (first.row_offset, second.row_offset) == (0, cut)
        if template is not None:
            assert first.plans + second.plans == whole.plans
        assert torch.equal(torch.cat([first.image_tokens, second.image_tokens]), whole.image_tokens)
    # a middle process of three (both an offset and a row count): rows 1..3
    middle = rollout_phase(policy, RECORDS, G, template, RowPlacement(5, global_rows=R, offset=1, rows=3))
    assert middle.records == whole.records[1:4] and middle.row_offset == 1
    assert torch.equal(middle.image_tokens, whole.image_tokens[1:4])
    # and the placement matters: the second prompt's rows drawn with the first rows' noise differ
    alone = rollout_phase(policy, RECORDS[1:], G, template, RowPlacement(5, global_rows=R, offset=0, rows=G))
    assert not torch.equal(alone.image_tokens, whole.image_tokens[G:])


def test_rollout_leaves_the_model_in_the_mode_it_found():
    # validation and the sample grid sample in eval mode, training in train mode
    policy = make_policy()
    for training in (False, True):
        policy.model.train(training)
        make_rollout(policy)
        assert policy.model.training == training


def test_rollout_draws_plans_and_images_from_distinct_streams(monkeypatch):
    policy = make_policy()
    seeds = []
    real = policy.noise

    def spy(seed, global_rows=None, offset=0):
        seeds.append(seed)
        return real(seed, global_rows, offset)

    monkeypatch.setattr(policy, "noise", spy)
    make_rollout(policy, seed=3)
    make_rollout(policy, seed=4)
    assert len(seeds) == 4 and len(set(seeds)) == 4  # plan and image streams, never shared across steps


# --------------------------------------------------------------------------- score phase


def test_score_fills_rewards_per_expert_and_group_advantages():
    policy = make_policy()
    r = make_rollout(policy)
    score_phase(r, ensemble(), GRPOConfig(num_generations=G, beta=0.0), policy, None)
    brightness = r.images.float().mean(dim=(1, 2, 3)) / 255
    table = torch.tensor(Table().values)
    torch.testing.assert_close(r.reward_per_expert["brightness"], brightness)
    torch.testing.assert_close(r.reward_per_expert["table"], table)
    torch.testing.assert_close(r.rewards, 0.5 * brightness + 2.0 * table)
    rewards = r.rewards.tolist()
    expected = []
    for p in range(len(RECORDS)):
        group = rewards[p * G : (p + 1) * G]
        # stdev is the unbiased std, as torch.std in the paper's code
        mean, std = statistics.mean(group), statistics.stdev(group)
        expected += [(x - mean) / (std + 1e-4) for x in group]
    torch.testing.assert_close(r.advantages, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert r.ref_plan_logp is None and r.ref_image_logp is None


def test_score_takes_this_process_rows_of_the_advantages_of_the_gathered_rewards():
    # process 1 of 2 holds global rows 1..5: the first prompt's group is split, its row 0 is on process 0.
    # The advantages of rows 1..5 come from the global groups, and use the configured adv_eps (0.5).
    policy = make_policy()
    r = make_rollout(policy).rows(slice(1, R))
    values = Table().values  # the global rows' rewards
    rewards = RewardEnsemble([Table(values[1:])])

    def gather(local):  # process 0's part first
        if local.numel() == 1 + len(rewards.names):  # the failure flags: none anywhere
            return torch.cat([torch.zeros_like(local), local])
        return torch.cat([torch.tensor(values[:1]), local])

    score_phase(r, rewards, GRPOConfig(num_generations=G, beta=0.0, adv_eps=0.5), policy, None, gather=gather)
    expected = []
    for p in range(len(RECORDS)):
        group = values[p * G : (p + 1) * G]
        mean, std = statistics.mean(group), statistics.stdev(group)
        expected += [(x - mean) / (std + 0.5) for x in group]
    assert r.row_offset == 1
    torch.testing.assert_close(r.global_rewards, torch.tensor(values))
    torch.testing.assert_close(r.advantages, torch.tensor(expected[1:]), atol=1e-6, rtol=1e-6)


def test_score_gives_zero_advantage_to_a_group_of_equal_rewards():
    policy = make_policy()
    r = make_rollout(policy)
    score_phase(
        r,
        RewardEnsemble([Table((0.1, 0.5, 0.9, 0.3, 0.3, 0.3))]),
        GRPOConfig(num_generations=G),
        policy,
        None,
    )
    a = 0.4 / (0.4 + 1e-4)  # group 0: mean 0.5, unbiased std 0.4
    torch.testing.assert_close(r.advantages, torch.tensor([-a, 0.0, a, 0.0, 0.0, 0.0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("failed_there", [False, True])
def test_an_expert_zeroed_on_another_process_is_zeroed_here_too(failed_there):
    """``rewards.on_error: zero`` under data parallel: a group may span processes, so an expert that raised on
    one of them scores 0 on every one (else the group's rows would differ by that expert's scale)."""
    policy = make_policy()
    r = make_rollout(policy)
    rewards = RewardEnsemble([Brightness(), Table()], weights={"brightness": 0.5, "table": 2.0}, on_error="zero")

    def gather(values):  # this process, then a second one whose brightness expert raised (or not)
        if values.numel() == 1 + len(rewards.names):  # [raised, zeroed brightness, zeroed table]
            return torch.cat([values, torch.tensor([0.0, float(failed_there), 0.0])])
        return torch.cat([values, values])  # its rows' rewards: this process's, for the test

    score_phase(r, rewards, GRPOConfig(num_generations=G, beta=0.0), policy, None, gather=gather)
    table = 2.0 * torch.tensor(Table().values)
    assert (r.reward_per_expert["brightness"] == 0).all() == failed_there
    if failed_there:
        torch.testing.assert_close(r.rewards, table)
    else:
        torch.testing.assert_close(r.rewards, table + 0.5 * r.reward_per_expert["brightness"])
    assert not any(rewards.errors.values())  # it raised elsewhere: this process counts no error of its own


class Raises(RewardExpert):
    name = "raises"

    def score(self, images, prompts):
        raise RuntimeError("simulated expert failure")


@pytest.mark.parametrize("where", ["here", "there"])
def test_an_expert_that_raises_on_any_process_stops_every_process_at_the_same_gather(where):
    """``rewards.on_error: raise`` under data parallel: the process whose expert raised still takes part in the
    gather of failure flags, then every process raises, so none waits for the others until the timeout."""
    policy = make_policy()
    r = make_rollout(policy)
    experts = [Table(), Raises()] if where == "here" else [Table(), Brightness()]
    rewards = RewardEnsemble(experts)
    gathered = []

    def gather(values):  # this process, then a second one that raised (or not)
        gathered.append(values.clone())
        other = torch.zeros_like(values)
        other[0] = float(where == "there")
        return torch.cat([values, other])

    with pytest.raises(RewardExpertError) as info:
        score_phase(r, rewards, GRPOConfig(num_generations=G, beta=0.0), policy, None, gather=gather)
    assert len(gathered) == 1 and gathered[0][0] == float(where == "here")  # the flags, before anything else
    expected = "'raises' failed" if where == "here" else "raised on another process"
    assert expected in str(info.value)


def test_score_without_reward_scaling_only_centres():
    policy = make_policy()
    r = make_rollout(policy)
    score_phase(r, ensemble(), GRPOConfig(num_generations=G, beta=0.0, scale_rewards=False), policy, None)
    centred = r.rewards.view(-1, G) - r.rewards.view(-1, G).mean(1, keepdim=True)
    torch.testing.assert_close(r.advantages, centred.reshape(-1))


@pytest.mark.parametrize("beta, with_reference", [(0.0, True), (0.05, False)])
def test_score_skips_reference_logprobs_without_beta_or_reference(beta, with_reference):
    policy = make_policy()
    r = make_rollout(policy)
    reference = ReferencePolicy.from_policy(policy) if with_reference else None
    score_phase(r, ensemble(), GRPOConfig(num_generations=G, beta=beta), policy, reference)
    assert r.ref_plan_logp is None and r.ref_image_logp is None
    assert r.advantages is not None


@pytest.mark.parametrize(("levels", "untrained"), [("token", "plan_logprobs"), ("semantic", "image_logprobs")])
def test_score_computes_reference_logprobs_of_the_trained_level_only(monkeypatch, levels, untrained):
    policy = make_policy()
    reference = other_reference()
    monkeypatch.setattr(reference, untrained, _raise)
    r = scored_rollout(policy, GRPOConfig(num_generations=G, beta=0.05, levels=levels), reference)
    assert (r.ref_plan_logp is None) == (levels == "token")
    assert (r.ref_image_logp is None) == (levels == "semantic")


def test_score_reference_logprobs_come_from_the_reference_model():
    policy = make_policy()
    reference = other_reference()
    r = scored_rollout(policy, GRPOConfig(num_generations=G, beta=0.05), reference)
    assert r.ref_plan_logp.shape == r.plan_tokens.shape
    assert r.ref_image_logp.shape == r.image_tokens.shape
    expected_plan = policy.plan_logprobs(plan_batch(r), model=reference.model)
    expected_image = policy.image_logprobs(image_context(r), r.image_tokens, model=reference.model)
    torch.testing.assert_close(r.ref_plan_logp, expected_plan, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.ref_image_logp, expected_image, atol=1e-5, rtol=1e-5)
    assert (r.ref_image_logp - r.image_logp).abs().max() > 1e-2
    assert bool((r.ref_plan_logp[~r.plan_mask] == 0).all())


def test_score_reference_equal_to_policy_reproduces_rollout_logprobs():
    policy = make_policy()
    r = scored_rollout(policy, GRPOConfig(num_generations=G, beta=0.05), ReferencePolicy.from_policy(policy))
    torch.testing.assert_close(r.ref_image_logp, r.image_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r.ref_plan_logp, r.plan_logp, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("minibatch_size", [1, 4, 5])
def test_score_minibatches_give_the_same_reference_logprobs(minibatch_size):
    policy = make_policy()
    reference = other_reference()
    algo = GRPOConfig(num_generations=G, beta=0.05)
    whole = scored_rollout(policy, algo, reference)
    split = make_rollout(policy)
    force_plan_lengths(split, pad_id=policy.pad_id)
    score_phase(split, ensemble(), algo, policy, reference, minibatch_size=minibatch_size)
    assert split.ref_plan_logp.shape == whole.ref_plan_logp.shape
    torch.testing.assert_close(split.ref_plan_logp, whole.ref_plan_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.ref_image_logp, whole.ref_image_logp, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- update phase


def test_minibatches_cover_all_rows_in_order():
    assert loop.minibatches(6, None) == [slice(0, 6)]
    assert loop.minibatches(6, 4) == [slice(0, 4), slice(4, 6)]
    assert loop.minibatches(5, 1) == [slice(i, i + 1) for i in range(5)]


def test_loss_denominator_counts_trained_tokens_or_rows():
    policy = make_policy()
    r = make_rollout(policy)
    force_plan_lengths(r, pad_id=policy.pad_id)
    plan, image = sum(PLAN_LENGTHS), R * policy.num_image_tokens
    assert loss_denominator(r, GRPOConfig(num_generations=G)) == plan + image
    assert loss_denominator(r, GRPOConfig(num_generations=G, levels="semantic")) == plan
    assert loss_denominator(r, GRPOConfig(num_generations=G, levels="token")) == image
    assert loss_denominator(r, GRPOConfig(num_generations=G, aggregation="sequence_mean")) == R


@pytest.mark.parametrize("levels", ["both", "semantic", "token"])
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_minibatch_accumulation_equals_one_full_batch_step(aggregation, levels):
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.05, aggregation=aggregation, levels=levels, plan_weight=1.5)
    r = scored_rollout(policy, algo, other_reference())
    full, full_stats = run_update(policy, r, algo)
    expected = full.flat()
    assert len(full.steps) == 1
    assert expected.norm() > 1e-3  # not a vacuous comparison
    for size in (1, 4, 5):
        rec, stats = run_update(policy, r, algo, minibatch_size=size)
        assert len(rec.steps) == 1  # one optimizer step per epoch, however many minibatches
        torch.testing.assert_close(rec.flat(), expected, atol=1e-5, rtol=1e-5, msg=f"minibatch_size={size}")
        assert stats.loss == pytest.approx(full_stats.loss, abs=1e-5)
        assert stats.policy_loss == pytest.approx(full_stats.policy_loss, abs=1e-5)
        # token means: minibatches of unequal plan lengths (and plan_weight 1.5) still give the batch's
        for key in ("kl", "kl_plan", "kl_image", "clip_frac"):
            assert getattr(stats, key) == pytest.approx(getattr(full_stats, key), rel=1e-5, abs=1e-9), (size, key)
    assert full_stats.kl > 0 and (full_stats.kl_plan > 0) == (levels != "token")


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_data_parallel_scaling_matches_single_process(aggregation):
    # Contract: every process backwards loss * (local share of the global denominator) * world_size,
    # and DDP/FSDP then *averages* gradients over the world_size processes. The world_size factor
    # cancels that average, so the result is sum_k grad_k / global_denominator: the gradient of the
    # aggregation over the whole global batch, exactly what one process holding every row computes.
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.05, aggregation=aggregation)
    r = scored_rollout(policy, algo, other_reference())
    single = run_update(policy, r, algo)[0].flat()
    # two identical ranks: each holds half of a global denominator twice its own, the average is itself
    twin, _ = run_update(policy, r, algo, world_size=2, global_denominator=2 * loss_denominator(r, algo))
    twin = twin.flat()
    torch.testing.assert_close(twin, single, atol=1e-5, rtol=1e-5)
    # two ranks holding different rows (one prompt group each), gradients averaged as DDP would
    halves = [r.rows(slice(0, G)), r.rows(slice(G, R))]
    total = sum(loss_denominator(h, algo) for h in halves)
    grads = [run_update(policy, h, algo, world_size=2, global_denominator=total)[0].flat() for h in halves]
    torch.testing.assert_close((grads[0] + grads[1]) / 2, single, atol=1e-5, rtol=1e-5)


def test_token_means_merge_over_processes_into_the_single_process_means():
    # Two processes holding one prompt group each, with different plan lengths: the sums and token counts
    # they all-reduce (BiCoTGRPO._token_means) give the single process's means, where a mean of the two
    # processes' means would not.
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.05)
    r = scored_rollout(policy, algo, other_reference())
    _, single = run_update(policy, r, algo)
    halves = [r.rows(slice(0, G)), r.rows(slice(G, R))]
    total = sum(loss_denominator(h, algo) for h in halves)
    parts = [run_update(policy, h, algo, world_size=2, global_denominator=total)[1] for h in halves]
    assert sum(PLAN_LENGTHS[:G]) != sum(PLAN_LENGTHS[G:])
    for name in loop.TOKEN_MEANS:
        merged = [sum(p.token_sums[name][i] for p in parts) for i in (0, 1)]
        level = name.split("/")[1] if "/" in name else None
        expected = single.rollout_kl[level] if level else getattr(single, name)
        assert merged[0] / merged[1] == pytest.approx(expected, rel=1e-5, abs=1e-12), name
    mean_of_means = sum(p.kl_plan for p in parts) / 2
    assert mean_of_means != pytest.approx(single.kl_plan, rel=1e-3)  # what the exact merge avoids


def test_update_loss_is_the_token_mean_objective_not_the_kl():
    # With mu = 1 the ratio is 1, so each valid token's surrogate is minus its row's advantage: policy_loss is
    # the mean of -A over every valid token of the batch (rows weighted by their plan + image tokens, whatever
    # the minibatches: 4 and 2 rows here, with plans of 13 and 8 tokens), and the loss adds beta times the
    # token-mean KL. REWARDS.md defect 3: the public code logged the KL term as the loss.
    policy = make_policy()
    beta = 0.05
    algo = GRPOConfig(num_generations=G, beta=beta)
    r = scored_rollout(policy, algo, other_reference())
    _, stats = run_update(policy, r, algo, minibatch_size=4)
    tokens = r.plan_mask.sum(1) + r.image_tokens.shape[1]  # [R]
    expected = float((-r.advantages.double() * tokens).sum() / tokens.sum())
    assert abs(expected) > 1e-3  # the rows' token counts differ, so the advantages do not cancel
    assert stats.policy_loss == pytest.approx(expected, abs=1e-6)
    assert stats.loss == pytest.approx(expected + beta * stats.kl, abs=1e-6)
    assert stats.kl > 1e-3 and abs(stats.loss - stats.kl) > 1e-3


def test_minibatch_loss_ratio_uses_each_level_old_logprobs():
    # Later epochs pass the first epoch's log-probs as old: with old = current - d per row (d inside the clip
    # range, plan d = 0.02 * (R - row), image d = 0.025 * (row + 1)) each token's surrogate is -exp(d) * A.
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.0)
    r = scored_rollout(policy, algo, None)
    rows = torch.arange(R, dtype=torch.float64)
    d_plan, d_image = 0.02 * (R - rows), 0.025 * (rows + 1)  # [R], at most 0.15 < log(1.2)
    with torch.no_grad():
        plan = policy.plan_logprobs(plan_batch(r))  # [R, T]
        image = policy.image_logprobs(image_context(r), r.image_tokens)  # [R, N]
    old = {"plan": plan - d_plan[:, None].float(), "image": image - d_image[:, None].float()}
    out, _ = loop.minibatch_loss(policy, r, algo, old)
    adv, plan_tokens, n = r.advantages.double(), r.plan_mask.sum(1).double(), r.image_tokens.shape[1]
    numer = (adv * (plan_tokens * d_plan.exp() + n * d_image.exp())).sum()
    expected = float(-numer / (plan_tokens.sum() + R * n))
    assert float(out.clip_frac) == 0.0
    assert float(out.policy_loss) == pytest.approx(expected, abs=1e-6)


def test_update_logprobs_and_loss_are_float32_under_bfloat16_autocast():
    # bf16-mixed runs training_step under autocast, where the heads' logits come out in bf16; the log-softmax,
    # the ratio and the KL must still be float32 (bf16 holds a log-prob of -10 only to 0.06)
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.05)
    r = scored_rollout(policy, algo, other_reference())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, current = loop.minibatch_loss(policy, r, algo, None)
    assert {level: logp.dtype for level, logp in current.items()} == {"plan": torch.float32, "image": torch.float32}
    assert out.loss.dtype == out.kl.dtype == torch.float32


def test_mu_epochs_step_each_epoch_and_reuse_first_epoch_logprobs_as_old(monkeypatch):
    # mu = 3, so that "old" staying the first epoch's (not the previous epoch's) is visible
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.0, mu=3)
    r = scored_rollout(policy, algo, None)
    calls = []
    real = loop.minibatch_loss

    def spy(policy, sub, algo, old):
        out, current = real(policy, sub, algo, old)
        calls.append((old, current))
        return out, current

    monkeypatch.setattr(loop, "minibatch_loss", spy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=200.0)
    steps = []

    def step():
        steps.append(1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return 0.0, True

    stats = loop.update_phase(policy, r, algo, backward, step, loss_denominator(r, algo), 1, minibatch_size=4)
    assert len(steps) == 3
    assert len(calls) == 6  # 3 epochs x 2 minibatches
    for i in range(2):
        first_old, first_current = calls[i]
        assert first_old is None  # epoch 1: ratio 1 (the paper's single update)
        for epoch in (1, 2):
            old, current = calls[2 * epoch + i]
            assert set(old) == {"plan", "image"}
            for key in old:
                assert torch.equal(old[key], first_current[key]), (epoch, key)
                assert not old[key].requires_grad
            # the big step moved the policy: later epochs' log-probs are not the old ones
            assert (current["image"] - first_current["image"]).abs().max() > 1e-3
    assert stats.clip_frac > 0
    # the rollout mismatch is measured at the rollout's weights (the first epoch), once per token
    assert stats.token_sums["rollout_kl/image"][1] == r.image_tokens.numel()
    assert stats.rollout_logp_gap_max < 1e-4


def test_single_epoch_never_clips():
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.0)
    r = scored_rollout(policy, algo, None)
    _, stats = run_update(policy, r, algo, minibatch_size=4)
    assert stats.clip_frac == 0.0
    # without a KL term no KL is measured: its token means are absent (not a 0 over counted tokens)
    assert set(stats.token_sums) == {"clip_frac", "rollout_kl/plan", "rollout_kl/image"}


def test_update_reports_grad_norm_and_skipped_steps():
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.0, mu=3)
    r = scored_rollout(policy, algo, None)
    steps = iter([(1.0, False), (3.5, True), (2.0, False)])

    def step():
        policy.zero_grad(set_to_none=True)  # the weights do not move: every epoch has ratio 1 and the same loss
        return next(steps)

    stats = loop.update_phase(policy, r, algo, backward, step, loss_denominator(r, algo), minibatch_size=4)
    assert stats.skipped == 2  # the steps not applied
    assert stats.grad_norm == 2.0  # the last step's, not the largest
    # the loss is the mean over the mu epochs, not their sum: the token mean of -A, as with mu = 1
    tokens = r.plan_mask.sum(1) + r.image_tokens.shape[1]  # [R]
    expected = float((-r.advantages.double() * tokens).sum() / tokens.sum())
    assert abs(expected) > 1e-3
    assert stats.policy_loss == pytest.approx(expected, abs=1e-6)
    assert stats.loss == pytest.approx(expected, abs=1e-6)


def k3(d: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL per token, in float64: ``exp(d) - 1 - d``."""
    d = d.double()
    return d.exp() - 1 - d


def test_kl_max_is_the_largest_token_kl_of_every_minibatch():
    # one image token of row 0 (the first of two minibatches) gets a reference log-prob 3 above the policy's:
    # k3(3) = e^3 - 1 - 3 = 16.09, far above the tiny models' other token KLs
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.05)
    r = scored_rollout(policy, algo, other_reference())
    with torch.no_grad():
        image = policy.image_logprobs(image_context(r), r.image_tokens)  # [R, N]
    r.ref_image_logp = r.ref_image_logp.clone()
    r.ref_image_logp[0, 0] = image[0, 0] + 3.0
    _, stats = run_update(policy, r, algo, minibatch_size=4)
    assert stats.kl_max == pytest.approx(math.exp(3) - 4, rel=1e-5)


def test_rollout_mismatch_is_the_token_mean_of_k3_and_the_max_gap():
    # The rollout's log-probs are the update's minus a known d: per plan row 0.15 * (row + 1) on valid
    # tokens, so minibatches of 4 and 2 rows give a token mean unlike the mean of their means; padding
    # holds 5.0, a gap of 5 that must not count.
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.0)
    r = scored_rollout(policy, algo, None)
    with torch.no_grad():
        plan = policy.plan_logprobs(plan_batch(r))  # [R, T]
        image = policy.image_logprobs(image_context(r), r.image_tokens)  # [R, N]
    d_plan = 0.15 * torch.arange(1, R + 1, dtype=torch.float32)[:, None].expand_as(plan)  # [R, T]
    d_image = torch.linspace(-1.2, 0.3, image.numel()).view_as(image)  # [R, N]: the largest |d| is -1.2, row 0
    r.plan_logp = torch.where(r.plan_mask, plan - d_plan, torch.full_like(plan, 5.0))
    r.image_logp = image - d_image
    _, stats = run_update(policy, r, algo, minibatch_size=4)
    assert set(stats.rollout_kl) == {"plan", "image"}
    assert stats.rollout_kl["plan"] == pytest.approx(float(k3(d_plan[r.plan_mask]).mean()), rel=1e-4)
    assert stats.rollout_kl["image"] == pytest.approx(float(k3(d_image).mean()), rel=1e-4)
    assert stats.rollout_logp_gap_max == pytest.approx(1.2, abs=1e-4)  # |d| of image row 0, above plan row 5's 0.9


@pytest.mark.parametrize("mode", ["conditional", "guided"])
def test_rollout_and_update_logprobs_agree_in_float32(mode):
    # What users rely on: with float32 weights and the eager loop the update scores the tokens exactly
    # as the rollout sampled them (the GRPO ratio of the first epoch assumes it).
    algo = GRPOConfig(num_generations=G, beta=0.0)
    policy = make_policy(image_logprob=mode)
    r = make_rollout(policy)
    score_phase(r, ensemble(), algo, policy, None)
    _, stats = run_update(policy, r, algo, minibatch_size=4)
    assert set(stats.rollout_kl) == {"plan", "image"}
    assert all(0 <= kl < 1e-8 for kl in stats.rollout_kl.values()), stats.rollout_kl
    assert stats.rollout_logp_gap_max < 1e-4
    # and the metric sees a bf16 rollout scored by the float32 update
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = make_rollout(policy)
    score_phase(r, ensemble(), algo, policy, None)
    _, stats = run_update(policy, r, algo, minibatch_size=4)
    assert stats.rollout_logp_gap_max > 1e-4 and all(kl > 0 for kl in stats.rollout_kl.values())


# --------------------------------------------------------------------------- single-level ablations

IMAGE_SIDE = (
    "model.model.generation_head.",
    "model.model.generation_aligner.",
    "model.model.generation_embeddings.",
)
LM_WEIGHT = "model.model.language_model.layers.0.self_attn.q_proj.weight"
HEAD_WEIGHT = "model.model.generation_head.proj_out.weight"


def _raise(*args, **kwargs):
    raise AssertionError("this level is not trained: its log-probs must not be computed")


def test_semantic_only_never_computes_image_logprobs(monkeypatch):
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.05, levels="semantic")
    r = scored_rollout(policy, algo, other_reference())
    monkeypatch.setattr(policy, "image_logprobs", _raise)
    recorder, stats = run_update(policy, r, algo, minibatch_size=4)
    grads = recorder.steps[0]
    image_side = [n for n in grads if n.startswith(IMAGE_SIDE)]
    assert image_side and all(grads[n] is None for n in image_side)
    assert grads[LM_WEIGHT].abs().sum() > 0
    assert stats.kl_image == 0.0 and stats.kl_plan > 0
    assert set(stats.rollout_kl) == {"plan"}  # the level that does not train is not measured


def test_token_only_never_computes_plan_logprobs(monkeypatch):
    policy = make_policy()
    algo = GRPOConfig(num_generations=G, beta=0.05, levels="token")
    r = scored_rollout(policy, algo, other_reference())
    monkeypatch.setattr(policy, "plan_logprobs", _raise)
    recorder, stats = run_update(policy, r, algo, minibatch_size=4)
    grads = recorder.steps[0]
    assert grads[HEAD_WEIGHT].abs().sum() > 0
    assert stats.kl_plan == 0.0 and stats.kl_image > 0
    assert set(stats.rollout_kl) == {"image"}
