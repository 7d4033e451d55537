"""Static-KV-cache rollout engine: plans and CFG image tokens with one (optionally compiled) decode step per shape.

The eager loop in :mod:`modules.janus_ops` pays, per token, a full ``LlamaModel.forward`` (mask building,
``DynamicCache`` concatenation, output dataclasses): on a GPU it is bound by that host overhead, not by
the weights it reads. This engine keeps the semantics (same Gumbel-max sampling with the same
:class:`~modules.janus_ops.RowNoise` draws, same left padding and positions, same outputs) and changes
how a step runs:

* **Cache layout.** Per decoder layer one key and one value buffer ``[R, kv_heads, capacity, head_dim]``
  (``R`` = rows, both CFG branches: conditional rows first). Slot ``j`` of every row holds the token at
  column ``j`` of the left-padded context, then the sampled tokens; a row's position is
  ``slot - pad`` (``pad`` = its left padding), exactly what ``positions_from_mask`` gives the eager loop.
  The prompt is prefilled with the model's own forward (bit-identical to the eager loop), copied in,
  and its pad slots zeroed (a pad slot must hold finite numbers: masked attention still multiplies it).
* **Buckets.** ``capacity`` is ``context + new tokens`` rounded up to ``chunk`` (64 on CPU, 128 on CUDA) and
  never shrinks for a given row count, so contexts of different lengths reuse one buffer and one set of
  compiled steps. Attention reads only a *window* of the cache (the last window is the capacity), the
  smallest that covers the filled part, never the whole preallocated length: one window per ``chunk``
  when a new window costs a capture (``off``, ``cudagraphs``), ``chunk * 2^k`` when it costs a compile.
  ``attention="triton"`` reads each row's filled slots and nothing else, so its one window is the whole cache.
* **The step.** Generation head (or ``lm_head``), CFG mix, sampling, embedding of the sampled token and
  one decoder step over all layers are one function whose state (cache, hidden, slot, outputs, noise)
  lives in preallocated buffers that it updates in place. Only the uniform draw of the noise runs outside
  it, from the caller's generator, into a fixed buffer. On CUDA the function is captured by hand as one
  CUDA graph per (rows, capacity, window, sampling settings) and replayed. ``fused`` (the default on CUDA)
  first compiles the step's parts (:class:`StepParts`: sampling head, per-step inputs, one decoder layer,
  final norm) with inductor one by one, so every layer runs the same compiled layer and a window costs a
  few small compiles (seconds), then captures the whole step. ``cudagraphs`` captures the plain step
  (about one step's time to capture, slower steps). ``torch.compile(mode="reduce-overhead")`` fuses the
  whole step with inductor (minutes of compiling). Fixed buffer addresses are what make replay possible.
  On CPU the step runs uncompiled by default (faster at the toy shape once compile time counts).
* **Mixed precision.** Under autocast with fp32 weights the step's linear layers read a copy of their
  weights in the autocast dtype, refreshed per sampling call (``weight_copy``), instead of a cast per
  weight per token.

**Agreement with the eager loop.** Given the same noise, float32 gives the same tokens and per-token
log-probs within 1e-4 of the eager loop and of the teacher-forced ``janus_ops`` passes (measured: ~3e-6).
bfloat16 agrees within 0.1 per token with the teacher-forced pass, as the eager loop itself does (0.06 on
the deliberately sharp test model): rounding differs between one-token and whole-sequence matmuls, so a
bf16 rollout can also pick a different token where two are within rounding of each other.

**FSDP2.** The engine calls the decoder's projections directly, so it needs the full weights: it runs
inside ``bicot.parallel.gathered(model)`` (weights gathered once per rollout; the training step already
rolls out inside it) and refuses sharded weights with a message naming it. It enters through
:func:`janus_ops.model_entry`, so the root's FSDP2 state is initialised and its own parameters gathered.
Memory while rolling out: one unsharded copy of the model per process (Janus-Pro-1B in bf16 ~4 GB, 7B
~15 GB with the vision and VQ towers), plus the KV buffers, ``2 * layers * rows * kv_heads * head_dim *
capacity * bytes``: 1B shape, 16 prompts with CFG (32 rows), capacity 768: 4.8 GB (7B: 12 GB), and the
plan stage's (16 rows, capacity 256: 0.8 GB at 1B). Buffers stay allocated across sampling calls (stable
addresses keep CUDA graphs valid); :meth:`RolloutEngine.release` frees them, and a training rollout calls
:meth:`RolloutEngine.end_rollout`, which releases them unless a ``torch.compile`` mode would have to
re-record its graphs. When FSDP2 re-gathers the weights to other addresses, hand-captured graphs are
captured again and CUDA-graph trees re-record theirs (a capture, not a compile; torch stops re-recording
a graph after ``torch._inductor.config.triton.cudagraph_unexpected_rerecord_limit`` times).
Compiling raises ``torch._dynamo.config.recompile_limit`` to at least 64 for the whole process: every
(rows, capacity, window) variant is a recompile of the same step code.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from transformers import DynamicCache

from modules import fp8
from modules.janus_ops import (
    ImageSample,
    RowNoise,
    TextSample,
    guide,
    lm_hidden,
    model_entry,
    positions_from_mask,
    sample_tokens,
    scaled_logprobs,
)

COMPILE_MODES = ("auto", "off", "cudagraphs", "fused", "fused-autotune", "default", "reduce-overhead", "max-autotune")
FUSED_MODES = ("fused", "fused-autotune")  # the step's parts compiled one by one, the whole step captured by hand
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # each window variant is a compile
DEFAULT_CHUNK = {"cuda": 128, "cpu": 64}
# Each (rows, capacity, window, settings) variant of a step is one dynamo recompile of the same code.
RECOMPILE_LIMIT = 64
WEIGHTS = ("model", "fp8")  # what the step's decoder projections read (RolloutEngine(weights=...))


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-n // multiple) * multiple


def keeps_buffers(compile: str) -> bool:
    """Whether an engine of this ``compile`` setting keeps its buffers between training rollouts.

    Plain and hand-captured steps rebuild cheaply (a capture costs about one step), so the KV buffers and
    the weight copy need not sit in memory through the update. ``torch.compile``'s CUDA-graph trees would
    re-record at every rollout and stop graphing after a limit, so compiled modes keep them.
    """
    return compile in TORCH_COMPILE_MODES


def window_ladder(capacity: int, chunk: int, linear: bool = False) -> list[int]:
    """Attention windows for a cache of ``capacity`` slots, ending at ``capacity``.

    Doubling (``chunk, 2 chunk, 4 chunk, ...``) keeps compiled variants few; ``linear`` (every ``chunk``)
    reads at most ``chunk - 1`` unfilled slots per step, for steps whose variants are cheap to make.
    """
    ladder, w = [], chunk
    while w < capacity:
        ladder.append(w)
        w = w + chunk if linear else 2 * w
    return [*ladder, capacity]


def window_for(filled: int, ladder: list[int]) -> int:
    """The smallest window of ``ladder`` that covers ``filled`` slots."""
    return next(w for w in ladder if w >= filled)


# ---------------------------------------------------------------------------------------------
# The decode step: pure tensor code over preallocated buffers (what torch.compile sees).
# ---------------------------------------------------------------------------------------------


@dataclass
class _DrawnNoise:
    """Stands in for ``RowNoise`` inside the step: the uniforms were drawn outside, the transform is here.

    The formula is ``RowNoise.gumbel``'s; ``tests/modules/test_engine.py`` checks they agree bit for bit.
    """

    uniform: torch.Tensor  # [rows, V]

    def gumbel(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        return -torch.log(-torch.log(self.uniform.clamp(min=1e-20)))


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm's arithmetic (float32 statistics, cast, then the weight) in one fused call.
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # rotate_half(x) * sin == roll(x, D/2) * (sin with its first half negated): 4 ops instead of 7.
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _rotary(rotary, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin with its first half negated)``, ``[R, 1, 1, D]``: LlamaRotaryEmbedding's arithmetic.

    Written out rather than called so the step has no decorators or autocast regions to trace.
    """
    freqs = positions[:, None].float() * rotary.inv_freq.float()[None]  # [R, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [R, D]
    cos = (emb.cos() * rotary.attention_scaling).to(dtype)
    sin = (emb.sin() * rotary.attention_scaling).to(dtype)
    half = emb.shape[-1] // 2
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return cos[:, None, None], sin[:, None, None]


