"""Janus forward passes bicot needs: KV-cached sampling of plan and image tokens, teacher-forced log-probs.

Every function takes a ``transformers.JanusForConditionalGeneration`` and plain tensors, so the policy
and the frozen reference share one implementation. Sequences are left-padded: positions come from the
attention mask, so a padded row sees the same positions as it would alone.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaModel

# transformers renamed `past_key_values` to `cache` (5.2x); the GPU machines run 5.17. Ask the signature.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding.

    Args:
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.

    Returns:
        ``[B, L]`` long positions, 0 on the padding.
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_hidden(
    model,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """Run the language model on embeddings. ``embeds [B, L, H]``, ``mask`` covers cache + new tokens.

    Returns:
        ``[B, L, H]`` last hidden states.
    """
    kwargs = {_CACHE_KWARG: cache, "use_cache": cache is not None}
    out = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs
    )
    return out.last_hidden_state


def model_entry(fn):
    """Make ``fn(model, ...)`` run as a forward of ``model``.

    bicot's passes call the embeddings, heads and VQ decoder directly rather than ``model.forward``.
    Sharding code gives the model a ``bicot_forward`` method registered as an FSDP2 forward
    (``bicot.parallel.parallelize``); entering through it gathers the root's parameters first,
    initialises FSDP from the root, and reduce-scatters gradients after. Unsharded models run ``fn``
    directly.
    """

    @functools.wraps(fn)
    def entry(model, *args, **kwargs):
        forward = getattr(model, "bicot_forward", None)
        if forward is None:
            return fn(model, *args, **kwargs)
        return forward(fn, *args, **kwargs)

    return entry


def scaled_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` in float32; ``T == 0`` (greedy) scores the untempered distribution."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


@dataclass
class RowNoise:
    """Gumbel noise for sampling, drawn for the whole global batch and sliced to this rank's rows.

    A row's random draw then depends only on the seed and its index in the global batch, not on how
    the batch is split across data-parallel ranks: one process and N processes sample the same tokens.

    Attributes:
        generator: the random stream (one per sampling stage), or ``None`` for torch's global stream.
        global_rows: rows of the global batch (``None``: this rank's rows are the whole batch).
        offset: index of this rank's first row in the global batch.
    """

    generator: torch.Generator | None = None
    global_rows: int | None = None
    offset: int = 0

    def gumbel(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        """``[rows, vocab]`` standard Gumbel noise for this rank's rows."""
        total = self.global_rows or rows
        if self.offset + rows > total:
            raise ValueError(f"noise rows {self.offset}+{rows} exceed the global batch of {total}")
        u = torch.rand(total, vocab, generator=self.generator, device=device)[
            self.offset : self.offset + rows
        ]
        return -torch.log(-torch.log(u.clamp(min=1e-20)))

    def fill_uniform(self, out: torch.Tensor) -> None:
        """Write this step's uniforms for the whole global batch into ``out`` ``[global rows, V]``: the numbers
        :meth:`gumbel` transforms (the static engine draws them outside its step, into a fixed buffer)."""
        torch.rand(*out.shape, generator=self.generator, device=out.device, out=out)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    noise: RowNoise | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row (Gumbel-max); return its log-prob and the entropy of the tempered distribution.

    Top-k/top-p only restrict where samples may fall; the log-prob is the untruncated one that a
    teacher-forced pass computes, so rollout and update ratios agree. The entropy is exact (a sum over
    the vocabulary, from the same log-softmax) and untruncated like the log-prob.

    Args:
        logits: ``[B, V]``.

    Returns:
        ``(tokens [B] long, logp [B] float32, entropy [B] float32 nats)``.
    """
    logp = scaled_logprobs(logits, temperature)  # [B, V]
    if temperature <= 0:
        tokens = logp.argmax(-1)
    else:
        masked = logp
        if top_k > 0 and top_k < logp.shape[-1]:
            kth = logp.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
            masked = masked.masked_fill(masked < kth, float("-inf")).log_softmax(-1)  # top-p sees the top-k
        if top_p < 1.0:
            sorted_lp, order = masked.sort(dim=-1, descending=True)
            probs = sorted_lp.exp()
            drop = (probs.cumsum(-1) - probs) >= top_p  # keep the smallest prefix that reaches top_p
            drop[..., 0] = False  # and at least the most likely token (HF's min_tokens_to_keep=1), even at top_p 0
            masked = masked.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
        noise = noise or RowNoise()
        tokens = (masked + noise.gumbel(*masked.shape, masked.device)).argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@dataclass
class TextSample:
    """Sampled text continuations. ``tokens``/``logp``/``mask``: ``[B, T]``; pad after EOS, EOS kept.

    ``entropy`` ``[B, T]``: the exact entropy of each step's distribution (0 off the mask)."""

    tokens: torch.Tensor
    logp: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None


@model_entry
@torch.no_grad()
def sample_text(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    noise: RowNoise | None = None,
) -> TextSample:
    """Sample text after left-padded contexts with a KV cache, stopping each row at EOS.

    Args:
        ids: ``[B, Lc]`` left-padded context ids; ``mask``: ``[B, Lc]``.

    Returns:
        A :class:`TextSample` of at most ``max_new_tokens`` columns.
    """
    cache = DynamicCache()
    positions = positions_from_mask(mask)
    hidden = lm_hidden(model, model.get_input_embeddings()(ids), mask, positions, cache)[:, -1]  # [B, H]
    pos = positions[:, -1:]  # [B, 1]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens, logps, valid, entropies = [], [], [], []
    for step in range(max_new_tokens):
        tok, lp, entropy = sample_tokens(model.lm_head(hidden), temperature, top_k, top_p, noise)
        live = ~finished
        tok = torch.where(live, tok, torch.full_like(tok, pad_id))
        tokens.append(tok)
        logps.append(torch.where(live, lp, torch.zeros_like(lp)))
        entropies.append(torch.where(live, entropy, torch.zeros_like(entropy)))
        valid.append(live)
        finished = finished | (tok == eos_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, live[:, None].to(mask.dtype)], dim=1)
        pos = pos + 1
        hidden = lm_hidden(model, model.get_input_embeddings()(tok[:, None]), mask, pos, cache)[:, -1]
    return TextSample(
        torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(valid, 1), torch.stack(entropies, 1)
    )


