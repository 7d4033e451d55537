"""The decode step's arithmetic against Llama's own modules: rotary factors, and one decoder layer run token by
token over the static cache against the whole sequence through ``LlamaDecoderLayer`` (left padding included)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from modules.decode_step import (
    ATTENTION,
    _image_head,
    _rope,
    _rotary,
    _step_inputs,
    _text_head,
    attention_bias,
    decode_layer,
)

ROWS, LENGTH, CAPACITY = 2, 7, 16
PAD = torch.tensor([0, 3])  # row 1 is left-padded by 3 slots


def config(**rope) -> LlamaConfig:
    """A one-layer Llama; ``rope``: ``rope_parameters`` beyond the default rotary (``rope_theta`` 500)."""
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, num_hidden_layers=1, vocab_size=16, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 500.0} | rope)
    cfg._attn_implementation = "eager"
    return cfg


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


# YaRN scales cos and sin by its attention factor (1.14 here), the default rotary by 1
@pytest.mark.parametrize("rope", [{}, YARN])
def test_rotary_factors_and_rope_equal_llamas(rope):
    rotary = LlamaRotaryEmbedding(config(**rope))
    positions = torch.tensor([0, 5, 131])
    x = torch.randn(3, 4, 1, 8)  # [R, heads, 1, D]
    cos, sin = rotary(x, positions[:, None])  # [R, 1, D]
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    ours_cos, ours_sin = _rotary(rotary, positions, torch.float32)
    torch.testing.assert_close(_rope(x, ours_cos, ours_sin), expected, atol=1e-6, rtol=1e-6)


def attention_mask() -> torch.Tensor:
    """Llama's additive mask ``[R, 1, L, L]``: causal, each row's left padding masked (a pad query attends to
    itself so that its softmax stays finite; its output is not compared)."""
    cols = torch.arange(LENGTH)
    allowed = (cols[None, None] <= cols[None, :, None]) & (cols[None, None] >= PAD[:, None, None])
    allowed |= torch.eye(LENGTH, dtype=torch.bool)[None]
    return torch.zeros(ROWS, 1, LENGTH, LENGTH).masked_fill(~allowed[:, None], float("-inf"))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("attention", ["matmul", "reduce", "sdpa"])
def test_one_token_at_a_time_over_the_cache_equals_llamas_layer_on_the_whole_sequence(attention, packed):
    cfg = config()
    layer, rotary = LlamaDecoderLayer(cfg, layer_idx=0).eval(), LlamaRotaryEmbedding(cfg)
    with torch.no_grad():  # norm weights other than their initial ones, and different from each other
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    x = torch.randn(ROWS, LENGTH, cfg.hidden_size)
    positions = (torch.arange(LENGTH)[None] - PAD[:, None]).clamp(min=0)  # [R, L]
    with torch.no_grad():
        expected = layer(x, attention_mask=attention_mask(), position_ids=positions,
                         position_embeddings=rotary(x, positions))  # [R, L, H]
        attn, mlp = layer.self_attn, layer.mlp
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]) if packed else None
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) if packed else None
        keys, values = (torch.zeros(ROWS, cfg.num_key_value_heads, CAPACITY, cfg.head_dim) for _ in range(2))
        for t in range(LENGTH):
            slot = torch.tensor([t])
            cos, sin = _rotary(rotary, slot - PAD, torch.float32)
            window = 8 if t < 8 else CAPACITY  # attention reads a window of the cache, not all of it
            bias = attention_bias(PAD, slot, CAPACITY)[..., :window]
            out = decode_layer(layer, x[:, t], keys, values, cos, sin, bias, slot, window, ATTENTION[attention],
                               qkv, gate_up, PAD)
            real = t >= PAD  # the rows whose token at t is not padding
            torch.testing.assert_close(out[real], expected[real, t], atol=1e-5, rtol=1e-5)


def test_step_inputs_place_the_new_token_at_its_slot_less_the_left_padding():
    """The token at slot 9 is at position 9 in an unpadded row and 6 in a row padded by 3: Llama's rotary
    factors at those positions, and the bias open over slots ``pad .. 9`` only."""
    rotary, slot = LlamaRotaryEmbedding(config()), torch.tensor([9])
    cos, sin, bias = _step_inputs(rotary, slot, PAD, CAPACITY, torch.float32)
    x = torch.zeros(ROWS, 1, 8)
    expected_cos, expected_sin = rotary(x, torch.tensor([[9], [6]]))  # [R, 1, D]
    torch.testing.assert_close(cos[:, 0], expected_cos)
    torch.testing.assert_close(sin[:, 0], torch.cat([-expected_sin[..., :4], expected_sin[..., 4:]], -1))
    open_slots = torch.zeros(ROWS, CAPACITY, dtype=torch.bool)
    open_slots[0, :10], open_slots[1, 3:10] = True, True
    assert bias.shape == (ROWS, 1, 1, CAPACITY)
    assert torch.equal(bias[:, 0, 0] == 0, open_slots)
    assert bool((bias[:, 0, 0][~open_slots] == -torch.inf).all())


VOCAB, HIDDEN = 6, 4


def head_model():
    """The heads and embeddings the sampling step calls, small and random."""
    torch.manual_seed(3)
    embed = torch.nn.Embedding(VOCAB, HIDDEN)
    return types.SimpleNamespace(
        model=types.SimpleNamespace(generation_head=torch.nn.Linear(HIDDEN, VOCAB, bias=False)),
        lm_head=torch.nn.Linear(HIDDEN, VOCAB, bias=False),
        prepare_embeddings_for_image_generation=embed,
        get_input_embeddings=lambda: embed,
    )


def uniforms_picking(targets: list[int]) -> torch.Tensor:
    """Uniforms ``[rows, V]`` whose Gumbel noise (16 at the target, 0.37 elsewhere) draws each row's target."""
    u = torch.full((len(targets), VOCAB), 0.5)
    u[torch.arange(len(targets)), targets] = 1 - 1e-7
    return u


