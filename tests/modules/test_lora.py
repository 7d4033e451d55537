"""LoRA: adapters off is the starting model, merging equals the adapted model, exports load in transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import JanusForConditionalGeneration

from modules import janus_ops
from modules.lora import LoraSpec, adapters_disabled, has_lora, merged_copy
from modules.policy import JanusPolicy
from modules.reference import ReferencePolicy
from modules.tiny import TinyJanusSpec

SPEC = TinyJanusSpec(hidden_size=32, num_heads=2, image_size=32, patch_size=8, vq_upsamples=1)


def lora_policy(**kwargs) -> JanusPolicy:
    policy = JanusPolicy(tiny=SPEC, lora=LoraSpec(r=4, alpha=8), **kwargs)
    for name, param in policy.model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (adapters are a no-op); make them matter
            param.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return policy


def image_logp(model, policy: JanusPolicy) -> torch.Tensor:
    context = policy.image_context(["a red circle", "two blue squares"], None)
    tokens = torch.arange(32).reshape(2, 16) % policy.model.config.vq_config.num_embeddings
    return janus_ops.image_logprobs(model, context.cond_ids, context.cond_mask, tokens)


def test_only_adapters_train():
    policy = lora_policy()
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert has_lora(policy.model)


def test_adapters_off_is_the_starting_model_and_the_reference():
    base = JanusPolicy(tiny=SPEC)
    policy = lora_policy()
    with adapters_disabled(policy.model):
        off = image_logp(policy.model, policy)
    assert torch.equal(off, image_logp(base.model, base))  # the base layers alone: bit-identical
    adapted = image_logp(policy.model, policy)
    assert (adapted - off).abs().max() > 1e-3  # the adapters change the model
    reference = ReferencePolicy.from_policy(policy)
    assert reference.model is None and not list(reference.parameters())  # no second copy
    context = policy.image_context(["a red circle", "two blue squares"], None)
    tokens = torch.arange(32).reshape(2, 16) % policy.model.config.vq_config.num_embeddings
    assert torch.equal(reference.image_logprobs(policy, context, tokens), off)
    torch.testing.assert_close(image_logp(policy.model, policy), adapted)  # adapters back on afterwards


def test_merged_export_equals_the_adapted_model_and_loads_in_plain_transformers(tmp_path):
    policy = lora_policy()
    adapted = image_logp(policy.model, policy)
    exported = policy.export_model()
    assert not has_lora(exported) and has_lora(policy.model)  # a merged copy; training continues
    torch.testing.assert_close(image_logp(exported, policy), adapted, atol=1e-5, rtol=0)
    exported.save_pretrained(tmp_path / "policy")
    policy.processor.save_pretrained(tmp_path / "policy")
    code = (
        "import sys, torch\n"
        "from transformers import JanusForConditionalGeneration\n"
        "m = JanusForConditionalGeneration.from_pretrained(sys.argv[1])\n"
        "assert not any('lora' in n for n, _ in m.named_parameters())\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "policy")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == sum(p.numel() for p in exported.parameters())
    reloaded = JanusForConditionalGeneration.from_pretrained(tmp_path / "policy")
    torch.testing.assert_close(image_logp(reloaded, policy), adapted, atol=1e-5, rtol=0)


def test_merged_copy_removes_every_adapter():
    policy = lora_policy()
    merged = merged_copy(policy.model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("bad", [dict(r=0), dict(alpha=0), dict(dropout=1.0), dict(target_modules=[])])
def test_lora_spec_validation(bad):
    with pytest.raises(ValueError, match="lora"):
        LoraSpec(**bad)


def test_targets_that_match_nothing_are_refused():
    with pytest.raises(ValueError, match="matched no module"):
        JanusPolicy(tiny=SPEC, lora=LoraSpec(target_modules=["no_such_proj"]))


def test_state_dict_merge_equals_merging_the_modules():
    from modules.lora import merge_lora_state_dict

    policy = lora_policy()
    merged = merge_lora_state_dict(dict(policy.model.state_dict()), policy.lora)
    expected = merged_copy(policy.model).state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0)


def test_state_dict_merge_of_bf16_weights_rounds_once():
    from modules.lora import merge_lora_state_dict

    g = torch.Generator().manual_seed(0)
    weight, lora_a, lora_b = (torch.randn(*shape, generator=g).bfloat16() for shape in ((64, 48), (3, 48), (64, 3)))
    state = {"q.base_layer.weight": weight, "q.lora_A.default.weight": lora_a, "q.lora_B.default.weight": lora_b}
    spec = LoraSpec(r=3, alpha=1)  # scaling 1/3: not exact in bf16
    merged = merge_lora_state_dict(state, spec)["q.weight"]
    exact = weight.float() + (lora_b.float() @ lora_a.float()) / 3
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, exact.bfloat16())  # the nearest bf16 of W + alpha / r * B @ A
