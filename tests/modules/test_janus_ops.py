"""Janus forward passes: sampling rules, classifier-free guidance, left padding and split-invariant noise."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from modules import janus_ops
from modules.janus_ops import RowNoise
from modules.policy import SamplingConfig

SHORT = "a red circle"
LONG = "two blue squares left of a green star under the sun near the ocean"
TEMPLATE = "describe {prompt} with every object and colour"


def stream(seed: int, global_rows: int | None = None, offset: int = 0) -> RowNoise:
    return RowNoise(torch.Generator().manual_seed(seed), global_rows, offset)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def teacher_forced_image_logits(model, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor):
    """``[B, N, V]`` generation-head logits of one branch, written out from the public building blocks."""
    image_embeds = model.prepare_embeddings_for_image_generation(tokens[:, :-1])
    embeds = torch.cat([model.get_input_embeddings()(ids), image_embeds], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(tokens[:, :-1])], dim=1)
    hidden = janus_ops.lm_hidden(model, embeds, full_mask, janus_ops.positions_from_mask(full_mask))
    return model.model.generation_head(hidden[:, ids.shape[1] - 1 :])


# --------------------------------------------------------------------------- small pieces


def test_positions_from_mask_skips_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert janus_ops.positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_scaled_logprobs_tempers_and_greedy_scores_untempered():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    close(janus_ops.scaled_logprobs(logits, 0.5), F.log_softmax(logits * 2, -1), atol=1e-6)
    close(janus_ops.scaled_logprobs(logits, 0.0), F.log_softmax(logits, -1), atol=1e-6)
    assert janus_ops.scaled_logprobs(logits.half(), 1.0).dtype == torch.float32


def test_sample_tokens_logp_is_the_untruncated_tempered_distribution():
    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(1)) * 3
    tokens, logp, _ = janus_ops.sample_tokens(logits, temperature=0.7, top_k=5, top_p=0.8, noise=stream(2))
    expected = F.log_softmax(logits / 0.7, -1).gather(-1, tokens[:, None]).squeeze(-1)
    close(logp, expected, atol=1e-6)
    assert logp.dtype == torch.float32 and tokens.dtype == torch.long


def test_sample_tokens_entropy_is_the_exact_entropy_of_the_tempered_untruncated_distribution():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -1.0, -30.0]])
    _, _, entropy = janus_ops.sample_tokens(logits, 0.5, top_k=2, noise=stream(1))
    assert entropy[0].item() == pytest.approx(math.log(4))  # uniform over 4 (top-k does not truncate it)
    p = F.softmax(logits[1] * 2, -1)
    assert entropy[1].item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    _, _, greedy = janus_ops.sample_tokens(logits, 0.0)
    assert greedy[1].item() > entropy[1].item()  # greedy scores the untempered distribution


def test_sampled_image_entropy_is_the_guided_mixtures_entropy(sharp_policy):
    """Step 0's entropy, recomputed from a plain forward of the contexts: of the CFG mixture sampled from."""
    model = sharp_policy.model
    ctx = sharp_policy.image_context(["a red circle", "two blue squares"], None)
    out = janus_ops.sample_image_tokens(
        model, ctx.cond_ids, ctx.cond_mask, 6, ctx.uncond_ids, 3.0, 0.8, noise=stream(5)
    )
    assert out.entropy.shape == out.tokens.shape and (out.entropy > 0).all()
    assert (out.entropy <= math.log(model.config.vq_config.num_embeddings) + 1e-5).all()
    with torch.no_grad():
        last = []
        for ids in (ctx.cond_ids, ctx.uncond_ids):
            positions = janus_ops.positions_from_mask(ctx.cond_mask)
            hidden = model.model.language_model(
                input_ids=ids, attention_mask=ctx.cond_mask, position_ids=positions
            ).last_hidden_state
            last.append(model.model.generation_head(hidden[:, -1]))
        guided = last[1] + 3.0 * (last[0] - last[1])
        p = F.softmax(guided.float() / 0.8, -1)
    close(out.entropy[:, 0], -(p * p.log()).sum(-1), atol=1e-4)