def outputs(rows: int, **dtypes) -> dict:
    return {name: torch.zeros(rows, 3, dtype=dtype) for name, dtype in dtypes.items()}


@torch.no_grad()
def test_image_head_samples_the_guided_mixture_and_writes_both_logprobs_at_the_column():
    model, temperature, scale = head_model(), 0.8, 3.0
    hidden = torch.randn(4, HIDDEN) * 3  # 2 conditional rows, then their 2 unconditional ones
    state = {"hidden": hidden, "uniform": uniforms_picking([4, 1]), "col": torch.tensor([1])}
    f32 = torch.float32
    state |= outputs(2, tokens=torch.long, lp_cond=f32, lp_guided=f32, entropy=f32)
    embeds = _image_head(model, state, 2, True, scale, (temperature, 0, 1.0))
    logits = hidden @ model.model.generation_head.weight.T
    guided = F.log_softmax((logits[2:] + scale * (logits[:2] - logits[2:])) / temperature, -1)  # [2, V]
    cond = F.log_softmax(logits[:2] / temperature, -1)
    tokens = torch.tensor([4, 1])
    assert torch.equal(state["tokens"][:, 1], tokens) and not state["tokens"][:, [0, 2]].any()
    rows = torch.arange(2)
    torch.testing.assert_close(state["lp_guided"][:, 1], guided[rows, tokens])
    torch.testing.assert_close(state["lp_cond"][:, 1], cond[rows, tokens])
    torch.testing.assert_close(state["entropy"][:, 1], -(guided.exp() * guided).sum(-1))
    assert (state["lp_cond"][:, 1] - state["lp_guided"][:, 1]).abs().min() > 1e-2  # the two really differ
    assert not state["lp_guided"][:, [0, 2]].any() and not state["entropy"][:, [0, 2]].any()
    # both branches go on with the sampled tokens
    both = model.prepare_embeddings_for_image_generation(torch.tensor([4, 1, 4, 1]))
    torch.testing.assert_close(embeds, both)


@torch.no_grad()
def test_text_head_pads_ended_rows_and_ends_rows_that_draw_eos():
    """Row 0 draws 3 and goes on, row 1 had ended (pad, masked, 0), row 2 draws EOS (kept, valid) and ends."""
    model, eos, pad = head_model(), 2, 5
    hidden = torch.randn(3, HIDDEN) * 3
    state = {"hidden": hidden, "uniform": uniforms_picking([3, 4, eos]), "col": torch.tensor([2]),
             "finished": torch.tensor([False, True, False])}
    state |= outputs(3, tokens=torch.long, logp=torch.float32, entropy=torch.float32, valid=torch.bool)
    embeds = _text_head(model, state, eos, pad, (1.0, 0, 1.0))
    logp = F.log_softmax(hidden @ model.lm_head.weight.T, -1)
    assert state["tokens"][:, 2].tolist() == [3, pad, eos]
    assert state["valid"][:, 2].tolist() == [True, False, True] and not state["valid"][:, :2].any()
    expected_logp = torch.stack([logp[0, 3], torch.tensor(0.0), logp[2, eos]])
    torch.testing.assert_close(state["logp"][:, 2], expected_logp)
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(state["entropy"][:, 2], entropy * torch.tensor([1.0, 0.0, 1.0]))
    assert state["finished"].tolist() == [False, True, True]
    torch.testing.assert_close(embeds, model.get_input_embeddings()(torch.tensor([3, pad, eos])))
