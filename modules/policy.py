"""JanusPolicy: loads a Janus checkpoint, samples plans and image tokens, and scores tokens for the update."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoProcessor, JanusForConditionalGeneration
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

from datamodules.records import PromptRecord
from modules import janus_ops
from modules.decode_step import ATTENTION_CHOICES
from modules.engine import COMPILE_MODES, EngineStats, RolloutEngine, check_float8
from modules.engine_weights import quantizable
from modules.hub import load_cache_first, local_folder, unreadable_safetensors
from modules.lora import LoraSpec, add_lora, merged_copy
from modules.tiny import TinyJanusSpec, build_tiny_janus

# Parts of JanusForConditionalGeneration that `trainable` may name.
PARTS = (
    "language_model",
    "lm_head",
    "vision_model",
    "aligner",
    "generation_embeddings",
    "generation_aligner",
    "generation_head",
    "vqmodel",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_LOGPROB_MODES = ("conditional", "guided")
ENGINES = ("eager", "static")


class CheckpointError(ValueError):
    """A checkpoint path or id that cannot be loaded as a Janus model."""


MIN_TEMPERATURE = 1e-4  # the smallest positive temperature; below it, use 0 (greedy decoding)


@dataclass
class SamplingConfig:
    """How plans and images are sampled, and which image log-probs the update uses.

    Attributes:
        plan_max_tokens: longest plan, in tokens (a plan stops earlier at EOS).
        plan_temperature: temperature of plan sampling (0 is greedy; otherwise at least ``MIN_TEMPERATURE``).
        plan_top_p: nucleus sampling for plans (1 disables).
        plan_top_k: top-k for plans (0 disables).
        image_temperature: temperature of image-token sampling.
        image_top_k: top-k for image tokens (0 disables).
        image_top_p: nucleus for image tokens (1 disables).
        cfg_scale: classifier-free guidance weight (1 turns guidance off; the paper uses 5).
        image_logprob: ``conditional`` (the paper: log-probs from the conditional logits) or
            ``guided`` (from the CFG mixture actually sampled from; costs a second branch in the update).
            Either way, and for plans, a log-prob is that of the whole tempered distribution, not of its
            top-k/top-p truncation the samples come from (the same in rollout and update; it matters to the
            ratio only with ``mu > 1``).
        engine: ``eager`` (the KV-cached loop of ``janus_ops``) or ``static`` (``modules.engine``: static
            KV cache, one decode-step function, CUDA graphs on GPU; same tokens and log-probs).
        engine_compile: how the static engine runs its step (``RolloutEngine(compile=...)``): ``auto``
            (``fused`` on GPU, ``cudagraphs`` where inductor cannot compile; plain calls on CPU), ``off``,
            ``cudagraphs`` (the plain step captured by hand as CUDA graphs: starts in under a second),
            ``fused`` (inductor-compiled parts of the step, one compiled decoder layer for all layers,
            captured by hand on GPU: faster steps after seconds of compiling), ``fused-autotune`` (``fused``
            under inductor's max-autotune: 84 s of compiling and slower steps on an H200), or a
            ``torch.compile`` mode (``reduce-overhead``: as fast as ``fused`` after minutes of compiling).
        engine_attention: how the static engine's step attends over the KV cache (``RolloutEngine(attention=...)``):
            ``matmul`` (the default), ``reduce``, ``sdpa``, ``triton`` (kernels that read only the filled slots;
            CUDA and the triton package), or ``auto`` (``triton`` on a CUDA GPU of compute capability 8.0 or
            later where Triton is installed, ``matmul`` elsewhere). Same tokens and log-probs within rounding;
            speed differs by GPU (on an H200 at the 1B shape ``triton`` with ``engine_pack`` was fastest and
            compiled in an eighth of the time).
        engine_pack: pack each decoder layer's q/k/v and gate/up weights into one matrix each for the static
            engine's step (``RolloutEngine(pack=True)``): fewer, wider matmuls. Free under bf16-mixed (the packs
            hold the bf16 weight copies); with bf16 weights a copy of those weights while rolling out (Janus-Pro-1B:
            1.7 GB, 7B: 8.4 GB), counted by ``python -m bicot.memory``.
        engine_linear: how the static engine's projections run (``RolloutEngine(linear=...)``): ``torch`` (the
            default: ``F.linear``, cuBLAS on a GPU), or ``triton`` (``modules/decode_linear.py``: Triton kernels
            for a few rows, the residual adds and the MLP's activation inside them; needs ``engine_pack``, CUDA and
            the triton package; on an H200 at the 1B shape the whole step was 3% slower with it), or a launch name
            ``triton_lin_n<N>_k<K>_s<S>_w<W>_p<P>``, then ``_m<rows>`` (rows per program: ``_m64`` puts sm_90's
            wgmma under 32 rows), ``_l`` (the last program of a split tile sums the splits) and ``_c`` (fp8 weights
            widened by Triton's conversion instead of by their bits).
        engine_weights: what the static engine's decoder projections read (``RolloutEngine(weights=...)``):
            ``model`` (the default: the model's weights) or ``fp8`` (a float8 e4m3 copy, one scale per output row,
            quantized from the live weights at every rollout: half the bytes per decode step, the bound at the 7B
            shape). Samples from an approximation of the policy: ``train/rollout_kl/*`` shows how far its
            log-probs are from the update's. Needs ``engine_linear`` triton, a GPU of compute capability 8.9 or
            later (Ada, Hopper); LoRA adapters are merged into the copy. Costs 1 byte per projection weight (7B:
            6.1 GB) instead of the bf16 packs. Not faster yet: on an H200 at the 7B shape the step took 7.19 ms
            against 6.80 ms with bf16 weights, when the kernel widened them by Triton's conversion (by their bits
            since: not yet timed).
        engine_kv: the static engine's KV cache (``RolloutEngine(kv=...)``): ``model`` (the default: the dtype the
            model computes in) or ``fp8`` (float8 e4m3, each slot's key and value vector with its own float32
            scale: half the cache's bytes, the other half of a 7B step's reads). An approximation too (see
            ``engine_weights``); needs ``engine_attention`` triton (or auto on a GPU) and compute capability 8.9.
            Slower so far: 12.80 ms per 7B step on an H200 against 7.19 ms with fp8 weights alone.
    """

    plan_max_tokens: int = 64
    plan_temperature: float = 1.0
    plan_top_p: float = 1.0
    plan_top_k: int = 0
    image_temperature: float = 1.0
    image_top_k: int = 0
    image_top_p: float = 1.0
    cfg_scale: float = 5.0
    image_logprob: str = "conditional"
    engine: str = "eager"
    engine_compile: str = "auto"
    engine_attention: str = "matmul"
    engine_pack: bool = False
    engine_linear: str = "torch"
    engine_weights: str = "model"
    engine_kv: str = "model"

    def __post_init__(self) -> None:
        if self.plan_max_tokens < 1:
            raise ValueError(f"sampling.plan_max_tokens must be >= 1, got {self.plan_max_tokens}")
        for name in ("plan_temperature", "image_temperature"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"sampling.{name} must be a finite number >= 0, got {value}")
            if 0 < value < MIN_TEMPERATURE:  # logits / T would overflow float32 to inf, and the log-probs to NaN
                raise ValueError(
                    f"sampling.{name} must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {value:g}"
                )
        for name in ("plan_top_p", "image_top_p"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"sampling.{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("plan_top_k", "image_top_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"sampling.{name} must be >= 0 (0 disables), got {getattr(self, name)}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 1:
            raise ValueError(f"sampling.cfg_scale must be >= 1 (1 disables guidance), got {self.cfg_scale}")
        if self.image_logprob not in IMAGE_LOGPROB_MODES:
            raise ValueError(f"sampling.image_logprob must be one of {IMAGE_LOGPROB_MODES}, got {self.image_logprob!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"sampling.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine_compile not in COMPILE_MODES:
            raise ValueError(
                f"sampling.engine_compile must be one of {COMPILE_MODES}, got {self.engine_compile!r}"
            )
        if self.engine_attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"sampling.engine_attention must be one of {ATTENTION_CHOICES}, got {self.engine_attention!r}"
            )
        if self.engine_attention == "triton" and self.engine == "static":
            from modules.decode_attention import require

            require()  # a clear error now, not at the first rollout
        if self.engine_linear != "torch":
            from modules.decode_attention import require
            from modules.decode_linear import LinearLaunch

            try:
                LinearLaunch.of(self.engine_linear)
            except ValueError as error:
                raise ValueError(f"sampling.engine_{error}") from None
            if not self.engine_pack:
                raise ValueError("sampling.engine_linear triton needs sampling.engine_pack: true (its kernels read the "
                                 "packed q/k/v and gate/up matrices)")
            if self.engine == "static":
                require("linear", "torch")  # a clear error now, not at the first rollout
        check_float8(self.engine_weights, self.engine_kv, self.engine_linear, self.engine_attention,
                     "sampling.engine_{}")


@dataclass
class PlanBatch:
    """Plans sampled for a batch (rows prompt-major: sample g of prompt p at row p*G+g).

    Attributes:
        context_ids: ``[R, Lc]`` left-padded reasoning contexts; ``context_mask`` the same shape.
        tokens: ``[R, T]`` plan tokens, pad after EOS; ``mask`` ``[R, T]`` bool, EOS included.
        logp: ``[R, T]`` log-probs under the sampling policy (0 off the mask).
        texts: ``R`` decoded plans.
        entropy: ``[R, T]`` exact entropy of each step's sampling distribution (0 off the mask), or ``None``.
    """

    context_ids: torch.Tensor
    context_mask: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    texts: list[str]
    entropy: torch.Tensor | None = None


@dataclass
class ImageContext:
    """Generation contexts ``[R, L]``: conditional ids and mask, and the unconditional ids (same mask)."""

    cond_ids: torch.Tensor
    cond_mask: torch.Tensor
    uncond_ids: torch.Tensor


def _fill(template: str, prompt: str) -> str:
    # Plain substitution: prompt text is data, never a format string.
    return template.replace("{prompt}", prompt)


def plan_system_text(setting: str | None, processor_default: bool) -> str:
    """What precedes a plan's user turn: ``setting`` (``model.policy.init_args.plan_system_prompt``) and a blank
    line; ``""`` nothing; ``None`` transformers' default system prompt where the processor sets
    ``use_default_system_prompt`` (``processor_default``), as ``JanusProcessor`` does for text, else nothing."""
    if setting is None:
        return DEFAULT_SYSTEM_PROMPT if processor_default else ""
    text = setting.strip()
    return text + "\n\n" if text else ""


class JanusPolicy(pl.LightningModule):
    """The trained policy: one Janus model that writes a plan and then draws.

    Args:
        model_name_or_path: a local folder in ``save_pretrained`` layout or a hub id.
        tiny: build a tiny random Janus of this shape instead (tests, offline runs).
        trainable: parts to train (see :data:`PARTS`, or ``["all"]``). The default trains what the paper trains: the
            language model with its text head (T2I-R1 freezes only the vision towers, the aligners, the generation
            embeddings/head and the VQ model). transformers' Janus keeps that head, ``lm_head``, outside
            ``language_model``; an untied head (Janus-Pro's) stays frozen unless named.
        dtype: ``float32``, ``bfloat16`` or ``float16`` weights.
        trust_remote_code: passed to ``from_pretrained``; never on unless set.
        attn_implementation: attention kernel for ``from_pretrained`` (``sdpa``, ``eager``, ...).
        sampling: see :class:`SamplingConfig`.
        use_plan: condition images on a sampled plan (the semantic-level CoT); off draws from the prompt.
        reasoning_template: the instruction around ``{prompt}`` that :meth:`predict_step` uses.
        plan_system_prompt: the system prompt before the plan's user turn. ``None`` (the default) does what the
            checkpoint's processor does for text: transformers' default system prompt where it sets
            ``use_default_system_prompt`` (Janus-Pro's converted checkpoints do), none elsewhere; ``""`` none;
            any other text is put first, followed by a blank line (T2I-R1's code, for one, has its own). Image
            contexts never have one.
        predict_images_per_prompt: images per prompt in :meth:`predict_step`.
        seed: base seed of :meth:`predict_step` sampling.
        lora: train LoRA adapters on the language model instead of the parts in ``trainable``; the
            reference is then the same model with adapters off (no second copy), and
            :meth:`export_model` merges the adapters.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        tiny: TinyJanusSpec | None = None,
        trainable: Sequence[str] = ("language_model", "lm_head"),
        dtype: str = "float32",
        trust_remote_code: bool = False,
        attn_implementation: str | None = "sdpa",
        sampling: SamplingConfig | None = None,
        use_plan: bool = True,
        reasoning_template: str | None = None,
        plan_system_prompt: str | None = None,
        predict_images_per_prompt: int = 1,
        seed: int = 0,
        lora: LoraSpec | None = None,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"policy dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.source = model_name_or_path
        self.tiny = tiny
        self.sampling = sampling or SamplingConfig()
        self.use_plan = use_plan
        self.reasoning_template = reasoning_template
        if plan_system_prompt is not None and not isinstance(plan_system_prompt, str):
            raise ValueError(f"plan_system_prompt must be a text, '' or null, got {plan_system_prompt!r}")
        self.plan_system_prompt = plan_system_prompt
        count = predict_images_per_prompt
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:  # before any output folder exists
            raise ValueError(f"predict_images_per_prompt must be an integer >= 1, got {count!r}")
        self.predict_images_per_prompt = predict_images_per_prompt
        self.seed = seed
        self._engine = None  # the static rollout engine, built on first use (it holds per-shape buffers)
        self.model, self.processor = load_janus(
            model_name_or_path, tiny, DTYPES[dtype], trust_remote_code, attn_implementation
        )
        self.tokenizer = self.processor.tokenizer
        self.lora = lora
        self.trainable = add_lora(self.model, lora) if lora is not None else set_trainable(self.model, trainable)
        if self.sampling.engine == "static" and self.sampling.engine_weights == "fp8":
            try:
                quantizable(self.model)  # a clear error now (a projection with a bias), not at the first rollout
            except ValueError as error:
                raise ValueError(f"sampling.{error}") from None
        self.num_image_tokens = self.model.config.vision_config.num_image_tokens
        self.boi_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.boi_token)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            raise CheckpointError(f"the tokenizer of {model_name_or_path!r} has no pad token; Janus tokenizers do")

    # ---- text handling -------------------------------------------------------------------------
    def chat(self, user_text: str, generation_mode: str = "text") -> str:
        """The user turn in the checkpoint's chat format, ending where the assistant speaks.

        ``generation_mode`` as ``JanusProcessor`` names it: ``text`` (a plan) starts with the system prompt
        (:attr:`system_prompt`: by default the processor's own where it asks for one, as it does for text);
        ``image`` never has one (the caller appends begin-of-image).
        """
        if generation_mode not in ("text", "image"):
            raise ValueError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}")
        messages = [{"role": "user", "content": [{"type": "text", "text": user_text}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        system = self.system_prompt if generation_mode == "text" else ""
        if system:
            bos = self.tokenizer.bos_token or ""
            head = bos if bos and text.startswith(bos) else ""  # a template that writes BOS keeps it first
            text = head + system + text[len(head) :]
        return text

    @property
    def system_prompt(self) -> str:
        """What precedes a plan's user turn (see :func:`plan_system_text`)."""
        return plan_system_text(self.plan_system_prompt, getattr(self.processor, "use_default_system_prompt", False))

    def encode(self, texts: Sequence[str], suffix_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and left-pad texts (one BOS each), optionally appending a token id to every row.

        Returns:
            ``(ids [B, L], mask [B, L])`` on this module's device.
        """
        bos = self.tokenizer.bos_token_id
        rows = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
            rows.append(ids + ([suffix_id] if suffix_id is not None else []))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def unconditional(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The CFG branch as the paper builds it: every token but the first and the last becomes pad."""
        first = mask.shape[1] - mask.sum(1, keepdim=True)  # [B, 1] index of the first real token
        col = torch.arange(ids.shape[1], device=ids.device)[None]  # [1, L]
        keep = (col == first) | (col == ids.shape[1] - 1) | (mask == 0)
        return torch.where(keep, ids, torch.full_like(ids, self.pad_id))

    def image_context(self, prompts: Sequence[str], plans: Sequence[str] | None) -> ImageContext:
        """Generation contexts: ``"{prompt}. {plan}"`` (or the prompt alone) in the chat format, then BOI."""
        texts = []
        for i, prompt in enumerate(prompts):
            plan = plans[i].strip() if plans is not None else ""
            joiner = " " if prompt.rstrip().endswith((".", "!", "?")) else ". "
            texts.append(self.chat(prompt.rstrip() + joiner + plan if plan else prompt, "image"))
        ids, mask = self.encode(texts, suffix_id=self.boi_id)
        return ImageContext(ids, mask, self.unconditional(ids, mask))

    # ---- sampling ------------------------------------------------------------------------------
    def noise(self, seed: int, global_rows: int | None = None, offset: int = 0) -> janus_ops.RowNoise:
        """A sampling stream on this module's device (see ``janus_ops.RowNoise``)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return janus_ops.RowNoise(generator, global_rows, offset)

    @torch.no_grad()
    def sample_plans(
        self, prompts: Sequence[str], template: str, num_samples: int, noise: janus_ops.RowNoise | None = None
    ) -> PlanBatch:
        """Stage 1, the semantic-level CoT: ``num_samples`` plans per prompt, rows prompt-major."""
        s = self.sampling
        contexts = [self.chat(_fill(template, p)) for p in prompts for _ in range(num_samples)]
        ids, mask = self.encode(contexts)
        out = self._sampler().sample_text(
            self.model,
            ids,
            mask,
            s.plan_max_tokens,
            self.tokenizer.eos_token_id,
            self.pad_id,
            s.plan_temperature,
            s.plan_top_k,
            s.plan_top_p,
            noise,
        )
        # each row's own tokens up to its EOS; the pads after it are left out by the mask, not by their id
        # (one copy to the host for the batch, as batch_decode of the tensor made)
        tokens, masks = out.tokens.tolist(), out.mask.tolist()
        rows = [[t for t, keep in zip(row, mask, strict=True) if keep] for row, mask in zip(tokens, masks, strict=True)]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return PlanBatch(ids, mask, out.tokens, out.mask, out.logp, [t.strip() for t in texts], out.entropy)

    @torch.no_grad()
    def sample_images(self, context: ImageContext, noise: janus_ops.RowNoise | None = None):
        """Stage 2, the token-level CoT: image tokens with CFG. Returns a ``janus_ops.ImageSample``."""
        s = self.sampling
        return self._sampler().sample_image_tokens(
            self.model,
            context.cond_ids,
            context.cond_mask,
            self.num_image_tokens,
            context.uncond_ids,
            s.cfg_scale,
            s.image_temperature,
            s.image_top_k,
            s.image_top_p,
            noise,
        )

    def _sampler(self):
        """Where sampling runs, per ``sampling.engine``: ``janus_ops`` or the static engine (same signatures)."""
        if self.sampling.engine == "eager":
            return janus_ops
        if self._engine is None:
            sampling = self.sampling
            self._engine = RolloutEngine(
                compile=sampling.engine_compile, attention=sampling.engine_attention, pack=sampling.engine_pack,
                linear=sampling.engine_linear, weights=sampling.engine_weights, kv=sampling.engine_kv,
            )
        return self._engine

    def engine_stats(self) -> EngineStats | None:
        """A copy of the static engine's running totals (compile and capture seconds, captures, steps), or
        ``None`` with the eager loop."""
        if self.sampling.engine == "eager":
            return None
        return replace(self._engine.stats) if self._engine is not None else EngineStats()

    def end_rollout(self) -> None:
        """A training rollout has sampled everything: the static engine may free its buffers for the update."""
        if self._engine is not None:
            self._engine.end_rollout()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """VQ-decode image tokens ``[B, N]`` to uint8 ``[B, H, W, 3]``."""
        return janus_ops.decode_images(self.model, tokens)

    # ---- teacher-forced log-probs --------------------------------------------------------------
    def plan_logprobs(self, plans: PlanBatch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """``[R, T]`` log-probs of the plan tokens (``lm_head``); ``model`` defaults to the policy's."""
        return janus_ops.text_logprobs(
            model if model is not None else self.model,
            plans.context_ids,
            plans.context_mask,
            plans.tokens,
            plans.mask,
            self.sampling.plan_temperature,
        )

    def image_logprobs(
        self, context: ImageContext, tokens: torch.Tensor, model: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """``[R, N]`` log-probs of image tokens (``generation_head``), per ``sampling.image_logprob``."""
        guided = self.sampling.image_logprob == "guided"
        return janus_ops.image_logprobs(
            model if model is not None else self.model,
            context.cond_ids,
            context.cond_mask,
            tokens,
            self.sampling.image_temperature,
            context.uncond_ids if guided else None,
            self.sampling.cfg_scale,
        )

    def export_model(self) -> JanusForConditionalGeneration:
        """The model to save for stock transformers: adapters merged into a copy when LoRA trains."""
        return merged_copy(self.model) if self.lora is not None else self.model

    # ---- standalone use ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        num_images: int = 1,
        template: str | None = None,
        seed: int = 0,
    ) -> dict:
        """Draw ``num_images`` per prompt, with a plan when a template is given. Rows prompt-major.

        Returns:
            ``{"images": uint8 [R, H, W, 3], "image_tokens": [R, N], "plans": list[str] | None}``.
        """
        plans = None
        if template is not None:
            plans = self.sample_plans(prompts, template, num_images, self.noise(seed)).texts
        repeated = [p for p in prompts for _ in range(num_images)]
        sample = self.sample_images(self.image_context(repeated, plans), self.noise(seed + 1))
        return {"images": self.decode(sample.tokens), "image_tokens": sample.tokens, "plans": plans}

    def predict_step(self, batch: Sequence[PromptRecord], batch_idx: int = 0) -> dict:
        template = None
        if self.use_plan:
            if self.reasoning_template is None:
                raise ValueError("use_plan is on but reasoning_template is not set: give the instruction text")
            template = self.reasoning_template
        out = self.generate(
            [r.prompt for r in batch], self.predict_images_per_prompt, template, self.seed + 2 * batch_idx
        )
        out["prompts"] = [r.prompt for r in batch for _ in range(self.predict_images_per_prompt)]
        return out


def set_trainable(model: JanusForConditionalGeneration, parts: Sequence[str]) -> list[str]:
    """Freeze everything, then unfreeze the named parts. Returns the parts that train."""
    parts = list(PARTS) if list(parts) == ["all"] else list(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"trainable names unknown parts {unknown}; choose from {list(PARTS)} or ['all']")
    model.requires_grad_(False)
    for part in parts:
        module = model.lm_head if part == "lm_head" else getattr(model.model, part)
        module.requires_grad_(True)
    return parts


def load_janus(
    source: str | None,
    tiny: TinyJanusSpec | None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
):
    """Load ``(JanusForConditionalGeneration, processor)`` from a folder or hub id, or build a tiny one.

    Raises:
        CheckpointError: one line naming ``source`` and the cause: a missing or non-Janus folder, an unreadable
            config or weights file, a config whose shapes do not match the weights, missing tokenizer files, or
            files the loaders cannot find (not in the cache, offline).
    """
    if (source is None) == (tiny is None):
        raise CheckpointError(
            "set exactly one of model_name_or_path (a Janus folder or hub id) and tiny (a random tiny model)"
        )
    if tiny is not None:
        model, processor = build_tiny_janus(tiny)
        return model.to(dtype), processor
    check_janus_source(source)
    kwargs = {"trust_remote_code": trust_remote_code}
    failed = f"could not load a Janus checkpoint from {source!r}"
    try:
        model = load_cache_first(
            JanusForConditionalGeneration.from_pretrained,
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            **kwargs,
        )
        check_tokenizer_files(source)  # after the weights: a folder that has none fails above, naming them
        processor = load_cache_first(AutoProcessor.from_pretrained, source, **kwargs)
    except SafetensorError as err:  # a local folder's weights were checked above: a hub id's cached file
        raise CheckpointError(
            f"{failed}: a safetensors weights file is not readable ({_one_line(err)}); re-download or re-save it"
        ) from None
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):  # transformers' refusal of tensors of another shape
            raise
        raise CheckpointError(f"{failed}: config.json does not match the weights ({_mismatch(source)})") from None
    except OSError as err:
        # "org/name" is a hub id and a relative path at once: say where the folder was looked for
        missing = not Path(source).is_absolute() and not Path(source).expanduser().exists()
        relative = f" (no folder {source!r} under {Path.cwd()})" if missing else ""
        raise CheckpointError(
            f"{failed}{relative}: {_one_line(err)}. Give a local folder written "
            "by save_pretrained (config.json, safetensors weights, tokenizer and processor files; a relative "
            "path is read from the current directory), or a hub id that is already in the local Hugging "
            "Face cache (no downloads happen offline)."
        ) from err
    return model, processor


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _mismatch(source: str) -> str:
    """How the weights' shapes differ from those ``source``'s config.json asks for: a count and one example.

    Compares the safetensors headers with a model built from the config on the meta device (no memory, no
    weights read). Only called once transformers has refused the load; says less where it cannot tell.
    """
    fallback = "tensors of another shape; see the load report above"
    folder = local_folder(source)
    if folder is None:
        return fallback
    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = JanusForConditionalGeneration._from_config(config)
        expected = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
        differ = []
        for file in sorted(folder.glob("model*.safetensors")):
            with safe_open(file, "pt") as weights:
                for key in weights.keys():
                    shape = list(weights.get_slice(key).get_shape())
                    if key in expected and expected[key] != shape:
                        differ.append((key, shape, expected[key]))
    except Exception:  # only the message's detail depends on it: never hide the load's own error
        return fallback
    if not differ:
        return fallback
    key, saved, wanted = differ[0]
    return f"{len(differ)} tensors of another shape, e.g. {key}: checkpoint {saved}, config {wanted}"


def check_janus_source(source: str) -> None:
    """Fail early, with the path named, when a local checkpoint is missing, is not a Janus model, or has a config
    or safetensors weights file that cannot be read. Hub ids are left to the loaders."""
    path = local_folder(source)
    if path is None:
        return  # a hub id such as deepseek-community/Janus-Pro-1B
    if path.is_file():  # a weights or config file instead of the folder that holds it
        raise CheckpointError(
            f"model_name_or_path={source!r} is a file; give the checkpoint folder (the one written by save_pretrained, "
            f"with config.json, the weights and the processor files), e.g. {str(path.parent)!r}"
        )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {str(path)!r} (from model_name_or_path={source!r})")
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{str(path)!r} is not a Janus checkpoint: it has no config.json")
    try:
        settings = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(config)!r} is not valid JSON: {err}") from err
    if not isinstance(settings, dict):
        raise CheckpointError(
            f"could not load a Janus checkpoint from {str(path)!r}: config.json is not a JSON object "
            f"(it holds a {type(settings).__name__})"
        )
    model_type = settings.get("model_type")
    if model_type != "janus":
        raise CheckpointError(f"{str(path)!r} is not a Janus checkpoint: config.json has model_type={model_type!r}")
    bad = unreadable_safetensors(path, "model*.safetensors")  # the weights transformers reads
    if bad is not None:
        raise CheckpointError(
            f"could not load a Janus checkpoint from {str(path)!r}: {bad[0].name} is not a readable safetensors "
            f"file ({bad[1]}); re-download or re-save it"
        )


def check_tokenizer_files(source: str) -> None:
    """Refuse a local folder without the files the Janus processor's tokenizer is read from (transformers' own
    error for it blames a missing sentencepiece and names no folder). Hub ids are left to the loaders."""
    path = local_folder(source)
    if path is None:
        return
    vocabulary = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    settings = (path / "tokenizer_config.json").is_file()
    if vocabulary and settings:
        return
    needs = "tokenizer.json or tokenizer.model, and tokenizer_config.json"
    what = "no tokenizer_config.json" if vocabulary else "no tokenizer.json" if settings else "no tokenizer files"
    raise CheckpointError(
        f"could not load a Janus checkpoint from {str(path)!r}: {what} (the tokenizer is read from {needs}); save "
        "the processor into the folder too (processor.save_pretrained)"
    )
