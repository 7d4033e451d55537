"""The static-cache rollout engine against the eager loop: same tokens, same log-probs, buckets, policy wiring."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from fp8_values import fp8_exact
from standin_graphs import StandInGraphs
from torch import nn

import modules.engine as engine_module
from bicot.loop import RowPlacement, rollout_phase
from datamodules.records import PromptRecord
from modules import decode_attention, decode_linear, fp8, janus_ops
from modules.decode_step import StepParts, _DrawnNoise, decode_layer
from modules.engine import RolloutEngine, keeps_buffers, window_for, window_ladder
from modules.engine_weights import packable, quantizable
from modules.lora import adapters_disabled
from modules.policy import JanusPolicy, SamplingConfig

PROMPTS = ["a red circle", "two blue squares left of a green star under the sun near the ocean", "a sun"]
TEMPLATE = "describe {prompt} with every object and colour"
FP32_ATOL = 1e-4  # per-token log-prob tolerance in float32 (measured differences are ~3e-6)
FP8_ATOL = 0.5  # weights="fp8" (on top of bf16): measured 0.17 on this sharp model (test_fp8_weights_...)
BF16_ATOL = 0.1  # in bfloat16 the eager loop itself is ~0.06 from the teacher-forced pass on this sharp model
# attention="triton" on CPU tensors: Triton's interpreter (on a GPU machine the gpu tests below run it compiled)
TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(not decode_attention.interpreted(), reason="needs triton with TRITON_INTERPRET=1"),
)


def stream(seed: int, global_rows: int | None = None, offset: int = 0) -> janus_ops.RowNoise:
    return janus_ops.RowNoise(torch.Generator().manual_seed(seed), global_rows, offset)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = FP32_ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def images(sample_fn, policy, ctx, seed, cfg=3.0, temperature=1.0, top_k=0, top_p=1.0, uncond=True, n=None):
    return sample_fn(
        policy.model, ctx.cond_ids, ctx.cond_mask, n or policy.num_image_tokens, ctx.uncond_ids if uncond else None,
        cfg, temperature, top_k, top_p, stream(seed),
    )


def randomize_lora(policy: JanusPolicy, seed: int = 0) -> None:
    """peft starts LoRA's B at zero (a no-op adapter): a random B makes the adapters matter. (peft draws A from the
    global RNG, which ``tests/conftest.py`` seeds before every test.)"""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


def plans(sample_fn, policy, ids, mask, seed, max_tokens=12, temperature=1.0, top_k=0, top_p=1.0):
    tok = policy.tokenizer
    return sample_fn(policy.model, ids, mask, max_tokens, tok.eos_token_id, policy.pad_id, temperature, top_k, top_p,
                     stream(seed))


def plan_contexts(policy, prompts=PROMPTS):
    return policy.encode([policy.chat(TEMPLATE.replace("{prompt}", p)) for p in prompts])


# --------------------------------------------------------------------------- small pieces


def test_window_ladder_doubles_from_the_chunk_and_ends_at_the_capacity():
    assert window_ladder(128, 64) == [64, 128]
    assert window_ladder(704, 128) == [128, 256, 512, 704]
    assert window_ladder(64, 64) == [64]
    ladder = window_ladder(704, 128)
    assert [window_for(f, ladder) for f in (1, 128, 129, 300, 513, 704)] == [128, 128, 256, 512, 704, 704]


def test_linear_window_ladder_steps_by_the_chunk():
    assert window_ladder(704, 128, linear=True) == [128, 256, 384, 512, 640, 704]
    assert window_ladder(128, 128, linear=True) == [128]
    ladder = window_ladder(704, 128, linear=True)
    assert [window_for(f, ladder) for f in (1, 129, 300, 513, 641)] == [128, 256, 384, 640, 704]


def test_engine_ladder_is_linear_for_plain_and_captured_steps_and_doubling_when_compiled():
    cpu = torch.device("cpu")
    assert RolloutEngine().ladder(320, cpu) == [64, 128, 192, 256, 320]  # auto: off on CPU
    assert RolloutEngine(compile="cudagraphs").ladder(320, cpu) == [64, 128, 192, 256, 320]
    assert RolloutEngine(compile="fused").ladder(320, cpu) == [64, 128, 192, 256, 320]
    assert RolloutEngine(compile="default").ladder(320, cpu) == [64, 128, 256, 320]


def test_auto_is_fused_on_cuda_where_inductor_compiles_else_cudagraphs(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    asked = []
    monkeypatch.setattr(engine_module, "inductor_compiles", lambda device: asked.append(device) or True)
    engine = RolloutEngine()
    assert engine.mode(cpu) == "off" and not asked  # CPU never asks
    assert engine.mode(cuda) == "fused" and engine.mode(cuda) == "fused" and asked == [cuda]  # asked once
    assert engine.captures(cuda) and engine.ladder(320, cuda) == [128, 256, 320]
    monkeypatch.setattr(engine_module, "inductor_compiles", lambda device: False)
    assert RolloutEngine().mode(cuda) == "cudagraphs"
    assert RolloutEngine(compile="cudagraphs").mode(cuda) == "cudagraphs"  # an explicit mode is never probed


def test_auto_attention_is_triton_on_ampere_or_later_where_triton_imports_else_matmul(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(engine_module, "inductor_compiles", lambda device: True)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    engine = RolloutEngine(attention="auto")
    assert engine.attention_on(cpu) == "matmul" and engine.ladder(320, cpu) == [64, 128, 192, 256, 320]
    assert engine.attention_on(cuda) == "triton" and engine.ladder(320, cuda) == [320]  # one window
    assert RolloutEngine(attention="sdpa").attention_on(cuda) == "sdpa"  # an explicit choice is itself
    capability[0] = (7, 5)  # Turing: the pipelined loop's asynchronous copies need Ampere
    assert engine.attention_on(cuda) == "matmul"
    capability[0] = (8, 0)
    monkeypatch.setattr(decode_attention, "triton", None)
    assert engine.attention_on(cuda) == "matmul" and engine.ladder(320, cuda) == [128, 256, 320]
    with pytest.raises(ValueError, match="engine attention must be one of .*'auto'"):
        RolloutEngine(attention="flash")


def no_cxx_compiler(monkeypatch) -> None:
    """Inductor's CPU backend without a working C++ compiler, as on a machine that lacks one."""
    torch._dynamo.reset()  # compiled code cached by earlier tests would not ask for the compiler
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)


def test_inductor_probe_compiles_here_and_warns_with_the_error_where_it_cannot(monkeypatch):
    assert engine_module.inductor_compiles(torch.device("cpu"))  # the real probe: inductor's C++ backend
    no_cxx_compiler(monkeypatch)
    with pytest.warns(UserWarning, match=r"cannot compile on cpu \(InductorError: InvalidCxxCompiler: No working C"):
        assert not engine_module.inductor_compiles(torch.device("cpu"))
    engine = RolloutEngine()
    with pytest.warns(UserWarning, match="using 'cudagraphs'"):
        # on this CPU-only machine the probe fails on the CUDA device itself, and auto still has an answer
        assert engine.mode(torch.device("cuda")) == "cudagraphs"
    assert engine.stats.compile_s > 0  # the probe's time is compile time


@pytest.mark.slow
def test_a_step_that_does_not_compile_says_which_modes_do_not_compile(sharp_policy, monkeypatch):
    no_cxx_compiler(monkeypatch)
    ctx = sharp_policy.image_context(PROMPTS, None)
    with pytest.raises(RuntimeError, match=r"does not compile here \(engine_compile 'fused'\): InductorError") as err:
        images(RolloutEngine(compile="fused").sample_image_tokens, sharp_policy, ctx, 0, n=4)
    assert "'cudagraphs' (CUDA) or 'off'" in str(err.value)
    assert isinstance(err.value.__cause__, torch._inductor.exc.InductorError)
    out = images(RolloutEngine(compile="off").sample_image_tokens, sharp_policy, ctx, 0, n=4)  # as the message says
    assert out.tokens.shape == (len(PROMPTS), 4)


def test_drawn_noise_is_row_noise_bit_for_bit():
    engine = RolloutEngine()
    for global_rows, offset in ((None, 0), (7, 3)):
        expected = stream(5, global_rows, offset).gumbel(4, 11, torch.device("cpu"))
        noise = stream(5, global_rows, offset)
        full, view = engine.noise_buffer(noise, 4, 11, torch.device("cpu"), greedy=False)
        engine.draw(noise, full)
        assert torch.equal(_DrawnNoise(view).gumbel(4, 11, view.device), expected)


def test_noise_rows_beyond_the_global_batch_are_refused():
    with pytest.raises(ValueError, match="exceed the global batch"):
        RolloutEngine().noise_buffer(stream(0, 4, 3), 2, 11, torch.device("cpu"), greedy=False)


def test_unknown_compile_mode_and_engine_are_refused():
    with pytest.raises(ValueError, match="compile"):
        RolloutEngine(compile="fast")
    with pytest.raises(ValueError, match="attention must be one of"):
        RolloutEngine(attention="flash")
    with pytest.raises(ValueError, match="sampling.engine"):
        SamplingConfig(engine="vllm")


# --------------------------------------------------------------------------- same samples as the eager loop