@dataclass
class ImageSample:
    """Sampled image tokens, ``[B, N]`` each: ids, log-probs of the conditional and of the guided logits, and
    the exact entropy of the guided distribution (the one sampled from) at each step."""

    tokens: torch.Tensor
    logp_conditional: torch.Tensor
    logp_guided: torch.Tensor
    entropy: torch.Tensor | None = None


def guide(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``uncond + scale * (cond - uncond)``; scale 1 is ``cond``.

    The mix is computed in float32 (as the log-softmax after it): in bfloat16 (autocast's head output) the
    difference times ``scale`` rounds the guided logits by up to ~0.1 at ``scale`` 5.
    """
    if uncond is None or scale == 1.0:
        return cond
    uncond = uncond.float()
    return uncond + scale * (cond.float() - uncond)


@model_entry
@torch.no_grad()
def sample_image_tokens(
    model,
    cond_ids: torch.Tensor,
    cond_mask: torch.Tensor,
    num_tokens: int,
    uncond_ids: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    noise: RowNoise | None = None,
) -> ImageSample:
    """Sample image tokens with classifier-free guidance, both branches in one batch, KV-cached.

    Args:
        cond_ids: ``[B, L]`` left-padded contexts ending in the begin-of-image token.
        cond_mask: ``[B, L]``; the unconditional rows use the same mask.
        uncond_ids: ``[B, L]`` unconditional contexts, or ``None`` (or ``cfg_scale == 1``) for no CFG.

    Returns:
        An :class:`ImageSample`.
    """
    use_cfg = uncond_ids is not None and cfg_scale != 1.0
    batch = cond_ids.shape[0]
    ids = torch.cat([cond_ids, uncond_ids]) if use_cfg else cond_ids  # [R, L], R = B or 2B
    mask = torch.cat([cond_mask, cond_mask]) if use_cfg else cond_mask
    cache = DynamicCache()
    positions = positions_from_mask(mask)
    hidden = lm_hidden(model, model.get_input_embeddings()(ids), mask, positions, cache)[:, -1]  # [R, H]
    pos = positions[:, -1:]
    ones = torch.ones_like(mask[:, :1])
    tokens, lp_cond, lp_guided, entropies = [], [], [], []
    for step in range(num_tokens):
        logits = model.model.generation_head(hidden)  # [R, V]
        cond = logits[:batch]
        guided = guide(cond, logits[batch:] if use_cfg else None, cfg_scale)
        tok, lp, entropy = sample_tokens(guided, temperature, top_k, top_p, noise)
        tokens.append(tok)
        lp_guided.append(lp)
        entropies.append(entropy)
        lp_cond.append(scaled_logprobs(cond, temperature).gather(-1, tok[:, None]).squeeze(-1))
        if step == num_tokens - 1:
            break
        step_ids = torch.cat([tok, tok]) if use_cfg else tok
        embeds = model.prepare_embeddings_for_image_generation(step_ids[:, None])  # [R, 1, H]
        mask = torch.cat([mask, ones], dim=1)
        pos = pos + 1
        hidden = lm_hidden(model, embeds, mask, pos, cache)[:, -1]
    return ImageSample(
        torch.stack(tokens, 1), torch.stack(lp_cond, 1), torch.stack(lp_guided, 1), torch.stack(entropies, 1)
    )


@model_entry
def text_logprobs(
    model,
    ctx_ids: torch.Tensor,
    ctx_mask: torch.Tensor,
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Teacher-forced log-probs of text tokens after their contexts (``lm_head``), with grad.

    Args:
        ctx_ids, ctx_mask: ``[B, Lc]`` left-padded contexts.
        tokens, token_mask: ``[B, T]`` continuations, right-padded.

    Returns:
        ``[B, T]`` float32 log-probs (0 where ``token_mask`` is 0).
    """
    ids = torch.cat([ctx_ids, tokens], dim=1)  # [B, Lc+T]
    mask = torch.cat([ctx_mask, token_mask.to(ctx_mask.dtype)], dim=1)
    hidden = lm_hidden(model, model.get_input_embeddings()(ids), mask, positions_from_mask(mask))
    start = ctx_ids.shape[1] - 1
    logits = model.lm_head(hidden[:, start : start + tokens.shape[1]])  # [B, T, V]
    logp = scaled_logprobs(logits, temperature).gather(-1, tokens[..., None]).squeeze(-1)  # [B, T]
    return logp * token_mask.to(logp.dtype)


@model_entry
def image_logprobs(
    model,
    cond_ids: torch.Tensor,
    cond_mask: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    uncond_ids: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Teacher-forced log-probs of image tokens (``generation_head``), with grad.

    With ``uncond_ids`` (and ``cfg_scale != 1``) the log-probs are of the guided mixture the rollout
    sampled from; without, of the conditional logits alone (the paper's choice).

    Args:
        cond_ids, cond_mask: ``[B, L]`` contexts ending in begin-of-image.
        tokens: ``[B, N]`` image tokens.

    Returns:
        ``[B, N]`` float32 log-probs.
    """
    use_cfg = uncond_ids is not None and cfg_scale != 1.0
    batch, n = tokens.shape
    ids = torch.cat([cond_ids, uncond_ids]) if use_cfg else cond_ids  # [R, L]
    ctx_mask = torch.cat([cond_mask, cond_mask]) if use_cfg else cond_mask
    image_tokens = torch.cat([tokens, tokens]) if use_cfg else tokens  # [R, N]
    text_embeds = model.get_input_embeddings()(ids)  # [R, L, H]
    image_embeds = model.prepare_embeddings_for_image_generation(image_tokens[:, :-1])  # [R, N-1, H]
    embeds = torch.cat([text_embeds, image_embeds.to(text_embeds.dtype)], dim=1)
    mask = torch.cat([ctx_mask, torch.ones_like(image_tokens[:, :-1], dtype=ctx_mask.dtype)], dim=1)
    hidden = lm_hidden(model, embeds, mask, positions_from_mask(mask))
    logits = model.model.generation_head(hidden[:, ids.shape[1] - 1 :])  # [R, N, V]
    guided = guide(logits[:batch], logits[batch:] if use_cfg else None, cfg_scale)
    return scaled_logprobs(guided, temperature).gather(-1, tokens[..., None]).squeeze(-1)


@model_entry
@torch.no_grad()
def decode_images(model, tokens: torch.Tensor) -> torch.Tensor:
    """VQ-decode image tokens ``[B, N]`` to uint8 RGB ``[B, H, W, 3]``."""
    pixels = model.decode_image_tokens(tokens)  # [B, H, W, 3] in about [-1, 1]
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
