"""Evaluation sampling: per-image seeds (seed, prompt line, sample -> one image) and per-process shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from datamodules.records import PromptRecord
from modules.janus_ops import RowNoise
from modules.policy import JanusPolicy

_MASK64 = (1 << 64) - 1

# Independent streams derived from one image seed: the plan is sampled from one, the image from another.
PLAN_STREAM, IMAGE_STREAM = 1, 2


def _splitmix64(x: int) -> int:
    """One step of SplitMix64: a bijective 64-bit mix, so nearby inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (fits ``torch.Generator.manual_seed`` and JSON on every platform)."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (part & _MASK64))
    return h >> 1


def prompt_line(record: PromptRecord) -> int:
    """The 0-based line of a record in its prompt file, read from ``record.source`` (``"path:line"``).

    This index names the benchmark files (GenEval's ``{line:05d}`` folders, T2I-CompBench's running
    index) and seeds the prompt's images, so it must not depend on batching or on sharding.

    Raises:
        ValueError: the record has no ``path:line`` source (records built in code must set one).
    """
    _, sep, line = record.source.rpartition(":")
    if not sep or not line.isdigit() or int(line) < 1:
        raise ValueError(
            f"prompt {record.prompt!r} has source {record.source!r}; evaluation needs 'path:line' "
            "(records read by datamodules.prompts.load_prompts have it) to name and seed its images"
        )
    return int(line) - 1


def image_seed(base_seed: int, line: int, sample: int) -> int:
    """The seed of image ``sample`` of the prompt on 0-based ``line``, under the run's ``base_seed``."""
    return mix_seed(base_seed, line, sample)


def image_seeds(records: Sequence[PromptRecord], num_images: int, base_seed: int) -> list[int]:
    """Seeds of ``num_images`` images per record, rows prompt-major (``[P * num_images]``)."""
    return [image_seed(base_seed, prompt_line(r), i) for r in records for i in range(num_images)]


def rank_share(records: Sequence[PromptRecord], rank: int, world: int) -> list[PromptRecord]:
    """This process's contiguous share of whole prompts of a global batch (every process gets the same batch).

    Shares are ``ceil(P / world)`` prompts; the last processes may get fewer or none.
    """
    start = share_start(len(records), rank, world)
    return list(records[start : start + -(-len(records) // world)])


def share_start(prompts: int, rank: int, world: int) -> int:
    """Where :func:`rank_share`'s share of ``rank`` starts in a global batch of ``prompts`` prompts."""
    return min(rank * -(-prompts // world), prompts)


@dataclass
class RowSeeds(RowNoise):
    """Gumbel noise where row ``r`` comes from its own generator seeded by ``mix_seed(seeds[r], stream)``.

    A row's draws then depend only on its seed: the same image comes out whatever else shares the
    batch, whatever the batch size and however prompts are split over processes.

    Attributes:
        seeds: one seed per row.
        stream: which stream of each seed to draw from (:data:`PLAN_STREAM` or :data:`IMAGE_STREAM`).
    """

    seeds: tuple[int, ...] = ()
    stream: int = IMAGE_STREAM
    _generators: dict[str, list[torch.Generator]] = field(default_factory=dict, repr=False)

    def _for(self, device: torch.device) -> list[torch.Generator]:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = [
                torch.Generator(device=device).manual_seed(mix_seed(s, self.stream)) for s in self.seeds
            ]
        return self._generators[key]

    def gumbel(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        """``[rows, vocab]`` standard Gumbel noise, one independent stream per row."""
        if rows != len(self.seeds):
            raise ValueError(f"noise for {rows} rows requested but {len(self.seeds)} row seeds were given")
        u = torch.stack([torch.rand(vocab, generator=g, device=device) for g in self._for(device)])
        return -torch.log(-torch.log(u.clamp(min=1e-20)))

    def fill_uniform(self, out: torch.Tensor) -> None:
        """Write this step's uniforms ``[rows, V]`` into ``out``, row ``r`` from its own stream (the static engine's
        draw): the numbers :meth:`gumbel` transforms."""
        if out.shape[0] != len(self.seeds):
            raise ValueError(f"noise for {out.shape[0]} rows requested but {len(self.seeds)} row seeds were given")
        for row, generator in zip(out, self._for(out.device), strict=True):
            row.copy_(torch.rand(out.shape[1], generator=generator, device=out.device))


@torch.no_grad()
def generate_janus(
    policy: JanusPolicy,
    records: Sequence[PromptRecord],
    num_images: int,
    template: str | None,
    base_seed: int,
) -> dict:
    """Draw ``num_images`` per record with per-image seeds (plan first when ``template`` is given).

    Args:
        policy: the Janus policy (its ``sampling`` settings apply).
        records: ``P`` prompt records with ``path:line`` sources.
        num_images: images per prompt.
        template: the reasoning instruction around ``{prompt}``, or ``None`` to draw from the prompt alone.
        base_seed: the run's seed; image ``i`` of the prompt on line ``l`` uses
            ``image_seed(base_seed, l, i)``.

    Returns:
        ``{"images": uint8 [R, H, W, 3], "image_tokens": [R, N], "plans": list[str] | None,
        "prompts": list[str], "seeds": list[int], "records": records}``, ``R = P * num_images``, rows
        prompt-major.
    """
    if num_images < 1:
        raise ValueError(f"images per prompt must be >= 1, got {num_images}")
    seeds = image_seeds(records, num_images, base_seed)
    prompts = [r.prompt for r in records for _ in range(num_images)]
    was_training = policy.model.training
    policy.model.eval()  # sampling: no dropout, caches on
    try:
        plans = None
        if template is not None:
            plans = policy.sample_plans(
                prompts, template, 1, RowSeeds(seeds=tuple(seeds), stream=PLAN_STREAM)
            ).texts
        context = policy.image_context(prompts, plans)
        sample = policy.sample_images(context, RowSeeds(seeds=tuple(seeds), stream=IMAGE_STREAM))
        images = policy.decode(sample.tokens)
    finally:
        policy.model.train(was_training)
    out = {
        "images": images,
        "image_tokens": sample.tokens,
        "plans": plans,
        "prompts": prompts,
        "seeds": seeds,
    }
    return out | {"records": list(records)}
