"""Rollout speed: the eager KV-cache loop (janus_ops) against the static-cache engine, same process, same shapes.

Image-token sampling with classifier-free guidance (both branches in one batch), random weights, the same
contexts and the same seed for both. Prints one JSON line per measurement and one with the ratio:

    nice python benchmarks/rollout.py --shape toy                 # CPU, a small Janus (hidden 128, 4 layers)
    python benchmarks/rollout.py --shape 1b --prompts 16          # GPU, Janus-Pro-1B language-model shape, bf16
    python benchmarks/rollout.py --shape 7b --prompts 16          # GPU, Janus-Pro-7B shape, bf16

Shapes (checked against deepseek's Janus-Pro configs): 1B is LLaMA hidden 2048, 24 layers, 16 heads (16 KV
heads), MLP 5632, text vocab 102400; 7B hidden 4096, 30 layers, 32 heads (32 KV heads), MLP 11008; both
with head dim 128, an image vocabulary of 16384 (VQ code width 8) and 576 image tokens. The vision
tower and the VQ decoder are kept tiny: image sampling never runs them.

``ms_per_step`` is the wall time of one sampling call divided by the image tokens (the prefill
included); ``bandwidth_fraction`` is the time one step needs to read the language model, the generation
head and the filled KV cache once at the measured copy bandwidth, divided by ``ms_per_step`` (GPU only:
on a CPU the toy weights sit in cache and the figure means nothing). ``first_call_ratio`` in the ratio line
is one eager call's time over the engine's first call (its compiles and captures included): above 1, a run
is ahead of the eager loop from its first rollout.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import JanusConfig, JanusForConditionalGeneration

# the project's packages where it is not pip-installed (a GPU machine given the working tree): every benchmark
# imports this module first
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from modules import janus_ops  # noqa: E402
from modules.decode_attention import Launch  # noqa: E402
from modules.decode_linear import LinearLaunch  # noqa: E402
from modules.decode_step import ATTENTION  # noqa: E402
from modules.engine import COMPILE_MODES, RolloutEngine  # noqa: E402
from modules.engine_weights import quantizable  # noqa: E402
from modules.tiny import TinyJanusSpec, build_tiny_janus  # noqa: E402

LM_SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
               intermediate_size=5632),
    "7b": dict(hidden_size=4096, num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008),
}


def janus_at_shape(shape: str, device: torch.device, dtype: torch.dtype) -> JanusForConditionalGeneration:
    """A random Janus whose language model and generation parts have the real shape; tiny vision and VQ towers."""
    if shape == "toy":
        spec = TinyJanusSpec(hidden_size=128, num_layers=4, num_heads=4, image_size=64, patch_size=8,
                             codebook_size=256)
        return build_tiny_janus(spec)[0].to(device, dtype).eval()
    hidden = LM_SHAPES[shape]["hidden_size"]
    text = dict(model_type="llama", vocab_size=102400, head_dim=128, max_position_embeddings=16384,
                rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001, pad_token_id=100002, **LM_SHAPES[shape])
    vision = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=384, patch_size=16,
                  projection_dim=hidden, num_image_tokens=576, mlp_ratio=2.0)
    vq = dict(embed_dim=8, num_embeddings=16384, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, projection_dim=hidden, image_token_embed_dim=hidden, num_hidden_layers=2)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=100581)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype, on the device: no fp32 copy on the host
    try:
        with device:
            model = JanusForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def contexts(model, prompts: int, length: int, seed: int):
    """Left-padded conditional contexts ending in a begin-of-image id, and the paper's unconditional branch.

    Rows get between 3/4 and all of ``length`` real tokens, so the masks and positions matter.
    """
    generator = torch.Generator().manual_seed(seed)
    cfg = model.config.text_config
    ids = torch.randint(4, cfg.vocab_size, (prompts, length), generator=generator)
    real = torch.randint(max(2, 3 * length // 4), length + 1, (prompts, 1), generator=generator)
    mask = (torch.arange(length)[None] >= length - real).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, cfg.pad_token_id))
    first = length - real  # [P, 1]
    col = torch.arange(length)[None]
    keep = (col == first) | (col == length - 1) | (mask == 0)
    uncond = torch.where(keep, ids, torch.full_like(ids, cfg.pad_token_id))
    device = model.device
    return ids.to(device), mask.to(device), uncond.to(device)


def lm_bytes(model, fp8: bool = False) -> int:
    """Bytes one image-token step must read: decoder layers, final norm, generation head and aligner; ``fp8``: with
    the decoder's projections read as float8 (1 byte a weight, 4 per row for the scale: ``weights="fp8"``)."""
    parts = [model.model.language_model.layers, model.model.language_model.norm, model.model.generation_head,
             model.model.generation_aligner]
    total = sum(p.numel() * p.element_size() for part in parts for p in part.parameters())
    if fp8:
        projections = [m.weight for layer in quantizable(model) for group in layer for m in group]
        total -= sum(w.numel() * w.element_size() - w.numel() - 4 * w.shape[0] for w in projections)
    return total