def test_sample_tokens_top_k_restricts_samples_to_the_k_best():
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(3)).expand(500, 30)
    tokens, _, _ = janus_ops.sample_tokens(logits, temperature=2.0, top_k=4, noise=stream(4))
    top4 = set(logits[0].topk(4).indices.tolist())
    assert set(tokens.tolist()) == top4  # never outside, and every one of the four is reachable


@pytest.mark.parametrize(("top_p", "support"), [(0.8, {0, 1}), (0.81, {0, 1, 2}), (0.4, {0})])
def test_sample_tokens_top_p_keeps_the_smallest_prefix_reaching_p(top_p, support):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(2000, 4)
    tokens, _, _ = janus_ops.sample_tokens(logits, top_p=top_p, noise=stream(5))
    assert set(tokens.tolist()) == support


def test_sample_tokens_top_p_keeps_the_most_likely_token_whatever_p():
    """HF's TopPLogitsWarper keeps ``min_tokens_to_keep`` (1) tokens: a top_p at or below 0 is greedy, never the
    all-masked row whose argmax is token 0."""
    logits = torch.tensor([0.05, 0.15, 0.5, 0.3]).log().expand(200, 4)
    for top_p in (0.0, 1e-9):
        tokens, logp, entropy = janus_ops.sample_tokens(logits, top_p=top_p, noise=stream(5))
        assert (tokens == 2).all()
        assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()


@pytest.mark.parametrize(("top_k", "top_p"), [(4, 0.63), (0, 1.0), (4, 1.0)])
def test_sample_tokens_is_an_exact_sample_of_the_truncated_distribution(top_k, top_p):
    """Temperature, then top-k renormalised, then top-p on it (HF's warper order): Gumbel-max frequencies match
    the truncated, renormalised tempered distribution. (Untruncated, or over more than two tokens: the
    difference of two Gumbels is symmetric, so a two-token draw cannot tell the noise +G from -G.)"""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0]).expand(40000, 6)
    tokens, _, _ = janus_ops.sample_tokens(logits, temperature=1.5, top_k=top_k, top_p=top_p, noise=stream(6))
    p = F.softmax(logits[0] / 1.5, -1)
    if top_k:
        p[top_k:] = 0
        p = p / p.sum()  # top-k renormalises: [0.383, 0.273, 0.195, 0.114]
    # top-p 0.63 keeps two of those (three unrenormalised)
    keep = (p.cumsum(0) - p) < top_p
    expected = torch.where(keep, p, 0) / p[keep].sum()
    freq = torch.bincount(tokens, minlength=6).float() / tokens.numel()
    close(freq, expected, atol=0.01)


def test_guide_mixes_bfloat16_logits_in_float32():
    """Autocast's head gives bfloat16 logits: the CFG mix (scale 5 amplifies rounding) runs in float32."""
    generator = torch.Generator().manual_seed(7)
    cond = (torch.randn(4, 4096, generator=generator) * 4).bfloat16()
    uncond = (cond.float() + torch.randn(4, 4096, generator=generator)).bfloat16()
    exact = uncond.float() + 5.0 * (cond.float() - uncond.float())
    mixed = janus_ops.guide(cond, uncond, 5.0)
    assert mixed.dtype == torch.float32
    close(janus_ops.scaled_logprobs(mixed, 1.0), janus_ops.scaled_logprobs(exact, 1.0), atol=1e-5)


def test_sample_tokens_greedy_ignores_the_noise():
    logits = torch.randn(8, 12, generator=torch.Generator().manual_seed(6))
    tokens, logp, _ = janus_ops.sample_tokens(logits, temperature=0.0, noise=stream(7))
    assert torch.equal(tokens, logits.argmax(-1))
    close(logp, F.log_softmax(logits, -1).max(-1).values, atol=1e-6)


def test_guide_mixes_branches_and_scale_one_is_the_conditional():
    cond, uncond = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 0.0]])
    close(janus_ops.guide(cond, uncond, 3.0), torch.tensor([[-1.0, 9.0]]), atol=0)
    assert torch.equal(janus_ops.guide(cond, uncond, 1.0), cond)
    assert torch.equal(janus_ops.guide(cond, None, 5.0), cond)