def _step_inputs(rotary, slot: torch.Tensor, pad: torch.Tensor, capacity: int, dtype: torch.dtype):
    """What every layer of one step shares: ``(cos, sin, bias)``, the rotary factors ``[R, 1, 1, D]`` of the new
    token and the attention bias ``[R, 1, 1, capacity]`` (0 over the row's real context and tokens so far, -inf
    elsewhere).

    ``slot``: ``[1]`` long, the cache slot of the new token (the same for every row); ``pad``: ``[R]`` long, each
    row's left padding. Independent of the window, so that under ``compile="fused"`` it compiles once.
    """
    cos, sin = _rotary(rotary, slot - pad, dtype)  # position = slot - left padding
    return cos, sin, attention_bias(pad, slot, capacity)


def attention_bias(pad: torch.Tensor, slot: torch.Tensor, capacity: int) -> torch.Tensor:
    """The additive attention bias ``[R, 1, 1, capacity]`` of the token at ``slot``: 0 over each row's real context
    and tokens so far (slots ``pad[r] .. slot``), -inf elsewhere (its left padding and the slots not yet filled)."""
    cols = torch.arange(capacity, device=pad.device)[None]  # [1, C]
    allowed = (cols >= pad[:, None]) & (cols <= slot)  # [R, C]
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=pad.device).masked_fill(~allowed, float("-inf"))
    return bias.view(pad.shape[0], 1, 1, capacity)


def _attend_matmul(q, keys, values, bias, scaling: float, pad=None, slot=None) -> torch.Tensor:
    """Attention of one query per row and head: ``q [R, kv_heads, groups, D]`` over ``keys``/``values``
    ``[R, kv_heads, W, D]`` with the additive ``bias [R, 1, 1, W]``; returns ``[R, kv_heads, groups, D]``.
    (``pad [R]``/``slot [1]``, the same mask as indices, are what :func:`_attend_triton` reads instead.)

    Batched one-row matmuls (cuBLAS), the scores and softmax in float32: the engine's default.
    """
    scores = (q @ keys.transpose(-1, -2)).float() * scaling  # [R, kv_heads, groups, W]
    probs = (scores + bias).softmax(-1).to(q.dtype)
    return probs @ values


def _attend_reduce(q, keys, values, bias, scaling: float, pad=None, slot=None) -> torch.Tensor:
    """As :func:`_attend_matmul`, written as multiply-and-sum reductions in float32, so that under
    ``compile="fused"`` inductor emits reduction kernels that stream the cache. Uncompiled it materialises a
    ``[R, kv_heads, groups, W, D]`` product per layer: meant for ``fused`` only."""
    scores = (q.float()[:, :, :, None, :] * keys.float()[:, :, None]).sum(-1) * scaling
    probs = (scores + bias).softmax(-1)
    return (probs[..., None] * values.float()[:, :, None]).sum(-2).to(q.dtype)