def copy_bandwidth(device: torch.device) -> float | None:
    """Measured device-to-device copy bandwidth in bytes/s (read + write), or None on CPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * 10 * src.numel() / (time.perf_counter() - start)


def timed(fn, device: torch.device) -> tuple[float, float, object]:
    """``(wall s, process CPU s, output)`` of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water mark (KiB -> GiB)


def best_of(calls: dict, device: torch.device, rounds: int, limits: dict | None = None) -> dict:
    """Interleaved rounds of every call; per call the best wall and CPU seconds, the peak memory, an output.

    Interleaving and taking the best is the fairest reading on a shared machine: a burst of other jobs
    slows one round of every call, not every round of one. ``limits`` caps the rounds of named calls (the
    eager loop at the GPU shapes takes tens of seconds per call).
    """
    best = {name: dict(wall=float("inf"), cpu=float("inf"), peak=0.0, out=None) for name in calls}
    for round_ in range(rounds):
        for name, call in calls.items():
            if round_ >= (limits or {}).get(name, rounds):
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            wall, cpu, out = timed(call, device)
            # progress as it comes: a run cut short by a time limit still shows what it measured
            print(json.dumps(dict(measure="round", call=name, round=round_, wall_s=round(wall, 3))), flush=True)
            b = best[name]
            b.update(wall=min(b["wall"], wall), cpu=min(b["cpu"], cpu), peak=max(b["peak"], peak_gib(device)), out=out)
    return best


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu``: the ``device`` field of every benchmark's JSON lines."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def record(name: str, best: dict, args, device, n_tokens: int, bandwidth, step_bytes: float, extra=None) -> dict:
    """Print one JSON line for a measured call and return it."""
    ms = 1e3 * best["wall"] / n_tokens
    out = dict(
        measure=name, shape=args.shape, device=device_name(device),
        dtype=args.dtype, prompts=args.prompts, rows=2 * args.prompts, prompt_tokens=args.prompt_tokens,
        image_tokens=n_tokens, ms_per_step=round(ms, 4),
        cpu_ms_per_step=round(1e3 * best["cpu"] / n_tokens, 4) if device.type == "cpu" else None,
        images_per_s=round(args.prompts / best["wall"], 3), peak_gib=round(best["peak"], 3),
        peak_kind="cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        bandwidth_fraction=round(1e3 * step_bytes / bandwidth / ms, 4) if bandwidth else None,
        copy_bandwidth_tb_s=round(bandwidth / 1e12, 3) if bandwidth else None,
    )
    out.update(extra or {})
    print(json.dumps(out), flush=True)
    return out


