"""FSDP2 helpers: the rollout gathers each shard once, not once per decode step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

NUM_TOKENS = 16


def _count_gathers(rank: int, world: int, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from bicot.parallel import fsdp_units, gathered, parallelize
    from modules import janus_ops
    from modules.tiny import TinyJanusSpec, build_tiny_janus

    model, processor = build_tiny_janus(TinyJanusSpec(hidden_size=32, num_heads=2, image_size=32, patch_size=8))
    parallelize(model, init_device_mesh("cpu", (world,)))
    ids = torch.tensor([[1, 7, 11, 61, 74, 8, 11, processor.tokenizer.convert_tokens_to_ids("<begin_of_image>")]])
    mask = torch.ones_like(ids)
    calls = {"n": 0}
    # FSDP2 all-gathers through one of these, depending on the torch version.
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]
    originals = {n: getattr(dist, n) for n in names}

    def counting(original):
        def call(*args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)

        return call

    for n in names:
        setattr(dist, n, counting(originals[n]))
    counts = {}
    for name, ctx in (("gathered", gathered), ("plain", None)):
        calls["n"] = 0
        noise = janus_ops.RowNoise(torch.Generator().manual_seed(0))
        if ctx is None:
            out = janus_ops.sample_image_tokens(model, ids, mask, NUM_TOKENS, ids.clone(), 3.0, noise=noise)
        else:
            with ctx(model):
                out = janus_ops.sample_image_tokens(model, ids, mask, NUM_TOKENS, ids.clone(), 3.0, noise=noise)
        counts[name] = (calls["n"], out.tokens.tolist())
    for n in names:
        setattr(dist, n, originals[n])
    results[rank] = (counts, len(fsdp_units(model)))


@pytest.mark.slow
def test_rollout_gathers_each_unit_once_per_rollout():
    from gloo import run_ranks

    world = 2
    results = run_ranks(_count_gathers, world)
    for rank in range(world):
        counts, units = results[rank]
        assert 1 <= counts["gathered"][0] <= units  # one all-gather per FSDP unit for the whole rollout
        assert counts["plain"][0] >= NUM_TOKENS * (units - 1)  # without it: every layer, every step
        assert counts["gathered"][1] == counts["plain"][1]  # same samples either way


def _layer_calls(config) -> tuple[int, torch.Tensor]:
    """Forward calls of decoder layer 0 during one training forward + backward, and the gradient."""
    from bicot.parallel import parallelize
    from modules import janus_ops
    from modules.tiny import TinyJanusSpec, build_tiny_janus

    model, _ = build_tiny_janus(TinyJanusSpec(hidden_size=32, num_heads=2, image_size=32, patch_size=8))
    model.requires_grad_(False)
    model.model.language_model.requires_grad_(True)
    parallelize(model, None, config)
    model.train()
    calls = []
    mlp = model.model.language_model.layers[0].mlp
    forward = mlp.forward

    def counting(*args, **kwargs):  # forward hooks do not fire in the recompute; a wrapped forward does
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counting
    ids = torch.tensor([[1, 7, 11, 61, 74, 8, 11, 5]])
    logp = janus_ops.image_logprobs(model, ids, torch.ones_like(ids), torch.arange(16)[None])
    logp.sum().backward()
    return len(calls), model.model.language_model.layers[0].mlp.up_proj.weight.grad.clone()


def test_activation_checkpointing_recomputes_layers_and_keeps_gradients():
    from bicot.parallel import ParallelConfig

    plain_calls, plain_grad = _layer_calls(ParallelConfig())
    ckpt_calls, ckpt_grad = _layer_calls(ParallelConfig(activation_checkpointing=True))
    assert plain_calls == 1
    assert ckpt_calls == 2  # the backward pass ran the layer again instead of storing its activations
    torch.testing.assert_close(ckpt_grad, plain_grad)


@pytest.mark.parametrize(
    ("field", "value"), [("param_dtype", "bf16"), ("reduce_dtype", "double"), ("reference", "gpu")]
)
def test_parallel_config_validation_names_the_field(field, value):
    from bicot.parallel import ParallelConfig

    with pytest.raises(ValueError, match=field):
        ParallelConfig(**{field: value})



def _mp_policies(rank: int, world: int, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from bicot.parallel import ParallelConfig, fsdp_units, parallelize
    from modules.tiny import TinyJanusSpec, build_tiny_janus

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, config in (("default", ParallelConfig()), ("bf16", ParallelConfig(param_dtype="bfloat16"))):
        model, _ = build_tiny_janus(TinyJanusSpec(hidden_size=32, num_heads=2, image_size=32, patch_size=8))
        parallelize(model, mesh, config)
        policies = {u._get_fsdp_state()._mp_policy for u in fsdp_units(model)}
        out[name] = {(p.param_dtype, p.reduce_dtype) for p in policies}
    results[rank] = out


@pytest.mark.slow
def test_reduce_dtype_applies_with_or_without_param_dtype():
    # parallel.reduce_dtype is the gradient reduction dtype whether or not param_dtype casts the gathers
    # (bf16 weights with param_dtype: null still reduce in float32 by default).
    from gloo import run_ranks

    out = run_ranks(_mp_policies, 1)[0]
    assert out["default"] == {(None, torch.float32)}
    assert out["bf16"] == {(torch.bfloat16, torch.float32)}
