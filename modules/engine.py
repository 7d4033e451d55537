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
* **The step** (:mod:`modules.decode_step`). Generation head (or ``lm_head``), CFG mix, sampling, embedding of
  the sampled token and one decoder step over all layers are one function whose state (cache, hidden, slot,
  outputs, noise) lives in preallocated buffers that it updates in place. Only the uniform draw of the noise
  runs outside it, from the caller's generator, into a fixed buffer. On CUDA the function is captured by hand
  as one CUDA graph per (rows, capacity, window, sampling settings) and replayed. ``fused`` (the default on
  CUDA) first compiles the step's parts (:class:`~modules.decode_step.StepParts`: sampling head, per-step
  inputs, one decoder layer, final norm) with inductor one by one, so every layer runs the same compiled layer
  and a window costs a few small compiles (seconds), then captures the whole step. ``cudagraphs`` captures the
  plain step (about one step's time to capture, slower steps). ``torch.compile(mode="reduce-overhead")`` fuses
  the whole step with inductor (minutes of compiling). Fixed buffer addresses are what make replay possible
  (:mod:`modules.engine_capture`).
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
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from transformers import DynamicCache

from modules import fp8
from modules.decode_step import (
    ATTENTION_CHOICES,
    FILLED_ONLY,
    StepParts,
    image_step,
    project_triton,
    text_step,
)
from modules.engine_capture import (
    CapturedStep,
    CudaGraphs,
    first_line,
    inductor_compiles,
    raise_recompile_limit,
)
from modules.engine_weights import (
    base_linear,
    fp8_buffers,
    live_weight,
    nested_tensors,
    packable,
    quantizable,
    step_linears,
    weight_buffers,
)
from modules.janus_ops import ImageSample, RowNoise, TextSample, lm_hidden, model_entry, positions_from_mask

COMPILE_MODES = ("auto", "off", "cudagraphs", "fused", "fused-autotune", "default", "reduce-overhead", "max-autotune")
FUSED_MODES = ("fused", "fused-autotune")  # the step's parts compiled one by one, the whole step captured by hand
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # each window variant is a compile
DEFAULT_CHUNK = {"cuda": 128, "cpu": 64}
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
        attention: how a step attends over the cache (:data:`~modules.decode_step.ATTENTION_CHOICES`): ``matmul``
            (batched one-row matmuls, the default), ``reduce`` (multiply-and-sum reductions that inductor turns into kernels
            streaming the cache; for ``fused``), ``sdpa``, ``triton`` (:mod:`modules.decode_attention`: split-K
            Triton kernels that read only each row's filled slots, so one window, the whole cache, serves every
            step: one capture per cache size; CUDA only, needs the triton package), or ``auto``
            (:func:`resolve_attention`: ``triton`` where it runs, ``matmul`` elsewhere). Same results within rounding; which is fastest
            on a GPU is what ``benchmarks/decode_kernels.py`` and ``benchmarks/rollout.py`` measure (on an H200
            at the 1B shape: ``triton`` with ``pack``).
        triton_launch: the Triton kernels' launch configuration where ``attention`` is ``triton`` (or ``auto`` on
            CUDA), by name: ``triton_s<split>_b<block>_w<warps>_p<stages>``, ``triton_n<parts>_...`` or
            ``triton_a<split>_...`` (:class:`modules.decode_attention.Launch`; ``benchmarks/decode_kernels.py
            --triton-sweep`` names the fastest); default ``triton_a128_b32_w4_p2``: one program per row and head
            where a stage's rows x heads fill the GPU's processors, else splits of 128 slots
            (:func:`modules.decode_attention.resolve_parts`), block 32, 4 warps, 2 stages.
        pack: each decoder layer's q/k/v and gate/up weights packed into one matrix each, read by one matmul
            instead of three and two (wider matmuls, fewer launches). Under autocast with ``weight_copy`` the
            packed matrices hold the autocast copies, at no extra memory; otherwise they are a copy of those
            weights while the buffers are held (Janus-Pro-1B in bf16: 1.7 GB, 7B: 8.4 GB). LoRA-wrapped
            projections are not packed.
        linear: how the step's projections run. ``torch`` (the default): ``F.linear`` and the modules' own calls
            (cuBLAS on a GPU). ``triton``, or a launch configuration's name ``triton_lin_n<N>_k<K>_s<S>_w<W>_p<P>``
            then ``_m<rows>``, ``_l`` and ``_c`` (:class:`modules.decode_linear.LinearLaunch`): :mod:`modules.decode_linear`'s kernels for the packed
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
            if isinstance(step, CapturedStep):
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
        copied = [] if not self.weight_copy or dtype is None else step_linears(model, dtype)
        groups = packable(model) if self.pack and self.weights == "model" else []
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
            entry = self._buffers[key] = weight_buffers(copied, groups, dtype, signature)
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
        (fixed addresses); returns :func:`fp8_buffers`'s entry (``packed``: per layer ``(qkv, gate_up, o, down)``,
        each ``(float8 weight, float32 scale per row)``)."""
        layers = quantizable(model)
        signature = [[(base_linear(m).weight.shape, base_linear(m).weight.dtype) for m in group] for layer in layers
                     for group in layer]
        key = ("fp8", id(model), device)
        entry = self._buffers.get(key)
        if entry is None or entry["signature"] != signature:
            entry = self._buffers[key] = fp8_buffers(layers, signature)
        # a LoRA layer's weight with its adapters merged in full precision (autocast would round B @ A to bf16)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for module, q, scale in entry["targets"]:
                fp8.quantize(live_weight(module), q, scale)
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
        tensors += [t for layer in self._packed or () for t in nested_tensors(layer)]
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
        """This step's uniforms, the same numbers ``noise.gumbel`` draws (global batch, then sliced): the noise's own
        :meth:`~modules.janus_ops.RowNoise.fill_uniform`, so subclasses such as ``modules.seeding.RowSeeds`` (one
        stream per row) keep their draws."""
        if full is not None:
            (noise if noise is not None else RowNoise()).fill_uniform(full)

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
                f"{first_line(error)}. Set sampling.engine_compile to 'cudagraphs' (CUDA) or 'off', which "
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
            return CapturedStep(step, self.graphs)
        if mode == "off" or mode in FUSED_MODES:
            return step
        raise_recompile_limit()
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
            raise_recompile_limit()
            options = dict(dynamic=None, fullgraph=True)
            if mode == "fused-autotune":
                options["mode"] = "max-autotune-no-cudagraphs"  # the engine captures the graphs itself
            self._parts = self._step_parts(lambda part: torch.compile(part, **options), attention)
        return self._parts

    def _step_parts(self, wrap, attention: str) -> StepParts:
        """The step's parts with this engine's kernels: ``attention`` resolved, the Triton launches, ``linear``."""
        project = None if self.linear == "torch" else functools.partial(project_triton, launch=self.linear_launch)
        return StepParts(wrap, attention=attention, launch=self.launch, project=project)


def _sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA), so that a timed first call counts its kernels."""
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