def test_greedy_decoding_gives_the_eager_tokens(sharp_policy):
    engine = RolloutEngine()
    ctx = sharp_policy.image_context(PROMPTS, None)
    a = images(janus_ops.sample_image_tokens, sharp_policy, ctx, 0, temperature=0.0)
    b = images(engine.sample_image_tokens, sharp_policy, ctx, 0, temperature=0.0)
    assert torch.equal(a.tokens, b.tokens)
    close(b.logp_guided, a.logp_guided)
    ids, mask = plan_contexts(sharp_policy)
    a, b = (plans(f, sharp_policy, ids, mask, 0, temperature=0.0) for f in (janus_ops.sample_text, engine.sample_text))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_sampling_with_the_same_noise_gives_the_eager_tokens_and_logprobs(sharp_policy, temperature, top_k, top_p):
    engine = RolloutEngine()
    ctx = sharp_policy.image_context(PROMPTS, None)
    a = images(janus_ops.sample_image_tokens, sharp_policy, ctx, 1, 3.0, temperature, top_k, top_p)
    b = images(engine.sample_image_tokens, sharp_policy, ctx, 1, 3.0, temperature, top_k, top_p)
    assert torch.equal(a.tokens, b.tokens)
    close(b.logp_guided, a.logp_guided)
    close(b.logp_conditional, a.logp_conditional)
    close(b.entropy, a.entropy)
    ids, mask = plan_contexts(sharp_policy)
    a = plans(janus_ops.sample_text, sharp_policy, ids, mask, 2, 12, temperature, top_k, top_p)
    b = plans(engine.sample_text, sharp_policy, ids, mask, 2, 12, temperature, top_k, top_p)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    close(b.logp, a.logp)
    close(b.entropy, a.entropy)
    assert (b.entropy[~b.mask] == 0).all() and (b.entropy[b.mask] > 0).all()


@pytest.mark.parametrize("attention", ["reduce", "sdpa", TRITON])
def test_each_attention_choice_samples_the_eager_tokens_and_logprobs(sharp_policy, attention):
    engine = RolloutEngine(attention=attention)
    ctx = sharp_policy.image_context(PROMPTS, None)
    a = images(janus_ops.sample_image_tokens, sharp_policy, ctx, 6, 3.0)
    b = images(engine.sample_image_tokens, sharp_policy, ctx, 6, 3.0)
    assert torch.equal(a.tokens, b.tokens)
    close(b.logp_guided, a.logp_guided)
    ids, mask = plan_contexts(sharp_policy)
    a = plans(janus_ops.sample_text, sharp_policy, ids, mask, 7, 12)
    b = plans(engine.sample_text, sharp_policy, ids, mask, 7, 12)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    close(b.logp, a.logp)


def test_cfg_scale_one_is_conditional_sampling(sharp_policy):
    engine = RolloutEngine()
    ctx = sharp_policy.image_context(PROMPTS, None)
    scale_one = images(engine.sample_image_tokens, sharp_policy, ctx, 3, cfg=1.0)
    conditional = images(engine.sample_image_tokens, sharp_policy, ctx, 3, cfg=1.0, uncond=False)
    eager = images(janus_ops.sample_image_tokens, sharp_policy, ctx, 3, cfg=1.0, uncond=False)
    assert torch.equal(scale_one.tokens, conditional.tokens) and torch.equal(scale_one.tokens, eager.tokens)
    close(scale_one.logp_guided, scale_one.logp_conditional, atol=0)


def test_left_padded_mixed_lengths_sample_as_each_row_alone(sharp_policy):
    engine = RolloutEngine()
    ctx = sharp_policy.image_context(PROMPTS, None)
    assert len(set(ctx.cond_mask.sum(1).tolist())) == 3  # three different lengths, two rows padded
    batch = images(engine.sample_image_tokens, sharp_policy, ctx, 4)
    ids, mask = plan_contexts(sharp_policy)
    plan_batch = plans(engine.sample_text, sharp_policy, ids, mask, 5)
    for row, prompt in enumerate(PROMPTS):
        one = sharp_policy.image_context([prompt], None)
        alone = engine.sample_image_tokens(sharp_policy.model, one.cond_ids, one.cond_mask, sharp_policy.num_image_tokens,
                                           one.uncond_ids, 3.0, noise=stream(4, len(PROMPTS), row))
        assert torch.equal(alone.tokens[0], batch.tokens[row])
        close(alone.logp_guided[0], batch.logp_guided[row])
        one_ids, one_mask = plan_contexts(sharp_policy, [prompt])
        tok = sharp_policy.tokenizer
        plan = engine.sample_text(sharp_policy.model, one_ids, one_mask, 12, tok.eos_token_id, sharp_policy.pad_id,
                                  noise=stream(5, len(PROMPTS), row))
        width = plan.tokens.shape[1]
        assert torch.equal(plan.tokens[0], plan_batch.tokens[row, :width])
        assert not plan_batch.mask[row, width:].any()


@pytest.mark.parametrize("guided", [False, True])
def test_image_logprobs_equal_the_teacher_forced_pass(sharp_policy, guided):
    ctx = sharp_policy.image_context(PROMPTS, None)
    out = images(RolloutEngine().sample_image_tokens, sharp_policy, ctx, 6)
    forced = janus_ops.image_logprobs(sharp_policy.model, ctx.cond_ids, ctx.cond_mask, out.tokens, 1.0,
                                      ctx.uncond_ids if guided else None, 3.0)
    close(out.logp_guided if guided else out.logp_conditional, forced.detach())


def test_plan_logprobs_equal_the_teacher_forced_pass(sharp_policy):
    ids, mask = plan_contexts(sharp_policy)
    out = plans(RolloutEngine().sample_text, sharp_policy, ids, mask, 7, temperature=0.8)
    forced = janus_ops.text_logprobs(sharp_policy.model, ids, mask, out.tokens, out.mask, 0.8)
    close(out.logp, forced.detach())


def test_bfloat16_logprobs_stay_within_the_stated_tolerance(tiny_janus_dir):
    policy = JanusPolicy(str(tiny_janus_dir), dtype="bfloat16")
    ctx = policy.image_context(PROMPTS, None)
    out = images(RolloutEngine().sample_image_tokens, policy, ctx, 8)
    forced = janus_ops.image_logprobs(policy.model, ctx.cond_ids, ctx.cond_mask, out.tokens, 1.0, ctx.uncond_ids, 3.0)
    close(out.logp_guided, forced.detach(), atol=BF16_ATOL)


@pytest.mark.parametrize("attention", ["matmul", TRITON])
def test_float32_weights_under_bfloat16_autocast_as_in_mixed_precision_training(sharp_policy, attention):
    ctx = sharp_policy.image_context(PROMPTS, None)
    ids, mask = plan_contexts(sharp_policy)
    engine = RolloutEngine(attention=attention)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Lightning's bf16-mixed wraps training_step like this
        out = images(engine.sample_image_tokens, sharp_policy, ctx, 10)
        forced = janus_ops.image_logprobs(sharp_policy.model, ctx.cond_ids, ctx.cond_mask, out.tokens, 1.0, None, 3.0)
        plan = plans(engine.sample_text, sharp_policy, ids, mask, 10)
        forced_plan = janus_ops.text_logprobs(sharp_policy.model, ids, mask, plan.tokens, plan.mask)
    close(out.logp_conditional, forced.detach(), atol=BF16_ATOL)
    close(plan.logp, forced_plan.detach(), atol=BF16_ATOL)
    assert all(t.dtype == torch.bfloat16 for state in engine._buffers.values() for t in state.get("kv", []))


@pytest.mark.parametrize("lora", [False, True])
def test_autocast_weight_copy_gives_autocasts_own_results_and_follows_updates(tiny_janus_dir, lora):
    from modules.lora import LoraSpec

    policy = JanusPolicy(str(tiny_janus_dir), lora=LoraSpec(r=2) if lora else None)
    ctx = policy.image_context(PROMPTS, None)
    ids, mask = plan_contexts(policy)
    copied, casting = RolloutEngine(), RolloutEngine(weight_copy=False)
    weights = {n: p for n, p in policy.model.named_parameters()}

    def both(seed):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [
                (images(e.sample_image_tokens, policy, ctx, seed, n=10), plans(e.sample_text, policy, ids, mask, seed))
                for e in (copied, casting)
            ]

    for seed in (0, 1):
        (a_img, a_plan), (b_img, b_plan) = both(seed)
        assert torch.equal(a_img.tokens, b_img.tokens) and torch.equal(a_img.logp_guided, b_img.logp_guided)
        assert torch.equal(a_plan.tokens, b_plan.tokens) and torch.equal(a_plan.logp, b_plan.logp)
        with torch.no_grad():  # an optimizer step in place: the next call's copy must follow it
            for name, param in policy.model.named_parameters():
                if "lora_B" in name or (not lora and "proj" in name):
                    param.add_(0.3 * torch.randn_like(param))
    copies = [t for state in copied._buffers.values() for t in state.get("copies", [])]
    assert copies and all(t.dtype == torch.bfloat16 for t in copies)
    assert not any("copies" in state for state in casting._buffers.values())
    # the modules hold their own fp32 parameters again
    assert {n: p for n, p in policy.model.named_parameters()} == weights
    assert all(p.dtype == torch.float32 and isinstance(p, nn.Parameter) for p in weights.values())


