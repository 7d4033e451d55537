"""ReferencePolicy: a frozen, always-eval copy whose log-probs stay put while the policy trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modules.policy import JanusPolicy, SamplingConfig
from modules.reference import ReferencePolicy

PROMPTS = ["a red circle", "two blue squares left of a green star"]
TEMPLATE = "describe {prompt}"


def rollout(policy: JanusPolicy):
    policy.sampling = SamplingConfig(plan_max_tokens=6, cfg_scale=3.0, image_logprob="guided")
    plans = policy.sample_plans(PROMPTS, TEMPLATE, 2, policy.noise(0))
    context = policy.image_context([p for p in PROMPTS for _ in range(2)], plans.texts)
    tokens = policy.sample_images(context, policy.noise(1)).tokens
    return plans, context, tokens


def assert_frozen(ref: ReferencePolicy) -> None:
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(not m.training for m in ref.model.modules())


def test_from_policy_copies_the_weights_into_separate_tensors(tiny_policy):
    ref = ReferencePolicy.from_policy(tiny_policy)
    policy_weights = tiny_policy.model.state_dict()
    ref_weights = ref.model.state_dict()
    assert policy_weights.keys() == ref_weights.keys()
    for name, tensor in policy_weights.items():
        assert torch.equal(ref_weights[name], tensor), name
        assert ref_weights[name].data_ptr() != tensor.data_ptr(), name


def test_reference_is_frozen_and_stays_in_eval(tiny_policy):
    assert any(p.requires_grad for p in tiny_policy.model.parameters())
    ref = ReferencePolicy.from_policy(tiny_policy)
    assert_frozen(ref)
    ref.train()
    assert_frozen(ref)
    assert not ref.training
    # Lightning puts the root module in train mode, which reaches the reference as a child module.
    nn.ModuleDict({"policy": tiny_policy, "reference": ref}).train()
    assert_frozen(ref)
    assert tiny_policy.training
    assert any(p.requires_grad for p in tiny_policy.model.parameters())  # the policy is not frozen by it


def test_reference_logprobs_match_the_policy_until_the_policy_is_updated(sharp_policy):
    policy = sharp_policy
    plans, context, tokens = rollout(policy)
    ref = ReferencePolicy.from_policy(policy)

    ref_plan = ref.plan_logprobs(policy, plans)
    ref_image = ref.image_logprobs(policy, context, tokens)
    assert not ref_plan.requires_grad and not ref_image.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(ref_plan, policy.plan_logprobs(plans), atol=0, rtol=0)
        torch.testing.assert_close(ref_image, policy.image_logprobs(context, tokens), atol=0, rtol=0)

    # One SGD step of the policy on its own log-probs.
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    loss = -(policy.plan_logprobs(plans).sum() + policy.image_logprobs(context, tokens).sum())
    loss.backward()
    optimizer.step()

    with torch.no_grad():
        new_plan, new_image = policy.plan_logprobs(plans), policy.image_logprobs(context, tokens)
    assert (new_plan - ref_plan).abs().max() > 1e-3
    assert (new_image - ref_image).abs().max() > 1e-3
    torch.testing.assert_close(ref.plan_logprobs(policy, plans), ref_plan, atol=0, rtol=0)
    torch.testing.assert_close(ref.image_logprobs(policy, context, tokens), ref_image, atol=0, rtol=0)


def test_reference_loaded_from_a_path_matches_the_policy(tiny_janus_dir, tiny_policy):
    ref = ReferencePolicy(str(tiny_janus_dir))
    assert_frozen(ref)
    plans, context, tokens = rollout(tiny_policy)
    with torch.no_grad():
        torch.testing.assert_close(ref.plan_logprobs(tiny_policy, plans), tiny_policy.plan_logprobs(plans))
        torch.testing.assert_close(
            ref.image_logprobs(tiny_policy, context, tokens), tiny_policy.image_logprobs(context, tokens)
        )


def test_reference_dtype(tiny_janus_dir):
    ref = ReferencePolicy(str(tiny_janus_dir), dtype="bfloat16")
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="reference dtype"):
        ReferencePolicy(str(tiny_janus_dir), dtype="fp8")


def test_reference_without_a_model_refuses_to_score(sharp_policy):
    # ReferencePolicy() (no path, not built with from_policy) holds no model. Scoring must fail loudly:
    # silently scoring with the policy's own weights would make the KL term exactly zero.
    plans, context, tokens = rollout(sharp_policy)
    empty = ReferencePolicy()
    with pytest.raises((RuntimeError, ValueError), match="reference"):
        empty.plan_logprobs(sharp_policy, plans)
    with pytest.raises((RuntimeError, ValueError), match="reference"):
        empty.image_logprobs(sharp_policy, context, tokens)


def test_lora_reference_scores_the_shared_model_in_eval_mode():
    # With LoRA the reference is the policy's own model, which Lightning keeps in train mode between rollout
    # and update. The reference must still score without dropout, like a separate (always-eval) reference.
    from modules.lora import LoraSpec
    from modules.tiny import TinyJanusSpec

    policy = JanusPolicy(tiny=TinyJanusSpec(hidden_size=32, num_heads=2, image_size=32, patch_size=8), lora=LoraSpec())
    for layer in policy.model.model.language_model.layers:
        layer.self_attn.attention_dropout = 0.5
    ref = ReferencePolicy.from_policy(policy)
    context = policy.image_context(PROMPTS, None)
    tokens = torch.arange(32).reshape(2, 16) % policy.model.config.vq_config.num_embeddings
    policy.eval()
    expected = ref.image_logprobs(policy, context, tokens)
    policy.train()
    policy.model.model.vqmodel.eval()  # a submodule in its own mode keeps it
    torch.manual_seed(0)
    torch.testing.assert_close(ref.image_logprobs(policy, context, tokens), expected, atol=0, rtol=0)
    assert policy.model.training and policy.model.model.language_model.training
    assert not policy.model.model.vqmodel.training