def shape_arguments(description: str, compile_default: str) -> argparse.ArgumentParser:
    """The arguments of every benchmark that samples image tokens at a shape (this one, ``compile_cost.py``,
    ``profile_step.py``); finish with :func:`checked_args`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["toy", "1b", "7b"], default="toy")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (rows double with CFG)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--image-tokens", type=int, default=None, help="default: the model's (64 toy, 576)")
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--compile", default=compile_default,
                        help=f"engines, comma-separated: a compile mode ({', '.join(COMPILE_MODES)}), optionally "
                        f"with '+'-joined engine options: an attention ({', '.join(ATTENTION)}; default matmul) "
                        "or a triton launch configuration (triton_s<split>_b<block>_w<warps>_p<stages> or "
                        "triton_n<parts>_..., as decode_kernels.py --triton-sweep names them), 'pack' (packed q/k/v and gate/up "
                        "weights) and/or 'triton_lin' or a triton_lin_n<N>_k<K>_s<S>_w<W>_p<P> launch (the projections in "
                        "Triton, with pack), 'fp8' (the projections' weights in float8, with triton_lin) and 'fp8kv' (the KV cache in "
                        "float8, with triton), e.g. fused+reduce+pack, fused+pack+triton_s64_b64_w8_p2, "
                        "fused+pack+triton+triton_lin, fused+pack+triton+triton_lin+fp8+fp8kv")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bf16 at the 1b/7b shapes on a GPU, else fp32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def checked_args(parser: argparse.ArgumentParser, prompts: tuple[int, int], real_shapes_on_cpu: bool = False):
    """Parse and check; ``prompts`` is the default ``(on a GPU, on a CPU)``."""
    args = parser.parse_args()
    for spec in args.compile.split(","):
        try:
            engine_options(spec)
        except ValueError as error:
            parser.error(f"--compile: {error}")
    gpu = torch.cuda.is_available()
    if args.shape != "toy" and not gpu and not real_shapes_on_cpu:
        parser.error(f"--shape {args.shape} needs a CUDA device (random weights at the real shape, bf16)")
    args.dtype = args.dtype or ("bfloat16" if gpu and args.shape != "toy" else "float32")
    args.prompts = args.prompts or prompts[0 if gpu else 1]
    return args


def engine_options(spec: str) -> dict:
    """``RolloutEngine`` arguments from one ``--compile`` entry: ``MODE[+ATTENTION][+pack][+triton_lin][+fp8][+fp8kv]``."""
    mode, *options = spec.split("+")
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown mode {mode!r} in {spec!r}; choose from {', '.join(COMPILE_MODES)}")
    kwargs = dict(compile=mode)
    for option in options:
        linear = option == "triton_lin" or option.startswith("triton_lin_")
        if option in ATTENTION and "attention" not in kwargs:
            kwargs["attention"] = option
        elif linear and "linear" not in kwargs:
            kwargs["linear"] = "triton" if option == "triton_lin" else LinearLaunch.parse(option).name
        elif not linear and option.startswith("triton_") and "attention" not in kwargs:
            kwargs.update(attention="triton", triton_launch=Launch.parse(option).name)
        elif option == "pack" and "pack" not in kwargs:
            kwargs["pack"] = True
        elif option == "fp8" and "weights" not in kwargs:
            kwargs["weights"] = "fp8"
        elif option == "fp8kv" and "kv" not in kwargs:
            kwargs["kv"] = "fp8"
        else:
            raise ValueError(f"unknown or repeated option {option!r} in {spec!r}: one of {', '.join(ATTENTION)} "
                             "(or a triton launch, triton_s<split>_... or triton_n<parts>_...), pack, triton_lin "
                             "(or triton_lin_n<N>_...), fp8 and/or fp8kv")
    return kwargs


@dataclass
class Bench:
    """A model at the benchmark's shape and its contexts: what every measured call samples from."""

    args: argparse.Namespace
    device: torch.device
    model: JanusForConditionalGeneration
    n_tokens: int
    ids: torch.Tensor
    mask: torch.Tensor
    uncond: torch.Tensor

    @classmethod
    def build(cls, args: argparse.Namespace) -> Bench:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = janus_at_shape(args.shape, device, getattr(torch, args.dtype))
        n_tokens = args.image_tokens or model.config.vision_config.num_image_tokens
        return cls(args, device, model, n_tokens, *contexts(model, args.prompts, args.prompt_tokens, args.seed))

    def engines(self, **kwargs) -> dict[str, RolloutEngine]:
        """One engine per entry of ``--compile`` (see :func:`engine_options`), keyed by the entry."""
        return {spec: RolloutEngine(**engine_options(spec), **kwargs) for spec in self.args.compile.split(",")}

    def sampler(self, fn):
        """A call of ``fn`` (``janus_ops.sample_image_tokens`` or an engine's) with CFG and a fresh seeded noise."""

        def call():
            noise = janus_ops.RowNoise(torch.Generator(device=self.device).manual_seed(self.args.seed))
            return fn(self.model, self.ids, self.mask, self.n_tokens, self.uncond, self.args.cfg_scale, noise=noise)

        return call


