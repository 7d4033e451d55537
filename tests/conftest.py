"""Shared fixtures: a tiny random Janus written to disk once per session and loaded back like a real one."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Without a GPU, Triton kernels (attention="triton") run in Triton's interpreter, on CPU tensors. Triton reads this
# when it is imported, and Lightning imports it: so before anything imports Lightning.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402

from modules.policy import JanusPolicy  # noqa: E402
from modules.tiny import TinyJanusSpec, save_tiny_janus  # noqa: E402

# 16 image tokens (a 4 x 4 grid) decoded to 8 px, a 32-entry codebook: a forward pass takes milliseconds.
TINY_SPEC = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    image_size=32,
    patch_size=8,
    codebook_size=32,
    vq_channels=32,
    vq_upsamples=1,
    seed=0,
)


WORKERS_MAX = 4


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (the README's test command): one worker per core this process may use, at most
    ``WORKERS_MAX``. Each worker holds its own torch, Lightning and MLflow (up to 1.4 GB on a 2-core CPU), and most of the
    suite's time is interpreter start-ups and small single-threaded fits, which is what a second core
    overlaps; beyond a few workers the multi-process FSDP2 tests only compete for the same cores."""
    return max(1, min(len(os.sched_getaffinity(0)), WORKERS_MAX))


@pytest.fixture(autouse=True)
def _same_global_rng():
    """Every test starts from the same global RNG state, whatever ran before it in its process: with ``-n`` the
    tests a worker runs, and their order, change from run to run."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_spec() -> TinyJanusSpec:
    """The shape of the session's tiny checkpoint (a fresh copy: specs are mutable dataclasses)."""
    return TinyJanusSpec(**TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_janus_dir(tmp_path_factory, tiny_spec):
    """A tiny random Janus in ``save_pretrained`` layout (weights, config, tokenizer, processor)."""
    return save_tiny_janus(tmp_path_factory.mktemp("tiny_janus"), tiny_spec)


@pytest.fixture
def tiny_policy(tiny_janus_dir) -> JanusPolicy:
    """A fresh policy loaded from disk through the real loading path (tests may change its weights)."""
    return JanusPolicy(str(tiny_janus_dir))


@pytest.fixture
def sharp_policy(tiny_policy) -> JanusPolicy:
    """The loaded tiny policy with peaked distributions.

    A freshly initialised Janus is nearly uniform over image tokens (logit spread ~1e-2) and its context
    barely matters, so off-by-one positions, a wrong CFG branch or truncation would hardly move a
    log-prob. Larger query/key, generation-head and (untied, random) text-head weights make every
    such mistake visible.
    """
    model = tiny_policy.model
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        model.model.generation_head.proj_out.weight.mul_(10.0)
        model.model.generation_head.vision_head.weight.mul_(10.0)
        head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.3)
    model.lm_head = head
    return tiny_policy
