"""The rollout engine's decode step: one new token per row through the sampling head and every decoder layer, as pure
tensor code over preallocated buffers (what ``torch.compile`` sees and a CUDA graph records).

:class:`modules.engine.RolloutEngine` owns the buffers, decides how the step runs (plain, compiled, captured) and
which kernels it uses; this file is the arithmetic it runs: LlamaRMSNorm's, LlamaRotaryEmbedding's and Llama's
attention written out over a static KV cache, the attention choices (:data:`ATTENTION`), the Triton projections,
the CFG mix and sampling of :mod:`modules.janus_ops` (same noise, same formulas).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modules import fp8
from modules.janus_ops import guide, sample_tokens, scaled_logprobs


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
    not read. ``keys``/``values`` may be pairs ``(float8 cache as uint8, float32 scale per slot)``
    (``RolloutEngine(kv="fp8")``). ``launch``: a ``decode_attention.Launch`` (default: the module's)."""
    if isinstance(keys, tuple):
        (keys, k_scale), (values, v_scale) = keys, values
        keys, values = keys.view(fp8.FP8), values.view(fp8.FP8)  # the step hands the float8 caches in as uint8
        return torch.ops.bicot.decode_attention(q, keys, values, pad, slot, scaling, *(launch or ()), k_scale=k_scale,
                                                v_scale=v_scale)
    return torch.ops.bicot.decode_attention(q, keys, values, pad, slot, scaling, *(launch or ()))


def _store(cache, slot: torch.Tensor, vectors: torch.Tensor) -> None:
    """``vectors [R, kv_heads, 1, D]`` into slot ``slot`` of a layer's ``cache`` ``[R, kv_heads, S, D]``, in its dtype;
    a pair ``(float8 cache as its uint8 view, float32 scales [R, kv_heads, S])`` takes each vector quantized with its
    own scale. The uint8 view is made by the caller (:func:`_advance`), so that this write is into the compiled
    layer's own input: torch < 2.12's inductor does not write in place through a dtype view of a graph input, and
    cloned and copied back both whole caches at every layer (there is no index_copy_ of float8 itself)."""
    if isinstance(cache, tuple):
        q, scale = fp8.quantize(vectors)
        cache[0].index_copy_(2, slot, q.view(torch.uint8))
        cache[1].index_copy_(2, slot, scale)
    else:
        cache.index_copy_(2, slot, vectors.to(cache.dtype))  # under autocast projections and cache may differ


def project_triton(x, weight, residual=None, gated=False, launch=None) -> torch.Tensor:
    """``F.linear(x, weight)`` in :mod:`modules.decode_linear`'s Triton kernel, ``residual`` added and (``gated``,
    ``weight`` the packed ``[gate; up]``) the MLP's activation applied inside it. ``weight`` may be a pair
    ``(float8 weight, float32 scale per row)`` (``RolloutEngine(weights="fp8")``). ``launch``: a
    ``decode_linear.LinearLaunch`` (default: the module's)."""
    if isinstance(weight, tuple):
        weight, scale = weight
        return torch.ops.bicot.decode_linear(x, weight, residual, gated, *(launch or ()), scale=scale)
    return torch.ops.bicot.decode_linear(x, weight, residual, gated, *(launch or ()))


PROJECT_MAX_ROWS = 64  # modules.decode_linear.MAX_ROWS (not imported here: it needs no Triton import)


def plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None


ATTENTION = {"matmul": _attend_matmul, "reduce": _attend_reduce, "sdpa": _attend_sdpa, "triton": _attend_triton}
ATTENTION_CHOICES = ("auto", *ATTENTION)  # auto: see resolve_attention
FILLED_ONLY = ("triton",)  # attention choices that read only the filled slots: one window (the whole cache)


def decode_layer(
    layer, x, keys, values, cos, sin, bias, slot, window: int, attend=_attend_matmul, qkv=None, gate_up=None, pad=None,
    project=None, o=None, down=None,
) -> torch.Tensor:
    """One new token per row (``x [R, H]``) through one decoder layer, writing its key and value at ``slot`` of
    ``keys``/``values`` ``[R, kv_heads, capacity, head_dim]``; returns the layer's output ``[R, H]``. Attention
    (``attend``, one of :data:`ATTENTION`) reads slots ``[0, window)`` only (``slot < window``); ``bias`` is
    ``[R, 1, 1, window]`` (``pad [R]``, each row's left padding, the same mask for ``attention="triton"``).
    ``qkv``/``gate_up``: the layer's q, k, v (gate, up) weights packed into one matrix
    (``RolloutEngine(pack=True)``), one matmul instead of three (two); ``None``: the modules' own calls.
    ``project``: :func:`project_triton` (``RolloutEngine(linear="triton")``) for the packed matrices and the plain
    o/down projections, with the residual adds and the activation inside its kernels, for up to
    :data:`PROJECT_MAX_ROWS` rows; ``None`` (or more rows): ``F.linear``. ``RolloutEngine(weights="fp8")``: ``qkv``,
    ``gate_up``, ``o`` and ``down`` are each ``(float8 weight, float32 scale per row)`` and ``project`` runs them all,
    whatever the rows (there is no bf16 weight to hand to cuBLAS)."""
    fp8_cache = isinstance(keys, tuple)  # RolloutEngine(kv="fp8"): (uint8 view of the float8 cache, scales): _store
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
    if o is not None or (project is not None and plain_linear(attn.o_proj)):
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
    if down is not None or (project is not None and plain_linear(mlp.down_proj)):
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
        self.inputs, self.layer, self.finish = wrap(_step_inputs), wrap(decode_layer), wrap(_finish)
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
        # the float8 caches as uint8 views: the compiled layer's index_copy_ then mutates its own input (see _store)
        kv = [(cache.view(torch.uint8), scale) for cache, scale in zip(kv, state["kv_scale"], strict=True)]
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
    ``None`` when greedy), ``packed`` (per layer ``(qkv, gate_up)``, see :meth:`modules.engine.RolloutEngine.bind`)
    and the outputs ``tokens``/``lp_cond``/``lp_guided``/``entropy`` ``[B, N]``, written at ``col``.
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