def parse_args() -> argparse.Namespace:
    parser = shape_arguments(__doc__, compile_default="auto")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    parser.add_argument("--eager-rounds", type=int, default=None, help="rounds of the eager loop (default: --rounds)")
    parser.add_argument("--chunk", type=int, default=None, help="engine capacity/window granularity (slots)")
    return checked_args(parser, prompts=(4, 4))


def main() -> None:
    args = parse_args()
    b = Bench.build(args)
    device, model, n_tokens = b.device, b.model, b.n_tokens
    cfg = model.config.text_config
    kv_bytes_per_slot = 2 * cfg.num_hidden_layers * 2 * args.prompts * cfg.num_key_value_heads * cfg.head_dim * (
        2 if args.dtype == "bfloat16" else 4)
    # the least a step must read: the weights once and the filled cache (mean over the image) once
    kv_bytes = kv_bytes_per_slot * (args.prompt_tokens + n_tokens / 2)
    step_bytes = lm_bytes(model) + kv_bytes
    bandwidth = copy_bandwidth(device)

    engines = {f"static[{spec}]": engine for spec, engine in b.engines(chunk=args.chunk).items()}
    calls = {"eager": b.sampler(janus_ops.sample_image_tokens)}
    first_s = {}
    for name, engine in list(engines.items()):
        call = b.sampler(engine.sample_image_tokens)
        try:
            first_s[name] = timed(call, device)[0]  # compiles and captures every window of this shape
        except Exception as error:  # an engine that cannot run here is reported; the others are still measured
            print(json.dumps(dict(measure="first_call", call=name, error=f"{type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''}")), flush=True)
            del engines[name]
            continue
        calls[name] = call
        print(json.dumps(dict(measure="first_call", call=name, wall_s=round(first_s[name], 2),
                              compile_s=round(engine.stats.compile_s, 2), variants=engine.stats.variants)), flush=True)
    best = best_of(calls, device, args.rounds, {"eager": args.eager_rounds or args.rounds})
    common = (args, device, n_tokens, bandwidth, step_bytes)
    eager = record("eager", best["eager"], *common)
    for name, engine in engines.items():
        # fp8 / fp8kv: the fraction of the bytes this engine must read (a float8 cache: a byte an entry and 4 a vector)
        cache = kv_bytes if engine.kv == "model" else kv_bytes * (1 + 4 / cfg.head_dim) / (2 if args.dtype == "bfloat16" else 4)
        least = (*common[:-1], lm_bytes(model, fp8=engine.weights == "fp8") + cache)
        static = record(name, best[name], *least, extra=dict(
            compile_mode=engine.mode(device), attention=engine.attention, pack=engine.pack,
            triton_launch=engine.triton_launch, linear=engine.linear, weights=engine.weights, kv=engine.kv,
            compile_s=round(engine.stats.compile_s, 2),
            first_call_s=round(first_s[name], 2), variants=engine.stats.variants, captures=engine.stats.captures))
        a, b = best["eager"]["out"], best[name]["out"]
        print(json.dumps(dict(
            measure="ratio", engine=name, shape=args.shape, device=static["device"],
            images_per_s_ratio=round(static["images_per_s"] / eager["images_per_s"], 2),
            # > 1: the engine's first call, compiles and captures included, beats one call of the eager loop
            first_call_ratio=round(best["eager"]["wall"] / first_s[name], 2),
            cpu_time_ratio=round(best["eager"]["cpu"] / best[name]["cpu"], 2) if device.type == "cpu" else None,
            same_tokens=torch.equal(a.tokens, b.tokens),
            max_logp_diff=float((a.logp_guided - b.logp_guided).abs().max()),
            mean_logp_diff=float((a.logp_guided - b.logp_guided).abs().mean()),
        )), flush=True)


if __name__ == "__main__":
    main()
