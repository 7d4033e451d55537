"""The decode step's arithmetic against Llama's own modules: rotary factors, and one decoder layer run token by
token over the static cache against the whole sequence through ``LlamaDecoderLayer`` (left padding included)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from modules.decode_step import ATTENTION, _rope, _rotary, attention_bias, decode_layer

ROWS, LENGTH, CAPACITY = 2, 7, 16
PAD = torch.tensor([0, 3])  # row 1 is left-padded by 3 slots


def config() -> LlamaConfig:
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, num_hidden_layers=1, vocab_size=16, rope_theta=500.0)
    cfg._attn_implementation = "eager"
    return cfg


def test_rotary_factors_and_rope_equal_llamas():
    cfg = config()
    rotary = LlamaRotaryEmbedding(cfg)
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