def _attend_sdpa(q, keys, values, bias, scaling: float, pad=None, slot=None) -> torch.Tensor:
    """As :func:`_attend_matmul`, through ``F.scaled_dot_product_attention`` with the bias as its mask (in the
    query's dtype, so softmax is not float32 throughout as in the other two)."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.to(q.dtype), scale=scaling)


def _attend_triton(q, keys, values, bias, scaling: float, pad=None, slot=None, launch=None) -> torch.Tensor:
    """As :func:`_attend_matmul`, in Triton kernels (:mod:`modules.decode_attention`, one or two) that read
    only each row's filled slots ``pad[r] .. slot`` (not a window past them), float32 throughout; ``bias`` is
    not read. ``keys``/``values`` may be pairs ``(float8 cache, float32 scale per slot)`` (``RolloutEngine(kv=
    "fp8")``). ``launch``: a ``decode_attention.Launch`` (default: the module's)."""
    if isinstance(keys, tuple):
        (keys, k_scale), (values, v_scale) = keys, values
        return torch.ops.bicot.decode_attention(q, keys, values, pad, slot, scaling, *(launch or ()), k_scale=k_scale,
                                                v_scale=v_scale)
    return torch.ops.bicot.decode_attention(q, keys, values, pad, slot, scaling, *(launch or ()))


def _store(cache, slot: torch.Tensor, vectors: torch.Tensor) -> None:
    """``vectors [R, kv_heads, 1, D]`` into slot ``slot`` of a layer's ``cache`` ``[R, kv_heads, S, D]``, in its dtype;
    a pair ``(float8 cache, float32 scales [R, kv_heads, S])`` takes each vector quantized with its own scale."""
    if isinstance(cache, tuple):
        q, scale = fp8.quantize(vectors)
        cache[0].view(torch.uint8).index_copy_(2, slot, q.view(torch.uint8))  # (no index_copy_ of float8 itself)
        cache[1].index_copy_(2, slot, scale)
    else:
        cache.index_copy_(2, slot, vectors.to(cache.dtype))  # under autocast projections and cache may differ


def _project_triton(x, weight, residual=None, gated=False, launch=None) -> torch.Tensor:
    """``F.linear(x, weight)`` in :mod:`modules.decode_linear`'s Triton kernel, ``residual`` added and (``gated``,
    ``weight`` the packed ``[gate; up]``) the MLP's activation applied inside it. ``weight`` may be a pair
    ``(float8 weight, float32 scale per row)`` (``RolloutEngine(weights="fp8")``). ``launch``: a
    ``decode_linear.LinearLaunch`` (default: the module's)."""
    if isinstance(weight, tuple):
        weight, scale = weight
        return torch.ops.bicot.decode_linear(x, weight, residual, gated, *(launch or ()), scale=scale)
    return torch.ops.bicot.decode_linear(x, weight, residual, gated, *(launch or ()))


PROJECT_MAX_ROWS = 64  # modules.decode_linear.MAX_ROWS (not imported here: it needs no Triton import)


def _plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None


ATTENTION = {"matmul": _attend_matmul, "reduce": _attend_reduce, "sdpa": _attend_sdpa, "triton": _attend_triton}
ATTENTION_CHOICES = ("auto", *ATTENTION)  # auto: see resolve_attention
FILLED_ONLY = ("triton",)  # attention choices that read only the filled slots: one window (the whole cache)


def check_float8(weights: str, kv: str, linear: str, attention: str, name: str = "engine {}") -> None:
    """A ``ValueError`` naming the setting where ``weights``/``kv`` is not one of :data:`WEIGHTS`, or ``fp8`` without
    the Triton kernels that read it (``linear``, ``attention``). ``name`` spells a setting (``engine weights``; the
    config's ``sampling.engine_{}``)."""
    for key, value in (("weights", weights), ("kv", kv)):
        if value not in WEIGHTS:
            raise ValueError(f"{name.format(key)} must be one of {WEIGHTS}, got {value!r}")
    if weights == "fp8" and linear == "torch":
        raise ValueError(f"{name.format('weights')} fp8 needs {name.format('linear')} triton (or a triton_lin_ launch "
                         "name): the Triton projections are what read float8 weights")
    if kv == "fp8" and attention not in ("triton", "auto"):
        raise ValueError(f"{name.format('kv')} fp8 needs {name.format('attention')} triton (or auto on a GPU): its "
                         f"kernels are what read a float8 cache, not {attention!r}")


def resolve_attention(attention: str, device: torch.device) -> str:
    """The attention used on ``device``: ``auto`` is ``triton`` on a CUDA GPU of compute capability 8.0 or later
    where the triton package imports (CUDA builds of torch ship it), ``matmul`` elsewhere; any other choice is
    itself."""
    if attention != "auto":
        return attention
    from modules import decode_attention

    return "triton" if decode_attention.runs_on(device) else "matmul"


def _decode_layer(
    layer, x, keys, values, cos, sin, bias, slot, window: int, attend=_attend_matmul, qkv=None, gate_up=None, pad=None,
    project=None, o=None, down=None,
) -> torch.Tensor:
    """One new token per row (``x [R, H]``) through one decoder layer, writing its key and value at ``slot`` of
    ``keys``/``values`` ``[R, kv_heads, capacity, head_dim]``; returns the layer's output ``[R, H]``. Attention
    (``attend``, one of :data:`ATTENTION`) reads slots ``[0, window)`` only (``slot < window``); ``bias`` is
    ``[R, 1, 1, window]`` (``pad [R]``, each row's left padding, the same mask for ``attention="triton"``).
    ``qkv``/``gate_up``: the layer's q, k, v (gate, up) weights packed into one matrix
    (``RolloutEngine(pack=True)``), one matmul instead of three (two); ``None``: the modules' own calls.
    ``project``: :func:`_project_triton` (``RolloutEngine(linear="triton")``) for the packed matrices and the plain
    o/down projections, with the residual adds and the activation inside its kernels, for up to
    :data:`PROJECT_MAX_ROWS` rows; ``None`` (or more rows): ``F.linear``. ``RolloutEngine(weights="fp8")``: ``qkv``,
    ``gate_up``, ``o`` and ``down`` are each ``(float8 weight, float32 scale per row)`` and ``project`` runs them all,
    whatever the rows (there is no bf16 weight to hand to cuBLAS)."""
    fp8_cache = isinstance(keys, tuple)  # RolloutEngine(kv="fp8"): (float8 cache, scales), Triton attention only
    cache = keys[0] if fp8_cache else keys
    rows, kv_heads, dim = x.shape[0], cache.shape[1], cache.shape[-1]
    if project is not None and rows > PROJECT_MAX_ROWS and o is None:
        project = None  # the Triton projections would read the weights once per 64 rows: cuBLAS reads them once
    attn = layer.self_attn
    h = _rms_norm(layer.input_layernorm, x)
    if qkv is None:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    else:
        width = kv_heads * dim
        packed = F.linear(h, qkv) if project is None else project(h, qkv)
        q, k, v = packed.split([packed.shape[-1] - 2 * width, width, width], -1)
    # One query per row: heads grouped by the KV head they share, [R, kv_heads, groups, D].
    q = _rope(q.view(rows, kv_heads, -1, dim), cos, sin)
    _store(keys, slot, _rope(k.view(rows, kv_heads, 1, dim), cos, sin))
    _store(values, slot, v.view(rows, kv_heads, 1, dim))
    if not fp8_cache:  # (the fp8 cache is read by the Triton attention only: one window, the whole cache)
        keys, values = keys[:, :, :window], values[:, :, :window]
    out = attend(q, keys, values, bias, attn.scaling, pad, slot).reshape(rows, -1)  # [R, kv_heads, groups, D]
    if o is not None or (project is not None and _plain_linear(attn.o_proj)):
        x = project(out, attn.o_proj.weight if o is None else o, x)
    else:
        x = x + attn.o_proj(out)
    mlp = layer.mlp
    h = _rms_norm(layer.post_attention_layernorm, x)
    if gate_up is None:
        act = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
    elif project is None:
        gate, up = F.linear(h, gate_up).chunk(2, -1)
        act = mlp.act_fn(gate) * up
    else:  # silu (RolloutEngine.bind checks the model's activation)
        act = project(h, gate_up, None, True)
    if down is not None or (project is not None and _plain_linear(mlp.down_proj)):
        return project(act, mlp.down_proj.weight if down is None else down, x)
    return x + mlp.down_proj(act)


def _finish(norm, x: torch.Tensor, state: dict) -> None:
    """The final norm into ``state["hidden"]``; every buffer moves on by one slot."""
    state["hidden"].copy_(_rms_norm(norm, x))
    state["slot"].add_(1)
    state["col"].add_(1)


def _image_head(model, state: dict, batch: int, use_cfg: bool, cfg_scale: float, sampling: tuple) -> torch.Tensor:
    """Sample one image token per row from ``state["hidden"]``, write the outputs at ``col``; returns the
    embeddings ``[R, H]`` of the sampled tokens (both CFG branches)."""
    temperature, top_k, top_p = sampling
    logits = model.model.generation_head(state["hidden"])  # [R, V]
    cond = logits[:batch]
    guided = guide(cond, logits[batch:] if use_cfg else None, cfg_scale)
    noise = None if state["uniform"] is None else _DrawnNoise(state["uniform"])
    tok, lp, entropy = sample_tokens(guided, temperature, top_k, top_p, noise)  # [B] each
    lp_cond = scaled_logprobs(cond, temperature).gather(-1, tok[:, None])  # [B, 1]
    col = state["col"]
    state["tokens"].index_copy_(1, col, tok[:, None])
    state["lp_guided"].index_copy_(1, col, lp[:, None])
    state["lp_cond"].index_copy_(1, col, lp_cond)
    state["entropy"].index_copy_(1, col, entropy[:, None])
    step_ids = torch.cat([tok, tok]) if use_cfg else tok  # [R]
    return model.prepare_embeddings_for_image_generation(step_ids)


def _text_head(model, state: dict, eos_id: int, pad_id: int, sampling: tuple) -> torch.Tensor:
    """Sample one text token per row (pad after a row's EOS), write the outputs at ``col``; returns its
    embeddings ``[R, H]``."""
    temperature, top_k, top_p = sampling
    noise = None if state["uniform"] is None else _DrawnNoise(state["uniform"])
    tok, lp, entropy = sample_tokens(
        model.lm_head(state["hidden"]), temperature, top_k, top_p, noise
    )  # [R] each
    live = ~state["finished"]
    tok = torch.where(live, tok, torch.full_like(tok, pad_id))
    col = state["col"]
    state["tokens"].index_copy_(1, col, tok[:, None])
    state["logp"].index_copy_(1, col, torch.where(live, lp, torch.zeros_like(lp))[:, None])
    state["entropy"].index_copy_(1, col, torch.where(live, entropy, torch.zeros_like(entropy))[:, None])
    state["valid"].index_copy_(1, col, live[:, None])
    state["finished"].logical_or_(tok == eos_id)
    return model.get_input_embeddings()(tok)


class StepParts:
    """The pieces of one decode step. Plain functions by default; under ``compile="fused"`` each is compiled by
    inductor on its own ("regional" compilation: the 24 or 30 decoder layers share one compiled layer, so a
    window costs a few small compiles instead of one of the whole unrolled model)."""

    def __init__(self, wrap=None, attention: str = "matmul", launch=None, project=None) -> None:
        wrap = wrap or (lambda fn: fn)
        self.inputs, self.layer, self.finish = wrap(_step_inputs), wrap(_decode_layer), wrap(_finish)
        self.attention, self.attend = attention, ATTENTION[attention]  # attend: an argument of the layer
        if attention == "triton" and launch is not None:  # another launch configuration than the module's
            self.attend = functools.partial(_attend_triton, launch=launch)
        self.project = project  # an argument of the layer: None (F.linear and the modules' calls) or the Triton one
        self.image_head, self.text_head = wrap(_image_head), wrap(_text_head)


PLAIN = StepParts()


def _advance(parts: StepParts, lm, x: torch.Tensor, state: dict, window: int) -> None:
    """The sampled tokens' embeddings ``x [R, H]`` through every decoder layer of ``lm`` (the ``LlamaModel``);
    writes their keys and values at ``state["slot"]`` and the final hidden states into ``state["hidden"]``.

    ``state["kv"]`` holds ``2 * layers`` buffers ``[R, kv_heads, capacity, head_dim]``: keys then values of each
    layer.
    """
    kv, slot, pad = state["kv"], state["slot"], state["pad"]
    if state.get("kv_scale") is not None:  # RolloutEngine(kv="fp8"): each cache with its scales per slot
        kv = list(zip(kv, state["kv_scale"], strict=True))
    cos, sin, bias = parts.inputs(lm.rotary_emb, slot, pad, state["kv"][0].shape[2], x.dtype)
    bias = bias[..., :window]  # one view per step, not one per layer
    for i, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
        # the layer's packed weights, (None, None) without pack=True; weights="fp8": (qkv, gate_up, o, down) quantized
        qkv, gate_up, *o_down = state["packed"][i]
        x = parts.layer(
            layer, x, kv[2 * i], kv[2 * i + 1], cos, sin, bias, slot, window, parts.attend, qkv, gate_up, pad,
            parts.project, *o_down,
        )
    parts.finish(lm.norm, x, state)


def image_step(
    model,
    state: dict,
    *,
    window: int,
    batch: int,
    use_cfg: bool,
    cfg_scale: float,
    sampling: tuple,
    parts: StepParts = PLAIN,
):
    """Sample one image token per row from ``state["hidden"]`` and advance every buffer by one slot.

    ``state`` holds ``kv``, ``hidden [R, H]``, ``slot [1]``, ``col [1]``, ``pad [R]``, ``uniform [B, V]`` (or
    ``None`` when greedy), ``packed`` (per layer ``(qkv, gate_up)``, see :meth:`RolloutEngine.bind`) and the outputs ``tokens``/``lp_cond``/``lp_guided``/``entropy`` ``[B, N]``, written at
    ``col``.
    """
    x = parts.image_head(model, state, batch, use_cfg, cfg_scale, sampling)
    _advance(parts, model.model.language_model, x, state, window)


def text_step(
    model, state: dict, *, window: int, eos_id: int, pad_id: int, sampling: tuple, parts: StepParts = PLAIN
):
    """Sample one text token per row (pad after a row's EOS) and advance every buffer by one slot.

    ``state`` as in :func:`image_step` plus ``finished [R]`` bool; outputs ``tokens``/``logp``/``valid``/``entropy``
    ``[R, T]``. Finished rows keep decoding pad tokens: rows never see each other, so this only costs
    compute, and it keeps one graph for the whole stage.
    """
    x = parts.text_head(model, state, eos_id, pad_id, sampling)
    _advance(parts, model.model.language_model, x, state, window)


# ---------------------------------------------------------------------------------------------
# The engine: buffers, prefill, compiled-step cache, the two sampling loops.
# ---------------------------------------------------------------------------------------------


@dataclass
class EngineStats:
    """What the engine spent. ``compile_s``: first calls of each new step (compile and graph capture)."""

    compile_s: float = 0.0
    variants: int = 0
    steps: int = 0
    captures: int = 0  # hand-captured CUDA graphs (``compile="cudagraphs"``), re-captures included


class RolloutEngine:
    """Samples plans and image tokens like :mod:`modules.janus_ops`, with a static KV cache.

    Args:
        compile: how the decode step runs. ``auto``: ``fused`` on CUDA (``cudagraphs`` where inductor cannot
            compile: see :meth:`mode`), ``off`` on CPU. ``off``: plain
            calls. ``cudagraphs``: the plain step captured by hand as one CUDA graph per window (a capture
            costs about one step, so every run is ahead of the eager loop from its first rollout).
            ``fused``: each part of the step compiled by inductor on its own (one compiled decoder layer serves
            every layer; windows after the second share a compile with a symbolic window), then on CUDA the
            whole step captured by hand as under ``cudagraphs``; on CPU the compiled parts run uncaptured.
            ``fused-autotune``: as ``fused``, with inductor's max-autotune: each matmul's Triton templates are
            benchmarked against cuBLAS and may take the norms and residual adds around them into one kernel
            (minutes of compiling, once per run; whether it pays is measured by ``benchmarks/rollout.py``).
            ``default``/``reduce-overhead``/``max-autotune``: ``torch.compile`` modes (``reduce-overhead``
            fuses the step with inductor and replays it as CUDA graphs: faster steps, minutes of compiling).
        chunk: capacity and window granularity in slots (default 128 on CUDA, 64 on CPU).
        weight_copy: under autocast (bf16-mixed training: fp32 master weights), the step's linear layers
            read a copy of their weights in the autocast dtype, refreshed at every sampling call, instead
            of casting every weight at every token. Same values as autocast's own casts; costs one
            autocast-dtype copy of those weights (Janus-Pro-1B: 2.8 GiB, 7B: 12.3 GiB) while buffers are held.
        attention: how a step attends over the cache (:data:`ATTENTION_CHOICES`): ``matmul`` (batched one-row
            matmuls, the default), ``reduce`` (multiply-and-sum reductions that inductor turns into kernels
            streaming the cache; for ``fused``), ``sdpa``, ``triton`` (:mod:`modules.decode_attention`: split-K
            Triton kernels that read only each row's filled slots, so one window, the whole cache, serves every
            step: one capture per cache size; CUDA only, needs the triton package), or ``auto``
            (:func:`resolve_attention`: ``triton`` where it runs, ``matmul`` elsewhere). Same results within rounding; which is fastest
            on a GPU is what ``benchmarks/decode_kernels.py`` and ``benchmarks/rollout.py`` measure (on an H200
            at the 1B shape: ``triton`` with ``pack``).
        triton_launch: the Triton kernels' launch configuration where ``attention`` is ``triton`` (or ``auto`` on
            CUDA), by name: ``triton_s<split>_b<block>_w<warps>_p<stages>`` or ``triton_n<parts>_...``
            (:class:`modules.decode_attention.Launch`; ``benchmarks/decode_kernels.py --triton-sweep`` names the
            fastest); default: :mod:`modules.decode_attention`'s ``SPLIT``, ``BLOCK``, ``WARPS`` and ``STAGES``.
        pack: each decoder layer's q/k/v and gate/up weights packed into one matrix each, read by one matmul
            instead of three and two (wider matmuls, fewer launches). Under autocast with ``weight_copy`` the
            packed matrices hold the autocast copies, at no extra memory; otherwise they are a copy of those
            weights while the buffers are held (Janus-Pro-1B in bf16: 1.7 GB, 7B: 8.4 GB). LoRA-wrapped
            projections are not packed.
        linear: how the step's projections run. ``torch`` (the default): ``F.linear`` and the modules' own calls
            (cuBLAS on a GPU). ``triton``, or a launch configuration's name ``triton_lin_n<N>_k<K>_s<S>_w<W>_p<P>``
            (:class:`modules.decode_linear.LinearLaunch`): :mod:`modules.decode_linear`'s kernels for the packed
            q/k/v and gate/up matrices and the plain o/down projections, the residual adds and the MLP's
            activation inside them (four kernels per layer, and one more per projection whose inner dimension
            is split across programs: up to eight, as cuBLAS's path has). Needs ``pack`` and ``weight_copy`` (under autocast
            the kernels read the autocast copies) and the triton package; CUDA only (CPU: Triton's interpreter,
            for tests). Whether it beats cuBLAS is what ``benchmarks/decode_kernels.py --linear-sweep`` measures.
        weights: the weights the step's decoder projections read. ``model`` (the default): the model's own (or
            their autocast copies and packs). ``fp8``: a float8 (e4m3) copy of every decoder layer's q/k/v, o,
            gate/up and down weights, one float32 scale per output row (:func:`modules.fp8.quantize`),
            quantized from the live weights at every sampling call: half the bytes a bf16 step reads for them, the
            bandwidth that bounds a decode step at the 7B shape. It samples from an approximation of the policy
            (per weight, a relative rounding of up to 1/16; the heads, embeddings and the prefill keep the model's
            weights), so the rollout's log-probs differ from the update's more than bf16's rounding does:
            ``train/rollout_kl/*`` shows by how much in a run. Needs ``linear`` Triton (its kernels read fp8) and
            bias-free projections (a LoRA-adapted one is quantized with its adapters merged, in float32);
            costs 1 byte per projection weight and no bf16 packs (Janus-Pro-1B: 1.2 GB, 7B: 6.1 GB).
        kv: the KV cache's dtype. ``model`` (the default): the dtype the model computes in (autocast's under
            autocast). ``fp8``: float8 (e4m3), each slot's key and value vector (per row and KV head) with its own
            float32 scale (:func:`modules.fp8.quantize`), written as each token is and from
            the prefill: half a bf16 cache's bytes plus 4 per vector (3% at head size 128), the other half of the
            bytes a decode step reads at the 7B shape. Attention then reads dequantized keys and values (a
            relative rounding of up to 1/16 of each vector's largest entry). Needs ``attention`` ``triton`` (or
            ``auto`` where that is Triton): only its kernels read a float8 cache.
    """

    def __init__(
        self,
        compile: str = "auto",
        chunk: int | None = None,
        weight_copy: bool = True,
        attention: str = "matmul",
        pack: bool = False,
        triton_launch: str | None = None,
        linear: str = "torch",
        weights: str = "model",
        kv: str = "model",
    ) -> None:
        if compile not in COMPILE_MODES:
            raise ValueError(f"engine compile must be one of {COMPILE_MODES}, got {compile!r}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"engine chunk must be >= 1, got {chunk}")
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"engine attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
        if attention == "triton":
            from modules import decode_attention  # registers bicot::decode_attention

            decode_attention.require()
        self.launch = None  # the parsed triton_launch (None: decode_attention's defaults)
        if triton_launch is not None:
            from modules.decode_attention import Launch

            if attention not in ("triton", "auto"):
                raise ValueError(f"engine triton_launch is for attention 'triton' or 'auto', not {attention!r}")
            self.launch = Launch.parse(triton_launch)  # a clear error now, not at the first step
        self.linear_launch = None  # linear="triton_lin_...": the parsed launch (None: decode_linear's defaults)
        if linear != "torch":
            from modules import decode_attention, decode_linear  # registers bicot::decode_linear

            try:
                self.linear_launch = decode_linear.LinearLaunch.of(linear)
            except ValueError as error:
                raise ValueError(f"engine {error}") from None
            decode_attention.require("linear", "torch")
            if not (pack and weight_copy):
                raise ValueError(
                    "engine linear 'triton' needs pack=True (its kernels read the packed q/k/v and gate/up matrices) "
                    "and weight_copy=True (under autocast they read the autocast copies)"
                )
        check_float8(weights, kv, linear, attention)
        self.compile, self.chunk, self.weight_copy, self.attention = compile, chunk, weight_copy, attention
        self.pack, self.linear, self.weights, self.kv = pack, linear, weights, kv
        self.stats = EngineStats()
        self.graphs = CudaGraphs()  # capture and replay for compile="cudagraphs"
        self._buffers: dict[tuple, dict] = {}
        self._steps: dict[tuple, list] = {}  # key -> [callable, calls so far, captured by hand]
        self._addresses: tuple = ()  # what the hand-captured graphs of the current call read
        self._parts: StepParts | None = None  # compile="fused": the compiled parts of the step
        self._auto_cuda: str | None = None  # what compile="auto" means on CUDA, once asked (see mode)
        self._packed: list | None = None  # pack=True: the current sampling call's packed weights (step_weights)

    def __getstate__(self) -> dict:
        # Compiled callables and CUDA graphs do not pickle and buffers are per process: a copy starts empty.
        return {
            "compile": self.compile,
            "chunk": self.chunk,
            "weight_copy": self.weight_copy,
            "attention": self.attention,
            "pack": self.pack,
            "launch": self.launch,
            "linear": self.linear,
            "linear_launch": self.linear_launch,
            "weights": self.weights,
            "kv": self.kv,
            "stats": EngineStats(),
            "graphs": CudaGraphs(),
            "_buffers": {},
            "_steps": {},
            "_addresses": (),
            "_parts": None,
            "_auto_cuda": None,
            "_packed": None,
        }

    @property
    def triton_launch(self) -> str | None:
        """The Triton attention's launch configuration by name (``None``: decode_attention's defaults)."""
        return None if self.launch is None else self.launch.name

    def release(self) -> None:
        """Free the KV and step buffers and the hand-captured graphs that read them.

        Compiled steps stay; with new buffers ``reduce-overhead`` re-records its graphs and ``cudagraphs``
        captures again.
        """
        self._buffers.clear()
        for step, *_ in self._steps.values():
            if isinstance(step, _CapturedStep):
                step.drop()  # stays warm: the next call captures straight away
        # every graph of the pool is gone, and CUDA's allocator frees a pool with its last graph: a new one
        self.graphs.pool = None

    def end_rollout(self) -> None:
        """Called after a training rollout's last sampling call: frees the buffers where that is cheap
        (see :func:`keeps_buffers`)."""
        if not keeps_buffers(self.compile):
            self.release()

    def mode(self, device: torch.device) -> str:
        """The compile mode used on ``device`` (``off`` means plain eager calls of the step).

        ``auto`` is ``off`` on CPU. On CUDA it is ``fused`` when inductor compiles a probe kernel there (asked
        once per engine; the probe's seconds count as compile time), else ``cudagraphs``, with a warning that
        names the error: a machine without a working Triton or C compiler still samples fast.
        """
        if self.compile != "auto":
            return self.compile
        if device.type != "cuda":
            return "off"
        if self._auto_cuda is None:
            start = time.perf_counter()
            self._auto_cuda = "fused" if inductor_compiles(device) else "cudagraphs"
            self.stats.compile_s += time.perf_counter() - start
        return self._auto_cuda

    def attention_on(self, device: torch.device) -> str:
        """The attention choice used on ``device`` (``auto`` resolved: :func:`resolve_attention`)."""
        return resolve_attention(self.attention, device)

    def ladder(self, capacity: int, device: torch.device) -> list[int]:
        """The attention windows of a cache: one per chunk when a variant costs a capture, doubling when a compile;
        only the whole cache where attention reads just the filled slots (``attention="triton"``)."""
        if self.attention_on(device) in FILLED_ONLY:
            return [capacity]
        return window_ladder(capacity, self._chunk(device), linear=self.mode(device) not in TORCH_COMPILE_MODES)

    @contextlib.contextmanager
    def step_weights(self, model, device: torch.device):
        """Inside: the weights the step reads. Under autocast the step's linear layers hold copies of their weights
        in the autocast dtype (see ``weight_copy``); with ``pack`` each decoder layer's q/k/v and gate/up
        weights also sit packed in one matrix each, which :meth:`bind` hands to the step. With ``weights="fp8"``
        the decoder's projections are quantized instead (no copies, no bf16 packs of them) and :meth:`bind` hands
        the step their float8 matrices and scales.

        Copies, packed and quantized matrices live in the engine's buffers (fixed addresses, so captured graphs
        stay valid across optimizer steps and FSDP2 re-gathers) and are refreshed from the live weights on entry. A
        layer's autocast copies of q/k/v (gate/up) are views of its packed matrix, so packing costs no memory under
        autocast; without it, the packed matrices are a copy of those weights. The modules get their own weights
        back on exit.
        """
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        copied = [] if not self.weight_copy or dtype is None else _step_linears(model, dtype)
        groups = _packable(model) if self.pack and self.weights == "model" else []
        quantized = None
        if self.weights == "fp8":
            entry = self._quantize(model, device)
            quantized = entry["packed"]
            projections = {id(sub) for m, *_ in entry["targets"] for sub in m.modules()}  # LoRA's linears included
            copied = [m for m in copied if id(m) not in projections]  # the step reads their fp8 copies
        self._packed = None
        if not copied and not groups:
            self._packed = quantized
            try:
                yield
            finally:
                self._packed = None
            return
        weights = [m._parameters["weight"] for m in copied]
        key = ("step_weights", id(model), dtype, device)
        signature = [(w.shape, w.dtype) for w in weights], [[(m.weight.shape, m.weight.dtype) for m in g] for g in groups]
        entry = self._buffers.get(key)
        if entry is None or entry["signature"] != signature:
            entry = self._buffers[key] = _weight_buffers(copied, groups, dtype, signature)
        with torch.no_grad():
            torch._foreach_copy_(
                entry["copies"] + entry["pack_views"],
                [w.detach() for w in weights + [m.weight for m in entry["pack_modules"]]],
            )
        self._packed = quantized or entry["packed"]
        try:
            for module, copy in zip(copied, entry["copies"], strict=True):
                module._parameters["weight"] = copy
            yield
        finally:
            self._packed = None
            for module, weight in zip(copied, weights, strict=True):
                module._parameters["weight"] = weight

    def _quantize(self, model, device: torch.device) -> dict:
        """``weights="fp8"``: the decoder's projections quantized from the live weights into the engine's buffers
        (fixed addresses); returns :func:`_fp8_buffers`'s entry (``packed``: per layer ``(qkv, gate_up, o, down)``,
        each ``(float8 weight, float32 scale per row)``)."""
        layers = quantizable(model)
        signature = [[(_base_linear(m).weight.shape, _base_linear(m).weight.dtype) for m in group] for layer in layers
                     for group in layer]
        key = ("fp8", id(model), device)
        entry = self._buffers.get(key)
        if entry is None or entry["signature"] != signature:
            entry = self._buffers[key] = _fp8_buffers(layers, signature)
        # a LoRA layer's weight with its adapters merged in full precision (autocast would round B @ A to bf16)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for module, q, scale in entry["targets"]:
                fp8.quantize(_live_weight(module), q, scale)
        return entry

    def captures(self, device: torch.device) -> bool:
        """Whether steps on ``device`` are captured by hand as CUDA graphs (``cudagraphs``; ``fused`` on CUDA)."""
        mode = self.mode(device)
        return mode == "cudagraphs" or (mode in FUSED_MODES and self.graphs.available(device))

    def bind(self, model, state: dict) -> None:
        """Hand this call's packed weights (``pack``) to the step's ``state``, and note the addresses a captured
        step reads (weights, buffers); a step captured at others is re-captured.

        Called once per sampling call: under FSDP2 every gather may put the full weights elsewhere. The
        optimizer updates weights in place, so after a step the graphs read the new values.
        """
        from modules.decode_attention import check_device

        device = state["hidden"].device
        if self.attention_on(device) == "triton":
            check_device(device)
        elif self.kv == "fp8":
            raise RuntimeError(f"engine kv 'fp8' needs the triton attention, and attention {self.attention!r} is "
                               f"{self.attention_on(device)!r} on {device}")
        if "fp8" in (self.weights, self.kv) and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            what = "weights" if self.weights == "fp8" else "kv"
            raise RuntimeError(f"engine {what} 'fp8' needs a GPU with float8 support (compute capability 8.9 or "
                               f"later: Ada, Hopper, Blackwell); this {torch.cuda.get_device_name(device)} has "
                               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}. Use {what} 'model'")
        if self.linear != "torch":
            check_device(device, "linear", "torch")
            act = getattr(model.model.language_model.config, "hidden_act", "silu")
            if act != "silu":
                raise ValueError(f"engine linear 'triton' computes the MLP's silu in its kernel; this model's is {act!r}")
        layers = model.model.language_model.config.num_hidden_layers
        state["packed"] = self._packed or [(None, None)] * layers  # per layer (qkv, gate_up)
        if not self.captures(device):
            return
        tensors = [*model.parameters(), *model.buffers(), *state["kv"], *(state.get("kv_scale") or ())]
        tensors += [v for k, v in state.items() if k != "kv" and isinstance(v, torch.Tensor)]
        tensors += [t for layer in self._packed or () for t in _tensors(layer)]
        self._addresses = tuple(t.data_ptr() for t in tensors)

    def sample_text(
        self,
        model,
        ids,
        mask,
        max_new_tokens,
        eos_id,
        pad_id,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        noise=None,
    ) -> TextSample:
        """Same contract as :func:`janus_ops.sample_text` (``ids``/``mask`` ``[B, Lc]`` left-padded)."""
        return _run_text(
            model, self, ids, mask, max_new_tokens, eos_id, pad_id, (temperature, top_k, top_p), noise
        )

    def sample_image_tokens(
        self,
        model,
        cond_ids,
        cond_mask,
        num_tokens,
        uncond_ids=None,
        cfg_scale=1.0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        noise=None,
    ) -> ImageSample:
        """Same contract as :func:`janus_ops.sample_image_tokens` (``cond_ids``/``cond_mask`` ``[B, L]``)."""
        sampling = (temperature, top_k, top_p)
        return _run_image(
            model, self, cond_ids, cond_mask, num_tokens, uncond_ids, cfg_scale, sampling, noise
        )

    # ---- buffers -------------------------------------------------------------------------------
    def _chunk(self, device: torch.device) -> int:
        return self.chunk or DEFAULT_CHUNK.get(device.type, DEFAULT_CHUNK["cuda"])

    def buffers(self, model, kind: str, rows: int, needed: int, outputs: dict, device, dtype) -> dict:
        """The state of one stage, reused across rollouts; capacity grows to ``needed`` slots, never shrinks.

        Args:
            outputs: name -> ``(shape, dtype)`` of the per-token output buffers.
            dtype: of the hidden state (the model's); the cache takes autocast's dtype when autocast is on.
        """
        cfg = model.model.language_model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
        if self.kv == "fp8":
            kv_dtype = fp8.FP8
        key = (kind, rows, device, dtype, kv_dtype, tuple((n, s, d) for n, (s, d) in sorted(outputs.items())))
        state = self._buffers.get(key)
        capacity = round_up(needed, self._chunk(device))
        if state is None or state["kv"][0].shape[2] < capacity:
            shape = (rows, cfg.num_key_value_heads, capacity, head_dim)
            # zeros, not empty: masked slots are still multiplied by 0 in attention, so they must be finite
            kv = [torch.zeros(shape, device=device, dtype=kv_dtype) for _ in range(2 * cfg.num_hidden_layers)]
            # kv="fp8": each slot's scale (1 in a pad slot, whose vector is 0)
            scales = None if self.kv != "fp8" else [
                torch.ones(shape[:3], device=device, dtype=torch.float32) for _ in range(2 * cfg.num_hidden_layers)]
            state = dict(
                kv=kv,
                kv_scale=scales,
                hidden=torch.zeros(rows, cfg.hidden_size, device=device, dtype=dtype),
                slot=torch.zeros(1, dtype=torch.long, device=device),
                col=torch.zeros(1, dtype=torch.long, device=device),
                pad=torch.zeros(rows, dtype=torch.long, device=device),
                finished=torch.zeros(rows, dtype=torch.bool, device=device),
                **{n: torch.zeros(s, dtype=d, device=device) for n, (s, d) in outputs.items()},
            )
            if self.mode(device) in TORCH_COMPILE_MODES:
                for t in [*state["kv"], *(scales or ()), *(v for k, v in state.items() if k not in ("kv", "kv_scale"))]:
                    torch._dynamo.mark_static_address(t)  # fixed addresses: CUDA graphs update them in place
            self._buffers[key] = state
        return state

    def noise_buffer(self, noise: RowNoise | None, rows: int, vocab: int, device, greedy: bool):
        """``(full [global_rows, V], view [rows, V])``: where :meth:`draw` puts each step's uniforms."""
        if greedy:
            return None, None
        noise = noise or RowNoise()
        total = noise.global_rows or rows
        if noise.offset + rows > total:
            raise ValueError(f"noise rows {noise.offset}+{rows} exceed the global batch of {total}")
        key = ("noise", total, vocab, device)
        if key not in self._buffers:
            self._buffers[key] = {"full": torch.empty(total, vocab, device=device), "views": {}}
        entry = self._buffers[key]
        view = entry["views"].get((noise.offset, rows))
        if view is None:
            # one view object per slice: the step sees the same tensor every call
            view = entry["views"][(noise.offset, rows)] = entry["full"][noise.offset : noise.offset + rows]
            if self.mode(device) in TORCH_COMPILE_MODES:
                torch._dynamo.mark_static_address(view)
        return entry["full"], view

    @staticmethod
    def draw(noise: RowNoise | None, full: torch.Tensor | None) -> None:
        """This step's uniforms, the same numbers ``RowNoise.gumbel`` draws (global batch, then sliced)."""
        if full is not None:
            generator = noise.generator if noise is not None else None
            torch.rand(*full.shape, generator=generator, device=full.device, out=full)

    # ---- compiled steps ------------------------------------------------------------------------
    def run_step(self, fn, model, state: dict, key: tuple, **consts) -> None:
        """Run ``fn(model, state, **consts)``, compiled once per key; times the first calls of each variant."""
        device = state["hidden"].device
        mode = self.mode(device)
        full_key = (fn.__name__, id(model), mode, *key, tuple(sorted(consts.items())))
        entry = self._steps.get(full_key)
        if entry is None:
            captured = self.captures(device)
            entry = [self._make(fn, model, consts, mode, captured, self.attention_on(device)), 0, captured]
            self._steps[full_key] = entry
            self.stats.variants += 1
        captured = entry[2]
        if captured:
            step = entry[0]
            ready = step.ready(self._addresses)
            timed = not ready  # a warm-up or a capture
        else:
            # CUDA graphs are recorded on the 2nd or 3rd call (warm-up first): count those as capture time.
            timed = entry[1] < (3 if mode == "reduce-overhead" else 1) and mode != "off"
        if timed:
            _sync(device)
            start = time.perf_counter()
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        try:
            if captured:
                self.stats.captures += step(state, self._addresses, ready)
            else:
                entry[0](state)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # inductor's errors (InductorError) among them
            raise RuntimeError(
                f"the rollout engine's decode step does not compile here (engine_compile {mode!r}): "
                f"{_first_line(error)}. Set sampling.engine_compile to 'cudagraphs' (CUDA) or 'off', which "
                "run the step uncompiled."
            ) from error
        if timed:
            _sync(device)
            self.stats.compile_s += time.perf_counter() - start
        entry[1] += 1
        self.stats.steps += 1

    def _make(self, fn, model, consts: dict, mode: str, captured: bool, attention: str):
        parts = self._fused_parts(mode, attention) if mode in FUSED_MODES else self._step_parts(None, attention)
        consts = {**consts, "parts": parts}

        def step(state: dict) -> None:
            fn(model, state, **consts)

        if captured:
            return _CapturedStep(step, self.graphs)
        if mode == "off" or mode in FUSED_MODES:
            return step
        _raise_recompile_limit()
        # dynamic=False: each window is its own static graph (CUDA graphs need fixed shapes).
        return torch.compile(step, mode=None if mode == "default" else mode, dynamic=False, fullgraph=True)

    def _fused_parts(self, mode: str, attention: str) -> StepParts:
        """The step's parts, each compiled by inductor (made once per engine; variants are dynamo recompiles).

        ``dynamic=None``: dynamo's automatic dynamic shapes. The first window compiles static; the second
        recompiles the layer with the window (and the rows, when the other stage comes) symbolic, and later
        windows reuse it. A captured graph still has fixed shapes: it records the kernels at one window.
        """
        if self._parts is None or self._parts.attention != attention:  # auto: per device
            cost = "about 20 s at the Janus-Pro-1B shape on an H200" if mode == "fused" else "minutes (max-autotune)"
            rank_zero_info(
                f"RolloutEngine: compiling the decode step with inductor (engine_compile {mode}), once per run: "
                f"{cost}; engine_compile cudagraphs starts without compiling."
            )
            _raise_recompile_limit()
            options = dict(dynamic=None, fullgraph=True)
            if mode == "fused-autotune":
                options["mode"] = "max-autotune-no-cudagraphs"  # the engine captures the graphs itself
            self._parts = self._step_parts(lambda part: torch.compile(part, **options), attention)
        return self._parts

    def _step_parts(self, wrap, attention: str) -> StepParts:
        """The step's parts with this engine's kernels: ``attention`` resolved, the Triton launches, ``linear``."""
        project = None if self.linear == "torch" else functools.partial(_project_triton, launch=self.linear_launch)
        return StepParts(wrap, attention=attention, launch=self.launch, project=project)


def inductor_compiles(device: torch.device) -> bool:
    """Whether inductor compiles and runs a small kernel on ``device``; warns with the error where it cannot."""
    try:
        probe = torch.compile(_probe, fullgraph=True, dynamic=False)
        x = torch.arange(8, dtype=torch.float32, device=device)
        if not torch.equal(probe(x).cpu(), _probe(x).cpu()):
            raise RuntimeError("the compiled probe kernel gave other values than eager")
        return True
    except Exception as error:  # a missing Triton or C compiler surfaces as many exception types
        warnings.warn(
            f"engine compile='auto': inductor cannot compile on {device} ({_first_line(error)}); "
            "using 'cudagraphs' (hand-captured, uncompiled steps) instead of 'fused'. Set "
            "sampling.engine_compile explicitly to choose.",
            stacklevel=3,
        )
        return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _probe(x: torch.Tensor) -> torch.Tensor:
    # a pointwise chain and a reduction, integer-valued: exact in float32 whatever the kernel's order
    y = (x * 2 + 1) * (x - 3)
    return y - y.amax()


def _raise_recompile_limit() -> None:
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)


class CudaGraphs:
    """How ``compile="cudagraphs"`` warms a step up and captures it (swappable: the CPU tests use a stand-in).

    All graphs of an engine share one memory pool: they run one after another and keep nothing alive
    between replays (every result goes into the engine's buffers), so their temporaries can share memory.
    """

    def __init__(self) -> None:
        self.pool = None

    @staticmethod
    def available(device: torch.device) -> bool:
        """Whether steps on ``device`` can be captured (``compile="fused"`` runs uncaptured where not)."""
        return device.type == "cuda"

    def warmup(self, run, device: torch.device) -> None:
        """Run ``run()`` once on a side stream, as CUDA graph capture asks (lazy library set-up happens here)."""
        with _side_stream(device):
            run()

    def capture(self, run, device: torch.device):
        """Record ``run()`` into a CUDA graph without executing it; returns the graph's ``replay``.

        ``torch.cuda.graph``'s steps by hand, minus its ``empty_cache``: captures happen at every rollout
        when the buffers are released between rollouts, and emptying the allocator each time would cost
        fresh ``cudaMalloc`` calls afterwards.
        """
        with _side_stream(device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(device)
            graph.capture_begin(pool=self.pool)
            try:
                run()
            finally:
                graph.capture_end()
        return graph.replay


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Inside: a fresh side stream that waits for the current one (and is waited for on exit), and autocast
    without its cast cache. Warm-up and capture both run there."""
    if device.type != "cuda":
        raise RuntimeError(f"engine compile='cudagraphs' needs a CUDA device, got {device}; use 'off' or 'default'")
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side), _uncached_autocast(device):
        yield
    current.wait_stream(side)


def _uncached_autocast(device: torch.device):
    """Autocast as it is, without its weight-cast cache: a captured graph must do its own casts.

    A cast cached outside the graph is freed when the caller's autocast region ends, and the graph would
    go on reading it; cast inside the graph, the bf16 copy of each weight is remade at every replay.
    """
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)


class _CapturedStep:
    """One step variant under ``compile="cudagraphs"``: warm-up, capture, then replays.

    The first call runs the step eagerly on a side stream: that is both the warm-up capture needs and the
    step itself. The second call captures the step (capture executes nothing) and replays it once; later
    calls replay. When the weights or buffers sit at other addresses than at capture, the next call
    captures again.
    """

    def __init__(self, step, graphs: CudaGraphs) -> None:
        self.step, self.graphs = step, graphs
        self.warm = False
        self.replay = None
        self.addresses: tuple = ()

    def drop(self) -> None:
        """Forget the graph (its buffers are gone); the next call captures again."""
        self.replay, self.addresses = None, ()

    def ready(self, addresses: tuple) -> bool:
        """Whether the next call only replays.

        ``addresses`` is one tuple per sampling call (:meth:`RolloutEngine.bind`): compared by value once per
        call, then by identity at every step of it.
        """
        if self.replay is None:
            return False
        if self.addresses is not addresses:
            if self.addresses != addresses:
                return False
            self.addresses = addresses
        return True

    def __call__(self, state: dict, addresses: tuple, ready: bool) -> int:
        """Run one step (``ready``: what :meth:`ready` said); returns 1 when it captured a graph, else 0."""
        device = state["hidden"].device
        if ready:
            self.replay()
            return 0
        if not self.warm:
            self.graphs.warmup(lambda: self.step(state), device)
            self.warm = True
            return 0
        self.replay = self.graphs.capture(lambda: self.step(state), device)
        self.addresses = addresses
        self.replay()
        return 1


def _packable(model) -> list[list[torch.nn.Linear]]:
    """Per decoder layer, its q/k/v and its gate/up projections (two groups, in that order; an empty group where
    they cannot be packed: a LoRA-wrapped projection, a bias, or dtypes that differ)."""
    lm = model.model.language_model
    groups = []
    for layer in lm.layers[: lm.config.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
            plain = all(type(m) is torch.nn.Linear and m.bias is None for m in group)
            same = plain and len({(m.weight.dtype, m.weight.shape[1]) for m in group}) == 1
            groups.append(group if same else [])
    return groups


def _weight_buffers(copied: list, groups: list, dtype, signature) -> dict:
    """The buffers of :meth:`RolloutEngine.step_weights`.

    ``copies``: one per copied linear (for a packed one, a view of its pack). ``pack_views``/``pack_modules``: the
    views of packed weights that are not copied anyway, and their modules (the weights are read at every
    refresh: FSDP2 may gather them elsewhere). ``packed``: per layer ``(qkv, gate_up)``, a matrix or None.
    ``signature``: the weights' shapes and dtypes they were made for.
    """
    copy_of = {id(m): i for i, m in enumerate(copied)}
    copies: list = [None] * len(copied)
    pack_views, pack_modules, packs = [], [], []
    for group in groups:
        if not group:
            packs.append(None)
            continue
        # the autocast dtype where the weights are copied for autocast, else the weights' own
        target = dtype if id(group[0]) in copy_of else group[0].weight.dtype
        pack = torch.empty(sum(m.weight.shape[0] for m in group), group[0].weight.shape[1], dtype=target,
                           device=group[0].weight.device)
        views = pack.split([m.weight.shape[0] for m in group])
        for module, view in zip(group, views, strict=True):
            if id(module) in copy_of:
                copies[copy_of[id(module)]] = view
            else:
                pack_views.append(view)
                pack_modules.append(module)
        packs.append(pack)
    for i, m in enumerate(copied):
        if copies[i] is None:
            copies[i] = torch.empty_like(m._parameters["weight"], dtype=dtype)
    packed = [(packs[i], packs[i + 1]) for i in range(0, len(packs), 2)] if packs else None
    return dict(copies=copies, pack_views=pack_views, pack_modules=pack_modules, packed=packed, signature=signature)


def _base_linear(module):
    """The linear layer a LoRA adapter wraps, or ``module`` itself."""
    from modules.lora import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _live_weight(module) -> torch.Tensor:
    """The weight ``module`` applies (a LoRA layer's merged with its adapters: :func:`modules.lora.merged_weight`)."""
    from modules.lora import BaseTunerLayer, merged_weight

    return merged_weight(module) if isinstance(module, BaseTunerLayer) else module.weight


def quantizable(model) -> list[tuple[list[torch.nn.Module], ...]]:
    """Per decoder layer its ``([q, k, v], [gate, up], [o], [down])`` projections, for ``weights="fp8"``: bias-free
    ``nn.Linear`` layers, LoRA-adapted or not (an adapted one is quantized with its adapters merged); a
    ``ValueError`` that names the first one that is neither."""
    lm = model.model.language_model
    layers = []
    for i, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
        attn, mlp = layer.self_attn, layer.mlp
        groups = ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj], [attn.o_proj], [mlp.down_proj])
        for name, module in zip(("q", "k", "v", "gate", "up", "o", "down"), [m for g in groups for m in g], strict=True):
            base = _base_linear(module)
            if not _plain_linear(base):
                raise ValueError(
                    f"engine weights 'fp8' quantizes bias-free nn.Linear projections (LoRA-adapted or not); layer "
                    f"{i}'s {name}_proj is a {type(base).__name__}"
                    f"{' with a bias' if getattr(base, 'bias', None) is not None else ''}: sample with engine weights "
                    "'model'"
                )
        layers.append(groups)
    return layers


def _fp8_buffers(layers: list, signature) -> dict:
    """The buffers of ``weights="fp8"``: per layer ``packed`` ``((q, scale) of qkv, of gate_up, of o, of down)``,
    float8 ``[rows, K]`` and float32 ``[rows]`` each; ``targets``: ``(module, q view, scale view)`` to quantize."""
    packed, targets = [], []
    for groups in layers:
        pairs = []
        for group in groups:
            weight = _base_linear(group[0]).weight
            sizes = [_base_linear(m).weight.shape[0] for m in group]
            q = torch.empty(sum(sizes), weight.shape[1], dtype=fp8.FP8, device=weight.device)
            scale = torch.empty(sum(sizes), dtype=torch.float32, device=weight.device)
            for module, q_view, scale_view in zip(group, q.split(sizes), scale.split(sizes), strict=True):
                targets.append((module, q_view, scale_view))
            pairs.append((q, scale))
        packed.append(tuple(pairs))
    return dict(packed=packed, targets=targets, signature=signature)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in nested tuples (a layer's packed weights)."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value or () for t in _tensors(item)]


def _step_linears(model, dtype: torch.dtype) -> list[torch.nn.Linear]:
    """The linear layers a decode step runs (LoRA's included) whose weights autocast would cast to ``dtype``."""
    parts = [model.model.language_model, model.model.generation_head, model.model.generation_aligner, model.lm_head]
    return [
        m
        for part in parts
        for m in part.modules()
        if isinstance(m, torch.nn.Linear) and m.weight.is_floating_point() and m.weight.dtype != dtype
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_model(model) -> None:
    """Refuse what the step cannot reproduce: sharded weights, rotary embeddings that change with length."""
    from torch.distributed.tensor import DTensor

    lm = model.model.language_model
    rope_type = getattr(lm.rotary_emb, "rope_type", "default")
    if "dynamic" in rope_type or rope_type == "longrope":
        raise NotImplementedError(
            f"the static engine supports fixed rotary frequencies, not rope_type={rope_type!r}"
        )
    weight = lm.layers[0].self_attn.q_proj.weight
    if isinstance(weight, DTensor):
        raise RuntimeError(
            "the static rollout engine needs the full weights: under FSDP2 call it inside "
            "bicot.parallel.gathered(model) (the training step does), or set sampling.engine: eager"
        )


def _prefill(model, state: dict, embeds: torch.Tensor, mask: torch.Tensor) -> None:
    """Run the context with the model's own forward (as the eager loop) and copy its keys/values in."""
    cache = DynamicCache()
    hidden = lm_hidden(model, embeds, mask, positions_from_mask(mask), cache)[:, -1]  # [R, H]
    length = mask.shape[1]
    real = mask.bool()[:, None, :, None]  # [R, 1, L, 1]
    for i, layer in enumerate(cache.layers):
        for j, prefilled in ((2 * i, layer.keys), (2 * i + 1, layer.values)):
            prefilled = prefilled.masked_fill(~real, 0)  # [R, kv_heads, L, D]
            if state.get("kv_scale") is not None:  # kv="fp8": each vector with its scale (a pad slot's: 1)
                fp8.quantize(prefilled, state["kv"][j][:, :, :length], state["kv_scale"][j][:, :, :length])
            else:
                state["kv"][j][:, :, :length].copy_(prefilled)
    state["hidden"].copy_(hidden)
    state["pad"].copy_(length - mask.long().sum(1))
    state["slot"].fill_(length)
    state["col"].fill_(0)


def _shape_key(state: dict) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor))


def _text_stage(
    model, engine: RolloutEngine, ids, mask, max_new_tokens, eos_id, pad_id, sampling, noise
) -> TextSample:
    """Plans: stops after the step where every row has ended."""
    rows, length = ids.shape
    embeds = model.get_input_embeddings()(ids)  # [R, Lc, H]
    shape = (rows, max_new_tokens)
    outputs = {
        "tokens": (shape, torch.long),
        "logp": (shape, torch.float32),
        "valid": (shape, torch.bool),
        "entropy": (shape, torch.float32),
    }
    state = engine.buffers(model, "text", rows, length + max_new_tokens, outputs, ids.device, embeds.dtype)
    _prefill(model, state, embeds, mask)
    state["finished"].zero_()
    vocab = model.config.text_config.vocab_size
    full, state["uniform"] = engine.noise_buffer(noise, rows, vocab, ids.device, greedy=sampling[0] <= 0)
    ladder = engine.ladder(state["kv"][0].shape[2], ids.device)
    engine.bind(model, state)
    key, steps = _shape_key(state), 0
    for step in range(max_new_tokens):
        engine.draw(noise, full)
        window = window_for(length + step + 1, ladder)
        engine.run_step(
            text_step, model, state, key, window=window, eos_id=eos_id, pad_id=pad_id, sampling=sampling
        )
        steps = step + 1
        if bool(state["finished"].all()):  # the eager loop's stopping rule (one host sync per step)
            break
    return TextSample(*(state[n][:, :steps].clone() for n in ("tokens", "logp", "valid", "entropy")))


def _image_stage(
    model, engine: RolloutEngine, cond_ids, cond_mask, num_tokens, uncond_ids, cfg_scale, sampling, noise
) -> ImageSample:
    """Image tokens, both CFG branches in one batch."""
    use_cfg = uncond_ids is not None and cfg_scale != 1.0
    batch = cond_ids.shape[0]
    ids = torch.cat([cond_ids, uncond_ids]) if use_cfg else cond_ids  # [R, L], R = B or 2B
    mask = torch.cat([cond_mask, cond_mask]) if use_cfg else cond_mask
    rows, length = ids.shape
    embeds = model.get_input_embeddings()(ids)  # [R, L, H]
    shape = (batch, num_tokens)
    outputs = {
        "tokens": (shape, torch.long),
        "lp_cond": (shape, torch.float32),
        "lp_guided": (shape, torch.float32),
        "entropy": (shape, torch.float32),
    }
    state = engine.buffers(model, "image", rows, length + num_tokens, outputs, ids.device, embeds.dtype)
    _prefill(model, state, embeds, mask)
    vocab = model.config.vq_config.num_embeddings
    full, state["uniform"] = engine.noise_buffer(noise, batch, vocab, ids.device, greedy=sampling[0] <= 0)
    ladder = engine.ladder(state["kv"][0].shape[2], ids.device)
    engine.bind(model, state)
    key = _shape_key(state)
    consts = dict(batch=batch, use_cfg=use_cfg, cfg_scale=float(cfg_scale), sampling=sampling)
    for step in range(num_tokens):
        engine.draw(noise, full)
        engine.run_step(image_step, model, state, key, window=window_for(length + step + 1, ladder), **consts)
    return ImageSample(*(state[n].clone() for n in ("tokens", "lp_cond", "lp_guided", "entropy")))


def _entry(stage, name: str):
    """``stage`` as a forward of the model (:func:`janus_ops.model_entry`), checked and under the weight copy."""

    def run(model, engine: RolloutEngine, ids, *args):
        _check_model(model)
        with engine.step_weights(model, ids.device):
            return stage(model, engine, ids, *args)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = stage.__doc__
    return model_entry(torch.no_grad()(run))


_run_text = _entry(_text_stage, "_run_text")  # the plan stage (see janus_ops.sample_text)
_run_image = _entry(_image_stage, "_run_image")  # the image stage (see janus_ops.sample_image_tokens)