def test_row_noise_slices_of_the_global_batch_match_the_whole():
    whole = stream(8).gumbel(6, 10, torch.device("cpu"))
    first = stream(8, global_rows=6, offset=0).gumbel(4, 10, torch.device("cpu"))
    second = stream(8, global_rows=6, offset=4).gumbel(2, 10, torch.device("cpu"))
    assert torch.equal(torch.cat([first, second]), whole)
    with pytest.raises(ValueError, match="exceed the global batch of 6"):
        stream(8, global_rows=6, offset=5).gumbel(2, 10, torch.device("cpu"))


class FixedNoise:
    """Stands in for ``RowNoise``: the Gumbel noise is given, so a test can make any token win the draw."""

    def __init__(self, gumbel: torch.Tensor) -> None:
        self.noise = gumbel

    def gumbel(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        return self.noise


@pytest.mark.parametrize(("top_k", "top_p", "expected"), [(1, 1.0, 0), (0, 1.0, 1), (4, 1.0, 1), (0, 0.5, 0)])
def test_sample_tokens_top_k_one_is_greedy_and_no_truncation_keeps_negligible_tokens(top_k, top_p, expected):
    """Token 1 has probability e^-30 (the mass before it rounds to 1.0 in float32) but the noise makes it win:
    only a real truncation (top-k 1 keeps the argmax, top-p 0.5 keeps token 0) may refuse it."""
    logits = torch.tensor([[0.0, -30.0, -31.0, -32.0]])
    noise = FixedNoise(torch.tensor([[0.0, 100.0, 0.0, 0.0]]))
    tokens, logp, _ = janus_ops.sample_tokens(logits, 1.0, top_k=top_k, top_p=top_p, noise=noise)
    assert tokens.tolist() == [expected]
    close(logp, F.log_softmax(logits, -1)[:, expected], atol=1e-6)


def test_row_noise_fill_uniform_draws_the_uniforms_gumbel_transforms():
    """The static engine draws the global batch's uniforms into a buffer and transforms this rank's rows: the
    same Gumbel noise as ``gumbel``, from the noise's own generator (not torch's global stream)."""
    torch.manual_seed(99)  # the global stream is elsewhere: a draw from it would not match
    full = torch.empty(6, 10)
    stream(8).fill_uniform(full)
    for offset, rows in ((0, 6), (0, 4), (4, 2)):
        expected = stream(8, global_rows=6, offset=offset).gumbel(rows, 10, torch.device("cpu"))
        assert torch.equal(-torch.log(-torch.log(full[offset : offset + rows])), expected)


def test_decode_images_maps_minus_one_to_one_onto_rounded_clamped_bytes():
    pixels = torch.tensor([-1.5, -1.0, -0.5, 0.5, 0.999, 1.0, 2.0]).view(1, 1, 7, 1).expand(1, 1, 7, 3)
    model = types.SimpleNamespace(decode_image_tokens=lambda tokens: pixels)
    images = janus_ops.decode_images(model, torch.zeros(1, 1, dtype=torch.long))
    assert images.dtype == torch.uint8
    # (p + 1) * 127.5 rounded: -0.5 -> 63.75 -> 64, 0.5 -> 191.25 -> 191, 0.999 -> 254.87 -> 255;
    # outside [-1, 1] clamped
    assert images[0, 0, :, 0].tolist() == [0, 0, 64, 191, 255, 255, 255]


def test_model_entry_enters_through_the_models_bicot_forward():
    """A sharded model's passes run inside its ``bicot_forward`` (FSDP2's gather, then the pass)."""
    calls = []

    def bicot_forward(fn, *args, **kwargs):
        calls.append((fn.__name__, args))
        return fn(model, *args, **kwargs)

    model = types.SimpleNamespace(decode_image_tokens=lambda t: torch.ones(1, 1, 1, 3))
    model.bicot_forward = bicot_forward
    tokens = torch.zeros(1, 1, dtype=torch.long)
    assert janus_ops.decode_images(model, tokens).tolist() == [[[[255, 255, 255]]]]
    assert calls == [("decode_images", (tokens,))]


# --------------------------------------------------------------------------- classifier-free guidance


def test_cfg_scale_one_samples_exactly_the_conditional_branch(sharp_policy):
    ctx = sharp_policy.image_context([SHORT, LONG], None)
    n, model = sharp_policy.num_image_tokens, sharp_policy.model
    with_uncond = janus_ops.sample_image_tokens(
        model, ctx.cond_ids, ctx.cond_mask, n, uncond_ids=ctx.uncond_ids, cfg_scale=1.0, noise=stream(9)
    )
    alone = janus_ops.sample_image_tokens(
        model, ctx.cond_ids, ctx.cond_mask, n, uncond_ids=None, noise=stream(9)
    )
    assert torch.equal(with_uncond.tokens, alone.tokens)
    assert torch.equal(with_uncond.logp_conditional, alone.logp_conditional)
    assert torch.equal(with_uncond.logp_guided, alone.logp_guided)
    close(alone.logp_guided, alone.logp_conditional, atol=0)  # no guidance: one distribution


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_guided_logprobs_equal_the_mixture_of_two_separate_passes(sharp_policy, temperature):
    scale = 3.0
    ctx = sharp_policy.image_context([SHORT, LONG], None)
    model = sharp_policy.model
    sample = janus_ops.sample_image_tokens(
        model,
        ctx.cond_ids,
        ctx.cond_mask,
        sharp_policy.num_image_tokens,
        uncond_ids=ctx.uncond_ids,
        cfg_scale=scale,
        temperature=temperature,
        noise=stream(10),
    )
    with torch.no_grad():
        c = teacher_forced_image_logits(model, ctx.cond_ids, ctx.cond_mask, sample.tokens)  # [B, N, V]
        u = teacher_forced_image_logits(model, ctx.uncond_ids, ctx.cond_mask, sample.tokens)
        guided_tf = janus_ops.image_logprobs(
            model, ctx.cond_ids, ctx.cond_mask, sample.tokens, temperature, ctx.uncond_ids, scale
        )
    picked = sample.tokens[..., None]
    by_hand = F.log_softmax((u + scale * (c - u)) / temperature, -1).gather(-1, picked)[..., 0]
    cond_by_hand = F.log_softmax(c / temperature, -1).gather(-1, picked)[..., 0]
    close(sample.logp_guided, by_hand, atol=1e-4)
    close(guided_tf, by_hand, atol=1e-5)
    close(sample.logp_conditional, cond_by_hand, atol=1e-4)
    assert (by_hand - cond_by_hand).abs().max() > 1e-2  # the two branches really differ


# --------------------------------------------------------------------------- left padding


def test_left_padding_does_not_change_plan_logprobs(sharp_policy):
    sharp_policy.sampling = SamplingConfig(plan_max_tokens=12)
    alone = sharp_policy.sample_plans([SHORT], TEMPLATE, 1, sharp_policy.noise(11))
    ids, mask = sharp_policy.encode(
        [sharp_policy.chat(TEMPLATE.replace("{prompt}", p)) for p in (SHORT, LONG)]
    )
    assert mask[0, 0] == 0 and mask[1].all()  # the short prompt is left-padded in the batch
    tokens = alone.tokens.expand(2, -1)
    token_mask = alone.mask.expand(2, -1)
    with torch.no_grad():
        tf_alone = janus_ops.text_logprobs(
            sharp_policy.model, alone.context_ids, alone.context_mask, alone.tokens, alone.mask
        )
        tf_batch = janus_ops.text_logprobs(sharp_policy.model, ids, mask, tokens, token_mask)
    close(tf_batch[:1], tf_alone, atol=1e-5)
    close(tf_alone, alone.logp, atol=1e-4)


@pytest.mark.parametrize("guided", [False, True])
def test_left_padding_does_not_change_image_logprobs(sharp_policy, guided):
    scale = 4.0
    alone_ctx = sharp_policy.image_context([SHORT], None)
    batch_ctx = sharp_policy.image_context([SHORT, LONG], None)
    assert batch_ctx.cond_mask[0, 0] == 0 and batch_ctx.cond_ids.shape[1] > alone_ctx.cond_ids.shape[1]
    model, n = sharp_policy.model, sharp_policy.num_image_tokens
    sample = janus_ops.sample_image_tokens(
        model, alone_ctx.cond_ids, alone_ctx.cond_mask, n, alone_ctx.uncond_ids, scale, noise=stream(12)
    )
    tokens = sample.tokens.expand(2, -1)
    with torch.no_grad():
        tf_alone = janus_ops.image_logprobs(
            model, alone_ctx.cond_ids, alone_ctx.cond_mask, sample.tokens, 1.0,
            alone_ctx.uncond_ids if guided else None, scale,
        )  # fmt: skip
        tf_batch = janus_ops.image_logprobs(
            model, batch_ctx.cond_ids, batch_ctx.cond_mask, tokens, 1.0,
            batch_ctx.uncond_ids if guided else None, scale,
        )  # fmt: skip
    close(tf_batch[:1], tf_alone, atol=1e-5)
    close(tf_alone, sample.logp_guided if guided else sample.logp_conditional, atol=1e-4)


# --------------------------------------------------------------------------- split invariance


def test_row_noise_halves_sample_the_same_image_tokens_as_the_whole_batch(sharp_policy):
    prompts = [SHORT, LONG, "a yellow sun", "three black triangles above a white square"]
    model, n, scale = sharp_policy.model, sharp_policy.num_image_tokens, 3.0

    def sample(rows: list[str], noise: RowNoise):
        ctx = sharp_policy.image_context(rows, None)  # each "rank" pads its own rows only
        return janus_ops.sample_image_tokens(
            model, ctx.cond_ids, ctx.cond_mask, n, ctx.uncond_ids, scale, top_k=20, noise=noise
        )

    whole = sample(prompts, stream(13))
    first = sample(prompts[:2], stream(13, global_rows=4, offset=0))
    second = sample(prompts[2:], stream(13, global_rows=4, offset=2))
    assert torch.equal(torch.cat([first.tokens, second.tokens]), whole.tokens)
    close(torch.cat([first.logp_guided, second.logp_guided]), whole.logp_guided, atol=1e-5)
    # Without the global view the second half would reuse the first rows' noise and draw other tokens.
    unaware = sample(prompts[2:], stream(13))
    assert not torch.equal(unaware.tokens, whole.tokens[2:])


# --------------------------------------------------------------------------- text sampling


def test_sample_text_pads_after_eos_and_stops_when_every_row_has_ended(sharp_policy):
    """A free run (no EOS id) shows each row's draws; with one of row 0's tokens as EOS, row 0 ends there (EOS
    kept, then pad, masked, log-prob and entropy 0) and row 1, which never draws it, runs on unchanged. The
    loop stops once every row has ended: row 0 alone stops at its EOS."""
    policy, steps, pad = sharp_policy, 8, sharp_policy.pad_id
    ids, mask = policy.encode([policy.chat(p) for p in (SHORT, LONG)])
    model = policy.model
    free = janus_ops.sample_text(model, ids, mask, steps, -1, pad, 0.9, noise=stream(3))
    assert free.tokens.shape == (2, steps) and bool(free.mask.all())
    eos = int(free.tokens[0, 2])
    assert eos not in free.tokens[0, :2].tolist() and eos not in free.tokens[1].tolist() and eos != pad

    out = janus_ops.sample_text(model, ids, mask, steps, eos, pad, 0.9, noise=stream(3))
    live = torch.tensor([[True] * 3 + [False] * (steps - 3), [True] * steps])
    assert torch.equal(out.mask, live)
    assert torch.equal(out.tokens, torch.where(live, free.tokens, pad))
    close(out.logp, torch.where(live, free.logp, 0.0), atol=1e-5)
    close(out.entropy, torch.where(live, free.entropy, 0.0), atol=1e-5)
    # teacher forcing at the same temperature gives the sampled log-probs, 0 off the mask
    close(janus_ops.text_logprobs(model, ids, mask, out.tokens, out.mask, 0.9), out.logp, atol=1e-4)

    noise = stream(3, global_rows=2)  # row 0's draws of the batch
    alone = janus_ops.sample_text(model, ids[:1], mask[:1], steps, eos, pad, 0.9, noise=noise)
    assert alone.tokens.tolist() == [free.tokens[0, :3].tolist()] and bool(alone.mask.all())