def test_packed_projections_sample_the_eager_tokens_and_logprobs(sharp_policy):
    engine = RolloutEngine(pack=True)
    ctx = sharp_policy.image_context(PROMPTS, None)
    a = images(janus_ops.sample_image_tokens, sharp_policy, ctx, 11)
    b = images(engine.sample_image_tokens, sharp_policy, ctx, 11)
    assert torch.equal(a.tokens, b.tokens)
    close(b.logp_guided, a.logp_guided)
    ids, mask = plan_contexts(sharp_policy)
    a = plans(janus_ops.sample_text, sharp_policy, ids, mask, 12)
    b = plans(engine.sample_text, sharp_policy, ids, mask, 12)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    close(b.logp, a.logp)
    (entry,) = [e for e in engine._buffers.values() if "packed" in e and "copies" in e]
    cfg = sharp_policy.model.config.text_config
    assert len(entry["packed"]) == cfg.num_hidden_layers
    attn = sharp_policy.model.model.language_model.layers[0].self_attn
    assert attn.k_proj.out_features < attn.q_proj.out_features  # grouped KV heads: an uneven split
    width = attn.q_proj.out_features + 2 * attn.k_proj.out_features
    for qkv, gate_up in entry["packed"]:  # without autocast: a packed copy of the fp32 weights
        assert qkv.shape == (width, cfg.hidden_size) and qkv.dtype == torch.float32
        assert gate_up.shape == (2 * cfg.intermediate_size, cfg.hidden_size)


def storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_packed_weights_hold_the_autocast_copies_at_no_extra_memory_and_follow_updates(sharp_policy):
    ctx = sharp_policy.image_context(PROMPTS, None)
    packed, separate = RolloutEngine(pack=True), RolloutEngine()
    head = sharp_policy.model.model.language_model.layers[0].self_attn.q_proj.weight
    original = head.detach().clone()

    def rollout(engine):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = images(engine.sample_image_tokens, sharp_policy, ctx, 14, n=10)
            forced = janus_ops.image_logprobs(
                sharp_policy.model, ctx.cond_ids, ctx.cond_mask, out.tokens, 1.0, None, 3.0
            )
        close(out.logp_conditional, forced.detach(), atol=BF16_ATOL)  # the live weights' log-probs
        return out

    try:
        for engine in (packed, separate):
            rollout(engine)
        with torch.no_grad():
            head.copy_(torch.randn_like(head) * head.std() * 4)  # in place, as Adam does
        rollout(packed)  # the packed bf16 copy was refreshed from the new fp32 weights
    finally:
        with torch.no_grad():
            head.copy_(original)
    weights = {}
    for name, engine in (("packed", packed), ("separate", separate)):
        (entry,) = [e for e in engine._buffers.values() if "copies" in e]
        weights[name] = entry
        assert all(t.dtype == torch.bfloat16 for t in entry["copies"])
    assert all(qkv.dtype == torch.bfloat16 for qkv, _ in weights["packed"]["packed"])
    assert weights["packed"]["pack_views"] == []  # every packed weight is an autocast copy: nothing copied twice
    assert storage_bytes(weights["packed"]["copies"]) == storage_bytes(weights["separate"]["copies"])


class LaunchSpy:
    """Stands in for a Triton kernel (``decode_attention._partial`` by default fields: its block, stages, warps, loop
    and which kernel merges the splits): records each launch's ``fields``, then launches."""

    def __init__(self, kernel, fields=("BLOCK", "STAGES", "num_warps", "LANES", "LAST")):
        self.kernel, self.fields, self.launches = kernel, fields, set()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.add(tuple(kwargs[field] for field in self.fields))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.slow
@pytest.mark.parametrize(("compile", "attention", "last"), [("off", "matmul", False), ("fused", "triton", True)])
@pytest.mark.skipif(not decode_attention.interpreted(), reason="needs triton with TRITON_INTERPRET=1")
def test_triton_projections_sample_the_eager_tokens_and_logprobs(sharp_policy, monkeypatch, compile, attention, last):
    """``linear="triton"``: the packed and the o/down projections in :mod:`modules.decode_linear`'s kernels, residual
    adds and silu inside them (plain calls, and inside the compiled layer with the Triton attention), the splits
    added up by a second kernel or (``_l``) by each tile's last program; the launch's rows per program and its
    fp8 widening (no fp8 here: ``cast`` changes nothing) reach the kernels too."""
    spy = LaunchSpy(decode_linear._linear, ("GATED", "RESIDUAL", "BLOCK_N", "STAGES", "SPLIT", "LAST", "BLOCK_M",
                                            "CAST"))
    monkeypatch.setattr(decode_linear, "_linear", spy)
    # two splits of the inner dimension; 32 rows a program, where the rows' own power of two is 16
    launch = decode_linear.LinearLaunch(16, 16, 2, 4, 2, last, cast=last, block_m=32)
    engine, _, _, _ = fused_like_eager(sharp_policy, 8, compile=compile, attention=attention, pack=True,
                                       linear=launch.name)
    plans_like_eager(engine, sharp_policy, 4)
    # q/k/v plain, o and down with the residual, gate/up gated: every projection of the layer, at that launch
    at = (16, 2, 2, last, 32, last)
    assert spy.launches == {(False, False, *at), (False, True, *at), (True, False, *at)}
    assert pickle.loads(pickle.dumps(engine)).linear_launch == launch


@pytest.mark.skipif(not decode_attention.interpreted(), reason="needs triton with TRITON_INTERPRET=1")
def test_triton_projections_leave_more_rows_than_one_block_to_cublas(sharp_policy, monkeypatch):
    """Past ``decode_linear.MAX_ROWS`` rows the kernels would read the weights once per block of rows: the step
    uses ``F.linear`` there (6 rows here, against a limit lowered to 4)."""
    from modules import decode_step

    assert decode_step.PROJECT_MAX_ROWS == decode_linear.MAX_ROWS
    spy = LaunchSpy(decode_linear._linear, ("GATED",))
    monkeypatch.setattr(decode_linear, "_linear", spy)
    monkeypatch.setattr(decode_step, "PROJECT_MAX_ROWS", 4)
    ctx = sharp_policy.image_context(PROMPTS, None)  # 3 prompts with CFG: 6 rows
    a = images(janus_ops.sample_image_tokens, sharp_policy, ctx, 3, n=4)
    b = images(RolloutEngine(pack=True, linear="triton").sample_image_tokens, sharp_policy, ctx, 3, n=4)
    assert torch.equal(a.tokens, b.tokens) and not spy.launches
    monkeypatch.setattr(decode_step, "PROJECT_MAX_ROWS", 64)
    images(RolloutEngine(pack=True, linear="triton").sample_image_tokens, sharp_policy, ctx, 3, n=2)
    assert spy.launches == {(False,), (True,)}  # the same rows under the real limit: the kernels


