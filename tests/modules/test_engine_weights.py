"""The buffers behind the engine's weight copies and packs, on plain linear layers (the engine's use of them, and
the float8 weights, are in test_engine.py)."""

from __future__ import annotations

import torch
from torch import nn

from modules.engine_weights import nested_tensors, weight_buffers


def linears(*rows: int, inner: int = 6) -> list[nn.Linear]:
    return [nn.Linear(inner, r, bias=False) for r in rows]


def test_copies_of_packed_weights_are_views_of_their_pack_and_others_get_their_own():
    qkv, gate_up = linears(8, 4, 4), linears(5, 5)
    head = linears(3)
    copied = [*qkv, *head]  # under autocast: q/k/v and a head are copied; gate/up are only packed
    entry = weight_buffers(copied, [qkv, gate_up], torch.bfloat16, signature="sig")
    (qkv_pack, gate_up_pack), = entry["packed"]
    assert qkv_pack.shape == (16, 6) and qkv_pack.dtype == torch.bfloat16  # the autocast copies, packed
    assert gate_up_pack.shape == (10, 6) and gate_up_pack.dtype == torch.float32  # the weights' own dtype
    for copy, offset in zip(entry["copies"][:3], (0, 8, 12), strict=True):
        assert copy.untyped_storage().data_ptr() == qkv_pack.untyped_storage().data_ptr()  # no extra memory
        assert copy.data_ptr() == qkv_pack[offset].data_ptr()
    head_copy = entry["copies"][3]
    assert head_copy.shape == (3, 6) and head_copy.dtype == torch.bfloat16
    assert head_copy.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in entry["packed"][0]}
    assert entry["pack_modules"] == gate_up and [v.shape for v in entry["pack_views"]] == [(5, 6), (5, 6)]
    assert entry["signature"] == "sig"


def test_a_group_that_cannot_be_packed_has_no_pack():
    entry = weight_buffers([], [[], linears(2, 2)], torch.bfloat16, signature=None)
    assert entry["packed"][0][0] is None and entry["packed"][0][1].shape == (4, 6)
    assert nested_tensors(entry["packed"][0]) == [entry["packed"][0][1]]