@pytest.mark.slow
@pytest.mark.skipif(not decode_attention.interpreted(), reason="needs triton with TRITON_INTERPRET=1")
def test_triton_projections_under_autocast_read_the_bf16_copies_and_leave_lora_to_its_modules(tiny_janus_dir):
    """Under autocast the kernels read the engine's bf16 copies (packed) and give the teacher-forced log-probs of
    the live weights; a LoRA-wrapped projection keeps its module's call (its layer's q/k/v are not packed)."""
    from modules.lora import LoraSpec

    policy = JanusPolicy(str(tiny_janus_dir), lora=LoraSpec(r=2, target_modules=["q_proj", "o_proj"]))
    ctx = policy.image_context(PROMPTS, None)
    engine = RolloutEngine(pack=True, linear="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = images(engine.sample_image_tokens, policy, ctx, 14, n=8)
        forced = janus_ops.image_logprobs(policy.model, ctx.cond_ids, ctx.cond_mask, out.tokens, 1.0, None, 3.0)
    close(out.logp_conditional, forced.detach(), atol=BF16_ATOL)
    a = images(janus_ops.sample_image_tokens, policy, ctx, 15, n=8)
    b = images(engine.sample_image_tokens, policy, ctx, 15, n=8)  # float32: the eager loop's tokens
    assert torch.equal(a.tokens, b.tokens)
    close(b.logp_guided, a.logp_guided)


def test_triton_projections_are_checked_when_the_engine_is_made_and_bound(sharp_policy, monkeypatch):
    if not decode_attention.available():
        pytest.skip("needs the triton package")
    with pytest.raises(ValueError, match="needs pack=True"):
        RolloutEngine(linear="triton")
    with pytest.raises(ValueError, match="needs pack=True .* and weight_copy=True"):
        RolloutEngine(linear="triton", pack=True, weight_copy=False)
    with pytest.raises(ValueError, match="engine linear must be torch, triton or a launch name .*got 'cublas'"):
        RolloutEngine(linear="cublas", pack=True)
    with pytest.raises(ValueError, match="block_n must be a power of 2"):
        RolloutEngine(linear="triton_lin_n8_k64_s0_w4_p3", pack=True)
    assert RolloutEngine(linear="triton", pack=True).linear_launch is None  # decode_linear's defaults
    monkeypatch.setattr(sharp_policy.model.model.language_model.config, "hidden_act", "gelu")
    with pytest.raises(ValueError, match="silu in its kernel; this model's is 'gelu'"):
        images(RolloutEngine(linear="triton", pack=True).sample_image_tokens, sharp_policy,
               sharp_policy.image_context(PROMPTS, None), 1, n=2)


def test_lora_wrapped_projections_are_not_packed(tiny_janus_dir):
    from modules.lora import LoraSpec

    policy = JanusPolicy(str(tiny_janus_dir), lora=LoraSpec(r=2, target_modules=["q_proj"]))
    groups = packable(policy.model)
    assert groups[0] == [] and len(groups[1]) == 2  # q/k/v: q is wrapped; gate/up: packed
    ctx = policy.image_context(PROMPTS, None)
    a = images(janus_ops.sample_image_tokens, policy, ctx, 15, n=10)
    b = images(RolloutEngine(pack=True).sample_image_tokens, policy, ctx, 15, n=10)
    assert torch.equal(a.tokens, b.tokens)
    close(b.logp_guided, a.logp_guided)


def test_lora_adapters_are_applied_like_the_eager_loop(tiny_janus_dir):
    from modules.lora import LoraSpec

    policy = JanusPolicy(str(tiny_janus_dir), lora=LoraSpec(r=2))
    randomize_lora(policy)
    ctx = policy.image_context(PROMPTS, None)
    a = images(janus_ops.sample_image_tokens, policy, ctx, 13)
    b = images(RolloutEngine().sample_image_tokens, policy, ctx, 13)
    assert torch.equal(a.tokens, b.tokens)
    close(b.logp_guided, a.logp_guided)


def test_plans_stop_at_eos_like_the_eager_loop(sharp_policy):
    model, eos = sharp_policy.model, sharp_policy.tokenizer.eos_token_id
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[eos] = 2.5  # plans end early, at different steps per row
    model.lm_head = head
    ids, mask = plan_contexts(sharp_policy, PROMPTS * 2)
    a = plans(janus_ops.sample_text, sharp_policy, ids, mask, 9, max_tokens=40)
    b = plans(RolloutEngine().sample_text, sharp_policy, ids, mask, 9, max_tokens=40)
    assert a.tokens.shape == b.tokens.shape and a.tokens.shape[1] < 40  # every row ended: stopped early
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    assert len(set(b.mask.sum(1).tolist())) > 1
    assert (b.tokens[~b.mask] == sharp_policy.pad_id).all() and (b.logp[~b.mask] == 0).all()


# --------------------------------------------------------------------------- buffers, buckets, entry point


def test_contexts_of_other_lengths_reuse_the_buffers_and_the_steps(sharp_policy):
    engine = RolloutEngine()
    ctx = sharp_policy.image_context(PROMPTS, None)
    images(engine.sample_image_tokens, sharp_policy, ctx, 0)
    kv = [t.data_ptr() for state in engine._buffers.values() if "kv" in state for t in state["kv"]]
    variants = engine.stats.variants
    shorter = sharp_policy.image_context(["a sun", "a red circle", "a tomato"], None)
    assert shorter.cond_ids.shape[1] < ctx.cond_ids.shape[1]
    images(engine.sample_image_tokens, sharp_policy, shorter, 1)
    assert [t.data_ptr() for state in engine._buffers.values() if "kv" in state for t in state["kv"]] == kv
    assert engine.stats.variants == variants  # same capacity bucket and windows: nothing new to compile


def test_the_engine_enters_through_model_entry(sharp_policy):
    model, calls = sharp_policy.model, []

    def forward(fn, *args, **kwargs):
        calls.append(fn.__name__)
        return fn(model, *args, **kwargs)

    model.bicot_forward = forward
    ctx = sharp_policy.image_context(PROMPTS[:1], None)
    images(RolloutEngine().sample_image_tokens, sharp_policy, ctx, 0, n=4)
    assert calls == ["_run_image"]


def test_policy_with_the_static_engine_runs_the_rollout_phase(sharp_policy):
    records = [PromptRecord("a red circle", task_type="color"), PromptRecord("two blue squares", task_type="numeracy")]
    out = {}
    for engine in ("eager", "static"):
        sharp_policy.sampling = SamplingConfig(plan_max_tokens=8, cfg_scale=3.0, engine=engine)
        out[engine] = rollout_phase(sharp_policy, records, 2, TEMPLATE, RowPlacement(seed=11))
    eager, static = out["eager"], out["static"]
    assert sharp_policy._engine is not None and sharp_policy._engine.stats.steps > 0
    assert static.plans == eager.plans and torch.equal(static.plan_tokens, eager.plan_tokens)
    close(static.plan_logp, eager.plan_logp)
    assert torch.equal(static.image_tokens, eager.image_tokens) and torch.equal(static.images, eager.images)
    close(static.image_logp, eager.image_logp)


def _fsdp2_rank(rank: int, world: int, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from bicot.parallel import gathered, parallelize
    from modules.tiny import TinyJanusSpec, build_tiny_janus

    model, processor = build_tiny_janus(TinyJanusSpec(hidden_size=32, num_heads=2, image_size=32, patch_size=8))
    boi = processor.tokenizer.convert_tokens_to_ids("<begin_of_image>")
    ids = torch.tensor([[1, 7, 11, 61, 74, 8, 11, boi]])
    mask = torch.ones_like(ids)
    plain = janus_ops.sample_image_tokens(model, ids, mask, 16, ids.clone(), 3.0, noise=stream(0))
    parallelize(model, init_device_mesh("cpu", (world,)))
    engine = RolloutEngine()
    try:
        engine.sample_image_tokens(model, ids, mask, 16, ids.clone(), 3.0, noise=stream(0))
        refused = ""
    except RuntimeError as err:
        refused = str(err)
    with gathered(model):
        out = engine.sample_image_tokens(model, ids, mask, 16, ids.clone(), 3.0, noise=stream(0))
    # compiled parts over the gathered weights, captured (stand-in); q/k/v and gate/up packed from each gather
    fused = RolloutEngine(compile="fused", pack=True)
    fused.graphs = StandInGraphs()
    same_fused = []
    for _ in range(2):  # two rollouts, two gathers
        with gathered(model):
            again = fused.sample_image_tokens(model, ids, mask, 16, ids.clone(), 3.0, noise=stream(0))
        same_fused.append(torch.equal(again.tokens, plain.tokens))
    packed = [pair for e in fused._buffers.values() if "copies" in e for pair in e["packed"]]
    same_fused.append(bool(packed) and all(t is not None for pair in packed for t in pair))
    results[rank] = (
        refused, torch.equal(out.tokens, plain.tokens), float((out.logp_guided - plain.logp_guided).abs().max()),
        same_fused, fused.stats.captures,
    )


@pytest.mark.slow
def test_fsdp2_sharded_model_samples_inside_gathered_and_is_refused_outside():
    from gloo import run_ranks

    results = run_ranks(_fsdp2_rank, 2)
    for refused, same, diff, same_fused, captures in results.values():
        assert "bicot.parallel.gathered" in refused
        assert same and diff < FP32_ATOL
        assert same_fused == [True, True, True] and captures >= 1  # (the last: every layer was packed)


def _fsdp2_bf16_rank(rank: int, world: int, results) -> None:
    """The 7B recipe's setting: FSDP2 gathering bf16 copies of float32 master weights, under bf16 autocast."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.distributed.device_mesh import init_device_mesh

    from bicot.parallel import ParallelConfig, gathered, parallelize
    from modules.tiny import TinyJanusSpec, build_tiny_janus

    model, processor = build_tiny_janus(TinyJanusSpec(hidden_size=32, num_heads=2, image_size=32, patch_size=8))
    boi = processor.tokenizer.convert_tokens_to_ids("<begin_of_image>")
    ids = torch.tensor([[1, 7, 11, 61, 74, 8, 11, boi], [0, 0, 1, 9, 13, 7, 11, boi]])
    mask = (ids != 0).long()
    uncond = torch.where(mask.bool() & (ids != 1) & (ids != boi), 0, ids)
    parallelize(model, init_device_mesh("cpu", (world,)), ParallelConfig(param_dtype="bfloat16"))
    engine = RolloutEngine()
    with MixedPrecision("bf16-mixed", "cpu").forward_context(), gathered(model), torch.no_grad():
        out = engine.sample_image_tokens(model, ids, mask, 16, uncond, 3.0, noise=stream(0))
        forced = janus_ops.image_logprobs(model, ids, mask, out.tokens, 1.0, uncond, 3.0)
        eager = janus_ops.sample_image_tokens(model, ids, mask, 16, uncond, 3.0, noise=stream(0))
        forced_eager = janus_ops.image_logprobs(model, ids, mask, eager.tokens, 1.0, uncond, 3.0)
    kv = {str(t.dtype) for state in engine._buffers.values() for t in state.get("kv", [])}
    results[rank] = (float((out.logp_guided - forced).abs().max()),
                     float((eager.logp_guided - forced_eager).abs().max()), kv)


@pytest.mark.slow
def test_fsdp2_bf16_gathers_give_the_teacher_forced_logprobs():
    """The update's ratios need the rollout's log-probs: under the 7B recipe's bf16 gathers the engine's are the
    teacher-forced pass's within bf16 tolerance, as close as the eager loop's own."""
    from gloo import run_ranks

    for engine_diff, eager_diff, kv in run_ranks(_fsdp2_bf16_rank, 2).values():
        assert kv == {"torch.bfloat16"}
        assert engine_diff < BF16_ATOL and eager_diff < BF16_ATOL


# --------------------------------------------------------------------------- hand-captured steps


def test_captured_steps_warm_up_capture_once_per_window_and_replay(sharp_policy):
    engine = RolloutEngine(compile="cudagraphs")
    engine.graphs = graphs = StandInGraphs()
    ctx = sharp_policy.image_context(PROMPTS, None)
    eager = images(janus_ops.sample_image_tokens, sharp_policy, ctx, 3, n=12)
    first = images(engine.sample_image_tokens, sharp_policy, ctx, 3, n=12)
    assert torch.equal(first.tokens, eager.tokens)  # warm-up, capture and replay each ran the step exactly once
    close(first.logp_guided, eager.logp_guided)
    windows = engine.stats.variants
    assert graphs.warmups == graphs.captures == engine.stats.captures == windows >= 1
    again = images(engine.sample_image_tokens, sharp_policy, ctx, 3, n=12)
    assert torch.equal(again.tokens, eager.tokens)
    assert graphs.captures == windows and graphs.warmups == windows  # only replays now
    assert engine.stats.steps == 24


def test_captured_steps_capture_again_when_the_weights_move_but_not_when_they_change_in_place(sharp_policy):
    engine = RolloutEngine(compile="cudagraphs")
    engine.graphs = graphs = StandInGraphs()
    ctx = sharp_policy.image_context(PROMPTS, None)
    images(engine.sample_image_tokens, sharp_policy, ctx, 3, n=8)
    windows = graphs.captures
    head = sharp_policy.model.model.generation_head.proj_out.weight
    with torch.no_grad():
        head.mul_(0.5)  # what an optimizer step does: same address, new values
    images(engine.sample_image_tokens, sharp_policy, ctx, 3, n=8)
    assert graphs.captures == windows
    head.data = head.data.clone()  # what a re-gather under FSDP2 may do: same values, another address
    moved = images(engine.sample_image_tokens, sharp_policy, ctx, 3, n=8)
    assert graphs.captures == 2 * windows and graphs.warmups == windows  # captured again, no second warm-up
    assert torch.equal(moved.tokens, images(janus_ops.sample_image_tokens, sharp_policy, ctx, 3, n=8).tokens)
    engine.release()  # the buffers go, and the graphs that read them; the steps stay warm
    released = images(engine.sample_image_tokens, sharp_policy, ctx, 3, n=8)
    assert graphs.captures == 3 * windows and graphs.warmups == windows
    assert torch.equal(released.tokens, moved.tokens)


def test_captured_modes_free_their_buffers_after_a_rollout_and_compiled_modes_keep_them(sharp_policy):
    ctx = sharp_policy.image_context(PROMPTS[:1], None)
    for mode, kept in [("off", False), ("cudagraphs", False), ("fused", False), ("reduce-overhead", True)]:
        engine = RolloutEngine(compile=mode)
        engine._buffers["probe"] = {}  # what a rollout leaves (KV buffers, weight copy), without compiling one
        engine.end_rollout()
        assert ("probe" in engine._buffers) is kept is keeps_buffers(mode), mode
    engine = RolloutEngine(compile="off")
    images(engine.sample_image_tokens, sharp_policy, ctx, 0, n=2)
    assert engine._buffers
    engine.end_rollout()
    assert not engine._buffers


def test_release_starts_a_new_graph_memory_pool():
    # CUDA's caching allocator frees a graph pool with its last graph; capturing into it again fails
    # (an INTERNAL ASSERT in CUDACachingAllocator, seen on an H200 when a training rollout released)
    engine = RolloutEngine(compile="cudagraphs")
    engine.graphs.pool = (0, 1)
    engine.release()
    assert engine.graphs.pool is None


def test_captured_plan_steps_sample_the_eager_plans(sharp_policy):
    ids, mask = plan_contexts(sharp_policy)
    engine = RolloutEngine(compile="cudagraphs")
    engine.graphs = StandInGraphs()
    a = plans(janus_ops.sample_text, sharp_policy, ids, mask, 9, max_tokens=20)
    b = plans(engine.sample_text, sharp_policy, ids, mask, 9, max_tokens=20)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    close(b.logp, a.logp)


def test_cudagraphs_on_cpu_says_it_needs_cuda(sharp_policy):
    ctx = sharp_policy.image_context(PROMPTS[:1], None)
    with pytest.raises(RuntimeError, match="compile='cudagraphs' needs a CUDA device"):
        images(RolloutEngine(compile="cudagraphs").sample_image_tokens, sharp_policy, ctx, 0, n=2)


def test_sampling_config_chooses_the_engine_compile_mode(sharp_policy):
    with pytest.raises(ValueError, match="sampling.engine_compile must be one of"):
        SamplingConfig(engine="static", engine_compile="fast")
    with pytest.raises(ValueError, match="sampling.engine_attention must be one of"):
        SamplingConfig(engine="static", engine_attention="flash")
    sharp_policy.sampling = SamplingConfig(engine="static", engine_compile="cudagraphs", engine_attention="sdpa",
                                           engine_pack=True)
    sharp_policy._engine = None
    engine = sharp_policy._sampler()
    assert (engine.compile, engine.attention, engine.pack, engine.linear) == ("cudagraphs", "sdpa", True, "torch")
    with pytest.raises(ValueError, match="engine_linear triton needs sampling.engine_pack: true"):
        SamplingConfig(engine="static", engine_linear="triton")
    with pytest.raises(ValueError, match="sampling.engine_linear must be torch, triton or a launch name"):
        SamplingConfig(engine="static", engine_linear="triton_lin_n8", engine_pack=True)
    if decode_attention.available():
        name = "triton_lin_n16_k64_s0_w4_p3"
        sharp_policy.sampling = SamplingConfig(engine="static", engine_pack=True, engine_linear=name)
        sharp_policy._engine = None
        assert sharp_policy._sampler().linear_launch == decode_linear.LinearLaunch.parse(name)


def test_triton_kernels_without_triton_are_refused_when_configured(monkeypatch):
    monkeypatch.setattr(decode_attention, "triton", None)
    with pytest.raises(RuntimeError, match="engine attention 'triton' needs the triton package"):
        SamplingConfig(engine="static", engine_attention="triton")
    SamplingConfig(engine="eager", engine_attention="triton")  # not used by the eager loop: no error
    SamplingConfig(engine="static", engine_attention="auto")  # auto falls back to matmul: no error
    with pytest.raises(RuntimeError, match="engine linear 'triton' needs the triton package.*Other choices: torch"):
        SamplingConfig(engine="static", engine_linear="triton", engine_pack=True)
    SamplingConfig(engine="eager", engine_linear="triton", engine_pack=True)


# --------------------------------------------------------------------------- compiled steps


@pytest.mark.slow
def test_compiled_cpu_step_samples_the_eager_tokens_and_compiles_once_per_bucket(sharp_policy):
    engine = RolloutEngine(compile="default")
    ctx = sharp_policy.image_context(PROMPTS, None)
    eager = images(janus_ops.sample_image_tokens, sharp_policy, ctx, 12)
    first = images(engine.sample_image_tokens, sharp_policy, ctx, 12)
    compile_s, variants = engine.stats.compile_s, engine.stats.variants
    again = images(engine.sample_image_tokens, sharp_policy, ctx, 12)
    assert torch.equal(first.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)
    close(first.logp_guided, eager.logp_guided)
    assert engine.stats.variants == variants and engine.stats.compile_s == compile_s and compile_s > 0


def _layer_compiles() -> int:
    """How many compiled variants dynamo holds for the decoder-layer part of the step."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(decode_layer.__code__))


def fused_like_eager(policy, n: int, **engine_options):
    """A fresh ``fused`` engine (stand-in capture, dynamo's cache cleared) whose first image rollout of ``n`` tokens
    gives the eager loop's tokens and log-probs; returns ``(engine, graphs, rollout, the eager rollout)``."""
    torch._dynamo.reset()  # the compile cache is per code object, shared with earlier tests
    engine = RolloutEngine(chunk=16, **{"compile": "fused", **engine_options})
    engine.graphs = graphs = StandInGraphs()
    ctx = policy.image_context(PROMPTS, None)
    eager = images(janus_ops.sample_image_tokens, policy, ctx, 5, n=n)
    first = images(engine.sample_image_tokens, policy, ctx, 5, n=n)
    assert torch.equal(first.tokens, eager.tokens)
    close(first.logp_guided, eager.logp_guided)
    close(first.logp_conditional, eager.logp_conditional)
    return engine, graphs, lambda: images(engine.sample_image_tokens, policy, ctx, 5, n=n), eager


def plans_like_eager(engine, policy, max_tokens: int) -> None:
    ids, mask = plan_contexts(policy)
    a = plans(janus_ops.sample_text, policy, ids, mask, 9, max_tokens=max_tokens)
    b = plans(engine.sample_text, policy, ids, mask, 9, max_tokens=max_tokens)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    close(b.logp, a.logp)


@pytest.mark.parametrize("compile", ["off", "fused"])
def test_auto_attention_on_cpu_samples_as_matmul(sharp_policy, compile):
    auto, _, _, _ = fused_like_eager(sharp_policy, 20, compile=compile, attention="auto", pack=True)
    assert auto.stats.variants > 1  # matmul's windows: triton would have one


@pytest.mark.slow
@pytest.mark.parametrize(("attention", "pack"), [("matmul", False), ("reduce", False), ("matmul", True)])
def test_fused_parts_compile_one_layer_for_all_layers_and_sample_the_eager_tokens(sharp_policy, attention, pack):
    """``compile="fused"``: each part of the step compiled on its own, the whole step captured (stand-in here)."""
    # a window per 16 slots: several windows in 40 tokens
    engine, graphs, rollout, eager = fused_like_eager(sharp_policy, 40, attention=attention, pack=pack)
    windows, layers = engine.stats.variants, sharp_policy.model.config.text_config.num_hidden_layers
    assert windows >= 3 and graphs.captures == windows and engine.stats.compile_s > 0
    # one compiled layer serves every layer; windows after the second share a dynamic-window compile
    # (plus, at most, the last window, where the slice is the whole buffer)
    assert 1 <= _layer_compiles() <= 3 < windows * layers
    compiles, compile_s = _layer_compiles(), engine.stats.compile_s
    assert torch.equal(rollout().tokens, eager.tokens) and graphs.captures == windows  # replays only
    assert _layer_compiles() == compiles and engine.stats.compile_s == compile_s
    plans_like_eager(engine, sharp_policy, 20)


@pytest.mark.slow
@pytest.mark.parametrize("attention", [TRITON])
def test_fused_triton_attention_compiles_and_captures_one_step_per_stage(sharp_policy, attention):
    """``attention="triton"`` reads only the filled slots, so one window (the whole cache) serves every step: one
    compiled layer and one capture per stage, however many tokens; the kernels stay whole inside the compiled
    layer (the custom op ``bicot::decode_attention``)."""
    engine, graphs, rollout, eager = fused_like_eager(sharp_policy, 20, attention=attention)
    assert engine.stats.variants == 1 and graphs.captures == 1 and _layer_compiles() == 1
    assert torch.equal(rollout().tokens, eager.tokens) and graphs.captures == 1 and _layer_compiles() == 1
    plans_like_eager(engine, sharp_policy, 8)
    assert engine.stats.variants == 2 and graphs.captures == 2


@pytest.mark.slow
@pytest.mark.parametrize(("compile", "launch"), [("off", "triton_s16_b16_w2_p2"), ("fused", "triton_s16_b16_w2_p2_l"),
                                                ("off", "triton_n2_b16_w2_p1_m")])
@pytest.mark.parametrize("attention", [TRITON])
def test_a_triton_launch_configuration_reaches_the_kernels(sharp_policy, monkeypatch, compile, launch, attention):
    """``RolloutEngine(triton_launch=...)``: the step's kernels launch with that block, warps, stages, loop and merge
    (plain and inside the compiled layer), with the eager loop's tokens and log-probs."""
    spy = LaunchSpy(decode_attention._partial)
    monkeypatch.setattr(decode_attention, "_partial", spy)
    engine, _, _, _ = fused_like_eager(sharp_policy, 8, compile=compile, attention=attention, triton_launch=launch)
    expected = decode_attention.Launch.parse(launch)
    assert spy.launches == {(expected.block, expected.stages, expected.warps, expected.lanes, expected.last)}
    assert pickle.loads(pickle.dumps(engine)).triton_launch == launch


@pytest.mark.slow
@pytest.mark.parametrize(("processors", "parts"), [(1, 1), (10**6, 0)])
@pytest.mark.parametrize("attention", [TRITON])
def test_the_default_launch_splits_the_cache_only_where_the_rows_leave_processors_idle(
        sharp_policy, monkeypatch, processors, parts, attention):
    """No ``triton_launch``: inside the compiled layer the kernels run one part per (row, head) where the rows x heads
    cover the GPU's processors (stand-in counts here), else splits of 128 slots; the eager loop's tokens either way."""
    spy = LaunchSpy(decode_attention._partial, ("PARTS", "STAGES"))
    monkeypatch.setattr(decode_attention, "_partial", spy)
    monkeypatch.setattr(decode_attention, "processors", lambda device: processors)
    fused_like_eager(sharp_policy, 8, attention=attention)
    assert spy.launches == {(parts, decode_attention.STAGES)}


def test_a_triton_launch_configuration_is_checked_when_the_engine_is_made():
    with pytest.raises(ValueError, match="block and warps must be powers of 2, got block=24"):
        RolloutEngine(attention="triton", triton_launch="triton_s64_b24_w4_p1")
    with pytest.raises(ValueError, match="named triton_s<split>_b<block>_w<warps>_p<stages>"):
        RolloutEngine(attention="triton", triton_launch="s64")
    with pytest.raises(ValueError, match="triton_launch is for attention 'triton' or 'auto', not 'matmul'"):
        RolloutEngine(triton_launch="triton_s64_b32_w4_p1")
    assert RolloutEngine(attention="auto", triton_launch="triton_s64_b32_w4_p1").triton_launch


@pytest.mark.slow
def test_fused_autotune_samples_the_eager_tokens_with_one_capture_per_window(sharp_policy, monkeypatch):
    """``compile="fused-autotune"``: ``fused`` with each part compiled under inductor's max-autotune (on CPU the
    matmuls have one choice, so nothing is benchmarked: this checks the wiring and the results)."""
    modes, compile = [], torch.compile

    def recording(fn, **options):
        modes.append(options.get("mode"))
        return compile(fn, **options)

    monkeypatch.setattr(torch, "compile", recording)
    engine, graphs, _, _ = fused_like_eager(sharp_policy, 20, compile="fused-autotune")
    assert engine.captures(torch.device("cuda")) and graphs.captures == engine.stats.variants >= 2
    assert engine.stats.compile_s > 0 and 1 <= _layer_compiles() <= 3
    assert modes and set(modes) == {"max-autotune-no-cudagraphs"}  # every part; the engine captures graphs itself


@pytest.mark.slow
def test_fused_parts_run_uncaptured_on_cpu_with_lora_under_autocast(tiny_janus_dir):
    """Without a CUDA device ``fused`` runs the compiled parts as they are; LoRA and the weight copy trace."""
    from modules.lora import LoraSpec

    policy = JanusPolicy(str(tiny_janus_dir), dtype="float32", lora=LoraSpec(r=2))
    randomize_lora(policy)
    engine = RolloutEngine(compile="fused")
    assert not engine.captures(torch.device("cpu"))
    ctx = policy.image_context(PROMPTS, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = images(RolloutEngine(compile="off").sample_image_tokens, policy, ctx, 2, n=16)
        fused = images(engine.sample_image_tokens, policy, ctx, 2, n=16)
    close(fused.logp_guided, plain.logp_guided, atol=BF16_ATOL)
    assert engine.stats.captures == 0 and engine.stats.compile_s > 0


def cuda_stream(seed):
    return janus_ops.RowNoise(torch.Generator(device="cuda").manual_seed(seed))


def cuda_images(fn, policy, ctx, seed=0):
    return fn(policy.model, ctx.cond_ids, ctx.cond_mask, policy.num_image_tokens, ctx.uncond_ids, 3.0,
              noise=cuda_stream(seed))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("mode", "attention", "pack", "linear"),
    [
        ("cudagraphs", "matmul", False, "torch"),
        ("fused", "matmul", False, "torch"),
        ("fused", "reduce", False, "torch"),
        ("fused", "sdpa", False, "torch"),
        ("fused", "matmul", True, "torch"),
        ("cudagraphs", "triton", False, "torch"),
        ("fused", "triton", False, "torch"),
        ("cudagraphs", "matmul", True, "triton"),  # modules/decode_linear.py's projections
        ("fused", "triton", True, "triton"),
        ("fused", "triton", True, "triton_lin_n16_k16_s2_w4_p2_l"),  # the splits added up by each tile's last program
        ("fused", "triton", True, "triton_lin_n64_k128_s0_w4_p3_m64"),  # 64-row programs: wgmma on sm_90 (bf16)
        ("reduce-overhead", "matmul", False, "torch"),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_capture_and_replay_match_the_eager_loop(tiny_janus_dir, dtype, mode, attention, pack, linear):
    policy = JanusPolicy(str(tiny_janus_dir), dtype=dtype).to("cuda")
    engine = RolloutEngine(compile=mode, attention=attention, pack=pack, linear=linear)
    ctx = policy.image_context(PROMPTS, None)

    from torch._dynamo.utils import counters

    counters.clear()
    eager = cuda_images(janus_ops.sample_image_tokens, policy, ctx)
    first = cuda_images(engine.sample_image_tokens, policy, ctx)
    variants, compile_s, captures = engine.stats.variants, engine.stats.compile_s, engine.stats.captures
    replayed = [cuda_images(engine.sample_image_tokens, policy, ctx) for _ in range(3)]
    assert engine.stats.variants == variants and engine.stats.compile_s == compile_s  # captured once, replayed
    if mode in ("cudagraphs", "fused"):
        assert captures == variants > 0 and engine.stats.captures == captures
    else:
        assert counters["inductor"]["cudagraph_skips"] == 0  # the step really runs as a CUDA graph
        assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] == 0  # no per-replay input copies
    forced = janus_ops.image_logprobs(policy.model, ctx.cond_ids, ctx.cond_mask, first.tokens, 1.0, None, 3.0)
    if dtype == "float32":
        assert all(torch.equal(r.tokens, eager.tokens) for r in [first, *replayed])
        close(first.logp_guided, eager.logp_guided)
        close(first.logp_conditional, forced.detach())
    else:
        assert all(torch.equal(r.tokens, first.tokens) for r in replayed)  # replay is deterministic
        close(first.logp_conditional, forced.detach(), atol=BF16_ATOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("mode", "attention", "pack", "linear"),
    [
        ("cudagraphs", "matmul", False, "torch"),
        ("fused", "matmul", False, "torch"),
        ("fused", "matmul", True, "torch"),
        ("fused", "auto", True, "torch"),  # configs/janus_pro_1b_1gpu.yaml's engine, in its training setting
        ("fused", "auto", True, "triton"),  # the same with modules/decode_linear.py's projections
    ],
)
def test_captured_graphs_under_autocast_see_in_place_weight_updates(tiny_janus_dir, mode, attention, pack, linear):
    """bf16-mixed training: fp32 weights, autocast rollouts, an optimizer step between rollouts."""
    policy = JanusPolicy(str(tiny_janus_dir), dtype="float32").to("cuda")
    engine = RolloutEngine(compile=mode, attention=attention, pack=pack, linear=linear)
    assert engine.attention_on(torch.device("cuda")) == ("triton" if attention == "auto" else attention)
    ctx = policy.image_context(PROMPTS, None)

    def rollout():
        # a fresh autocast region per rollout, as in training: a cast cached in an earlier region is gone
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = cuda_images(engine.sample_image_tokens, policy, ctx)
            forced = janus_ops.image_logprobs(policy.model, ctx.cond_ids, ctx.cond_mask, out.tokens, 1.0, None, 3.0)
        close(out.logp_conditional, forced.detach().float(), atol=BF16_ATOL)
        return out

    rollout(), rollout()
    captures = engine.stats.captures
    head = policy.model.model.generation_head.proj_out.weight
    query = policy.model.model.language_model.layers[0].self_attn.q_proj.weight  # packed under pack=True
    with torch.no_grad():
        for weight in (head, query):
            weight.copy_(torch.randn_like(weight) * weight.std() * 4)  # in place, as Adam does
    rollout()  # log-probs of the new weights: the graphs read refreshed bf16 copies, not stale ones
    assert engine.stats.captures == captures  # replayed, not captured again



def fp8_exact_weights(policy) -> None:
    """Every decoder projection of the policy made float8-exact (:func:`fp8_values.fp8_exact`), in place."""
    with torch.no_grad():
        for layer in policy.model.model.language_model.layers:
            for module in (*layer.self_attn.children(), *layer.mlp.children()):
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(fp8_exact(module.weight))


def fp8_against_bf16(policy, device: str, **options) -> RolloutEngine:
    """On fp8-exact weights (:func:`fp8_exact_weights`), ``weights="fp8"`` samples bit for bit what the bf16 Triton step
    samples under autocast (the same products, the same float32 sums, scaled exactly by powers of two): plans and
    images, before and after an in-place update of the weights (the quantized copies are refreshed per call, in
    place). Returns the fp8 engine."""
    noise = stream if device == "cpu" else cuda_stream
    ctx = policy.image_context(PROMPTS, None)
    ids, mask = plan_contexts(policy)
    options = {"linear": "triton", **options}
    engines = [RolloutEngine(pack=True, weights=w, **options) for w in ("fp8", "model")]

    def same_samples() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            runs = [(e.sample_image_tokens(policy.model, ctx.cond_ids, ctx.cond_mask, 6, ctx.uncond_ids, 3.0,
                                           noise=noise(3)),
                     e.sample_text(policy.model, ids, mask, 6, policy.tokenizer.eos_token_id, policy.pad_id,
                                   noise=noise(9))) for e in engines]
        for a, b in zip(*runs, strict=True):
            for name in [f.name for f in dataclasses.fields(a)]:
                assert torch.equal(getattr(a, name), getattr(b, name)), name

    fp8_exact_weights(policy)
    same_samples()
    with torch.no_grad():  # in place, as the optimizer does
        for layer in policy.model.model.language_model.layers:
            layer.mlp.down_proj.weight.mul_(-4.0)
            layer.self_attn.q_proj.weight.copy_(layer.self_attn.q_proj.weight.roll(1, 0))
    same_samples()
    return engines[0]


@pytest.mark.skipif(not decode_attention.interpreted(), reason="needs triton with TRITON_INTERPRET=1")
def test_fp8_weights_are_the_bf16_step_where_the_weights_are_fp8_values(sharp_policy):
    """``weights="fp8"``: the step's decoder projections read float8 copies of the live weights and their scales
    (:func:`fp8_against_bf16`); on the model's own weights its log-probs move away from the teacher-forced ones by
    the quantization, within :data:`FP8_ATOL`."""
    ctx = sharp_policy.image_context(PROMPTS, None)
    gaps = {}
    for name in ("fp8", "model"):
        engine = RolloutEngine(pack=True, linear="triton", weights=name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = images(engine.sample_image_tokens, sharp_policy, ctx, 3, n=8)
            forced = janus_ops.image_logprobs(sharp_policy.model, ctx.cond_ids, ctx.cond_mask, out.tokens, 1.0,
                                              ctx.uncond_ids, 3.0).detach()
        gaps[name] = (out.logp_guided - forced).abs()
    # measured: fp8 0.17 at most (0.049 on average) against bf16's 0.054 (0.013) on this sharp model
    assert gaps["fp8"].max() < FP8_ATOL and gaps["fp8"].mean() > 2 * gaps["model"].mean(), gaps
    engine = fp8_against_bf16(sharp_policy, "cpu")
    (entry,) = [e for key, e in engine._buffers.items() if key[0] == "fp8"]
    assert all(q.dtype == fp8.FP8 and s.dtype == torch.float32 for layer in entry["packed"] for q, s in layer)
    assert not any(key[0] == "step_weights" and e["packed"] for key, e in engine._buffers.items())  # no bf16 packs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with float8 (compute capability 8.9 or later)")
@pytest.mark.parametrize("linear", ["triton", "triton_lin_n64_k128_s0_w4_p3_m64", "triton_lin_n64_k128_s0_w4_p3_c"])
def test_on_a_gpu_fp8_weights_are_the_bf16_step_where_the_weights_are_fp8_values(tiny_janus_dir, linear):
    """The compiled fp8 kernels, inside the fused step captured as CUDA graphs: bit for bit the bf16 step on
    fp8-exact weights, and after an in-place update the graphs replay (no new capture) the refreshed copies. The
    weights widened by their bits (the PTX), in 64-row (wgmma) programs, and by Triton's conversion."""
    policy = JanusPolicy(str(tiny_janus_dir), dtype="float32").to("cuda")
    engine = fp8_against_bf16(policy, "cuda", compile="fused", attention="auto", linear=linear)
    assert engine.stats.captures == engine.stats.variants > 0  # captured once per variant, replayed after the update


def test_fp8_weights_are_checked_when_configured(tiny_janus_dir):
    from modules.lora import LoraSpec

    with pytest.raises(ValueError, match=r"engine weights must be one of \('model', 'fp8'\), got 'int8'"):
        RolloutEngine(weights="int8")
    with pytest.raises(ValueError, match="engine weights fp8 needs engine linear triton"):
        RolloutEngine(pack=True, weights="fp8")
    with pytest.raises(ValueError, match="sampling.engine_weights must be one of"):
        SamplingConfig(engine="static", engine_weights="bf16")
    with pytest.raises(ValueError, match="sampling.engine_weights fp8 needs sampling.engine_linear triton"):
        SamplingConfig(engine="static", engine_weights="fp8")
    if not decode_attention.available():
        return
    sampling = SamplingConfig(engine="static", engine_pack=True, engine_linear="triton", engine_weights="fp8")
    policy = JanusPolicy(str(tiny_janus_dir), sampling=sampling, lora=LoraSpec(r=2, target_modules=["q_proj"]))
    assert len(quantizable(policy.model)) == policy.model.config.text_config.num_hidden_layers  # LoRA: merged
    policy.model.model.language_model.layers[1].mlp.up_proj = nn.Linear(8, 8, bias=True)
    with pytest.raises(ValueError, match="layer 1's up_proj is a Linear with a bias: sample with engine weights"):
        quantizable(policy.model)
    engine = JanusPolicy(str(tiny_janus_dir), sampling=sampling)._sampler()
    assert engine.weights == "fp8" and pickle.loads(pickle.dumps(engine)).weights == "fp8"


@pytest.mark.skipif(not decode_attention.interpreted(), reason="needs triton with TRITON_INTERPRET=1")
def test_fp8_weights_of_lora_projections_are_their_merged_weights_quantized(tiny_janus_dir):
    """A LoRA-adapted projection is quantized with its adapters merged (in float32, also under autocast), refreshed at
    every call: the fp8 copies equal those of the merged model (what ``export_model`` saves), and so do the
    samples; with the adapters off, the base weights'."""
    from modules.lora import LoraSpec, merged_copy

    policy = JanusPolicy(str(tiny_janus_dir), lora=LoraSpec(r=2, target_modules=["q_proj", "o_proj", "up_proj"]))
    with torch.no_grad():  # adapters that do something (peft starts B at zero)
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    ctx = policy.image_context(PROMPTS, None)
    merged = merged_copy(policy.model)
    runs = []
    for model in (policy.model, merged):
        engine = RolloutEngine(pack=True, linear="triton", weights="fp8")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = engine.sample_image_tokens(model, ctx.cond_ids, ctx.cond_mask, 4, ctx.uncond_ids, 3.0,
                                             noise=stream(3))
        (entry,) = [e for key, e in engine._buffers.items() if key[0] == "fp8"]
        runs.append((out, [t for layer in entry["packed"] for pair in layer for t in pair]))
    (a, weights_a), (b, weights_b) = runs
    assert all(torch.equal(x.view(torch.uint8) if x.dtype == fp8.FP8 else x,
                           y.view(torch.uint8) if y.dtype == fp8.FP8 else y)
               for x, y in zip(weights_a, weights_b, strict=True))
    # the prefill is each model's own forward: under autocast the adapters' path rounds apart from the base's
    assert torch.equal(a.tokens, b.tokens)
    close(a.logp_guided, b.logp_guided, atol=1e-2)
    with adapters_disabled(policy.model):  # the base weights alone: other fp8 copies
        engine = RolloutEngine(pack=True, linear="triton", weights="fp8")
        engine.sample_image_tokens(policy.model, ctx.cond_ids, ctx.cond_mask, 1, ctx.uncond_ids, 3.0, noise=stream(3))
    (entry,) = [e for key, e in engine._buffers.items() if key[0] == "fp8"]
    assert not torch.equal(entry["packed"][0][0][1], weights_a[1])  # layer 0's q/k/v scales moved with q's adapter


def test_an_fp8_cache_is_checked_when_configured_and_bound(sharp_policy):
    with pytest.raises(ValueError, match="engine kv must be one of"):
        RolloutEngine(attention="triton", kv="fp16")
    with pytest.raises(ValueError, match="engine kv fp8 needs engine attention triton.* not 'matmul'"):
        RolloutEngine(kv="fp8")
    with pytest.raises(ValueError, match="sampling.engine_kv must be one of"):
        SamplingConfig(engine="static", engine_kv="int8")
    with pytest.raises(ValueError, match="sampling.engine_kv fp8 needs sampling.engine_attention triton"):
        SamplingConfig(engine="static", engine_kv="fp8")
    engine = RolloutEngine(attention="auto", kv="fp8")  # auto: matmul on CPU, which reads no float8 cache
    assert pickle.loads(pickle.dumps(engine)).kv == "fp8"
    with pytest.raises(RuntimeError, match="engine kv 'fp8' needs the triton attention, and attention 'auto' is "
                                           "'matmul' on cpu"):
        images(engine.sample_image_tokens, sharp_policy, sharp_policy.image_context(PROMPTS, None), 1, n=2)


@pytest.mark.skipif(not decode_attention.interpreted(), reason="needs triton with TRITON_INTERPRET=1")
def test_fp8_cache_holds_each_slots_vector_quantized_and_samples_near_the_exact_cache(sharp_policy):
    """``kv="fp8"``: the cache holds each slot's key and value quantized with its own scale (prefill and sampled
    tokens; pad slots 0 with scale 1), the Triton attention reads them; the log-probs move from the teacher-forced
    ones by the quantization (float32 otherwise: the exact cache's are within 1e-4)."""
    ctx = sharp_policy.image_context(PROMPTS, None)
    engines = {kv: RolloutEngine(attention="triton", kv=kv) for kv in ("fp8", "model")}
    outs = {kv: images(e.sample_image_tokens, sharp_policy, ctx, 3, n=8) for kv, e in engines.items()}
    same = (outs["fp8"].tokens == outs["model"].tokens).all(1)  # rows where rounding flipped no token
    assert same.sum() >= 2, same
    gaps = {kv: (out.logp_guided - janus_ops.image_logprobs(sharp_policy.model, ctx.cond_ids, ctx.cond_mask,
                                                            out.tokens, 1.0, ctx.uncond_ids, 3.0).detach()).abs()
            for kv, out in outs.items()}
    # measured: fp8 0.044 at most (0.015 on average), the exact cache 1.4e-6
    assert gaps["model"].max() < FP32_ATOL < gaps["fp8"].mean() and gaps["fp8"].max() < FP8_ATOL, gaps
    ids, mask = plan_contexts(sharp_policy)  # the plan stage reads its float8 cache too
    text = {kv: plans(e.sample_text, sharp_policy, ids, mask, 9, max_tokens=6) for kv, e in engines.items()}
    rows = (text["fp8"].tokens == text["model"].tokens).all(1)
    assert rows.any()
    close(text["fp8"].logp[rows], text["model"].logp[rows], atol=FP8_ATOL)
    assert not torch.equal(text["fp8"].logp[rows], text["model"].logp[rows])
    (quantized,) = [s for k, s in engines["fp8"]._buffers.items() if k[0] == "image"]
    (exact,) = [s for k, s in engines["model"]._buffers.items() if k[0] == "image"]
    filled, rows = int(quantized["slot"]), torch.cat([same, same])  # both CFG branches of a prompt sample its tokens
    for i, (cache, scale, want) in enumerate(zip(quantized["kv"], quantized["kv_scale"], exact["kv"], strict=True)):
        assert cache.dtype == fp8.FP8 and scale.dtype == torch.float32
        cache, scale, want = cache[rows, :, :filled], scale[rows, :, :filled], want[rows, :, :filled]
        got = fp8.dequantize(cache, scale)
        pads = want.abs().amax(-1) == 0  # the left padding's slots
        assert pads.any() and (scale[pads] == 1).all() and not got[pads].any()
        if i < 2:  # the first layer's keys and values (later layers' inputs have seen the quantized attention)
            # e4m3: half a step is 2^-4 of a value, subnormal steps 2^-9 of the scale
            bound = torch.maximum(want.abs() * 2**-4, 2**-10 * scale[..., None]) * (1 + 1e-5) + 1e-6
            assert ((got - want).abs() <= bound).all()


@pytest.mark.skipif(not decode_attention.interpreted(), reason="needs triton with TRITON_INTERPRET=1")
def test_the_step_hands_each_layer_its_float8_cache_as_uint8_and_writes_it_in_place(sharp_policy, monkeypatch):
    """Each decoder layer gets its float8 caches as ``uint8`` views of the engine's buffers, so that the slot it
    writes is a write into its own input: torch 2.11's inductor (the GPU machine's) does not write in place through
    a dtype view of a compiled graph's input, and cloned and copied back both whole caches at every layer (about
    4.8 ms per step at the 7B shape). The buffers stay float8 and are the ones written."""
    seen = []

    def layer(*args):
        seen.append((args[2][0].dtype, args[3][0].dtype, args[2][0].untyped_storage().data_ptr()))
        return decode_layer(*args)

    monkeypatch.setattr(engine_module, "StepParts", lambda *a, **k: _with_layer(StepParts(*a, **k), layer))
    engine = RolloutEngine(attention="triton", kv="fp8")
    images(engine.sample_image_tokens, sharp_policy, sharp_policy.image_context(PROMPTS, None), 3, n=4)
    (state,) = [s for k, s in engine._buffers.items() if k[0] == "image"]
    layers = sharp_policy.model.config.text_config.num_hidden_layers
    assert len(seen) == 4 * layers and {(k, v) for k, v, _ in seen} == {(torch.uint8, torch.uint8)}
    assert {ptr for _, _, ptr in seen[:layers]} == {c.untyped_storage().data_ptr() for c in state["kv"][::2]}
    assert all(c.dtype == fp8.FP8 for c in state["kv"])


def _with_layer(parts, layer):
    parts.layer = layer
    return parts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with float8 (compute capability 8.9 or later)")
def test_on_a_gpu_fp8_weights_and_cache_are_captured_once_and_sample_near_the_teacher_forced_logprobs(tiny_janus_dir):
    """The 7B candidate whole (``fused``, packed, Triton attention and projections, ``weights`` and ``kv`` fp8) in the
    bf16-mixed training setting: captured once, replayed, log-probs within :data:`FP8_ATOL` of the teacher-forced
    pass."""
    policy = JanusPolicy(str(tiny_janus_dir), dtype="float32").to("cuda")
    engine = RolloutEngine(compile="fused", attention="auto", pack=True, linear="triton", weights="fp8", kv="fp8")
    ctx = policy.image_context(PROMPTS, None)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = cuda_images(engine.sample_image_tokens, policy, ctx)
            forced = janus_ops.image_logprobs(policy.model, ctx.cond_ids, ctx.cond_mask, out.tokens, 1.0, None, 3.0)
        close(out.logp_conditional, forced.detach().float(), atol=FP8_ATOL)
    assert engine.stats.captures == engine.stats.variants > 0
