"""Per-image seeds: an image depends only on (seed, prompt line, sample), never on batching or sharding."""

from __future__ import annotations

import types

import pytest
import torch

from datamodules.records import PromptRecord
from modules.engine import RolloutEngine
from modules.policy import SamplingConfig
from modules.seeding import (
    IMAGE_STREAM,
    PLAN_STREAM,
    RowSeeds,
    generate_janus,
    image_seed,
    image_seeds,
    mix_seed,
    prompt_line,
    rank_share,
    share_start,
)

TEMPLATE = "plan a picture of {prompt}"


def records(*prompts: str, first_line: int = 1) -> list[PromptRecord]:
    return [PromptRecord(prompt=p, source=f"prompts.jsonl:{first_line + i}") for i, p in enumerate(prompts)]


def test_prompt_line_reads_the_source_and_refuses_records_without_one():
    assert prompt_line(PromptRecord(prompt="a", source="dir/with:colon/p.txt:12")) == 11
    for source in ("", "p.txt:0", "p.txt:x", "p.txt:-3"):  # lines are 1-based
        with pytest.raises(ValueError, match="needs 'path:line'"):
            prompt_line(PromptRecord(prompt="a cup", source=source))


def test_seeds_differ_by_base_line_and_sample():
    seeds = {image_seed(b, line, s) for b in range(3) for line in range(20) for s in range(10)}
    assert len(seeds) == 3 * 20 * 10
    assert all(0 <= s < 2**63 for s in seeds)
    assert image_seeds(records("a", "b"), 2, 5) == [
        image_seed(5, 0, 0),
        image_seed(5, 0, 1),
        image_seed(5, 1, 0),
        image_seed(5, 1, 1),
    ]


def test_row_noise_depends_only_on_the_row_seed():
    both = RowSeeds(seeds=(11, 12)).gumbel(2, 50, torch.device("cpu"))
    alone = RowSeeds(seeds=(12,)).gumbel(1, 50, torch.device("cpu"))
    assert torch.equal(both[1], alone[0])
    assert not torch.equal(both[0], both[1])
    with pytest.raises(ValueError, match="3 rows requested but 2 row seeds"):
        RowSeeds(seeds=(1, 2)).gumbel(3, 5, torch.device("cpu"))


def test_rank_share_covers_the_batch_once():
    batch = records(*"abcde")
    shares = [rank_share(batch, rank, 3) for rank in range(3)]
    assert [[r.prompt for r in s] for s in shares] == [["a", "b"], ["c", "d"], ["e"]]
    assert rank_share(batch[:1], 1, 2) == []
    # 5 over 4: shares of 2, 2, 1 and none, the empty one starting at the end
    assert [share_start(5, rank, 4) for rank in range(4)] == [0, 2, 4, 5]


def test_janus_images_do_not_depend_on_batching(sharp_policy):
    batch = records("a red circle", "two blue squares left of a big green triangle", "a star")
    together = generate_janus(sharp_policy, batch, 2, TEMPLATE, base_seed=3)
    # The middle prompt alone (another batch size, another padding) and the batch reversed.
    alone = generate_janus(sharp_policy, batch[1:2], 2, TEMPLATE, base_seed=3)
    reversed_ = generate_janus(sharp_policy, batch[::-1], 2, TEMPLATE, base_seed=3)
    assert torch.equal(together["image_tokens"][2:4], alone["image_tokens"])
    assert together["plans"][2:4] == alone["plans"]
    assert torch.equal(together["images"][0:2], reversed_["images"][4:6])
    assert together["seeds"] == image_seeds(batch, 2, 3)
    assert together["records"] == batch and together["prompts"][::2] == [r.prompt for r in batch]
    assert not torch.equal(together["image_tokens"][0], together["image_tokens"][1])  # samples differ
    other = generate_janus(sharp_policy, batch, 2, TEMPLATE, base_seed=4)
    assert not torch.equal(together["image_tokens"], other["image_tokens"])


def test_janus_without_plan(sharp_policy):
    out = generate_janus(sharp_policy, records("a red circle"), 3, None, base_seed=0)
    assert out["plans"] is None and out["images"].dtype == torch.uint8 and out["images"].shape[0] == 3


def test_row_seeds_fill_the_static_engines_buffer_with_their_own_draws():
    """The engine draws each step's uniforms outside its step (``RolloutEngine.draw``): a ``RowSeeds`` must fill
    them from its per-row streams, not from torch's global stream."""
    engine, cpu = RolloutEngine(), torch.device("cpu")
    noise = RowSeeds(seeds=(11, 12))
    full, view = engine.noise_buffer(noise, 2, 50, cpu, greedy=False)
    expected = RowSeeds(seeds=(11, 12))
    for _ in range(2):  # the streams move on step by step, as gumbel's do
        engine.draw(noise, full)
        assert torch.equal(-torch.log(-torch.log(view.clamp(min=1e-20))), expected.gumbel(2, 50, cpu))
    with pytest.raises(ValueError, match="3 rows requested but 2 row seeds"):
        noise.fill_uniform(torch.empty(3, 5))


def test_static_engine_draws_the_eager_images_from_the_same_seeds(sharp_policy):
    batch = records("a red circle", "two blue squares left of a big green triangle")
    out = {}
    for engine in ("eager", "static"):
        sharp_policy.sampling = SamplingConfig(plan_max_tokens=8, cfg_scale=3.0, plan_top_k=20, image_top_p=0.9,
                                               image_temperature=0.8, engine=engine)
        out[engine] = generate_janus(sharp_policy, batch, 2, TEMPLATE, base_seed=3)
    assert out["static"]["plans"] == out["eager"]["plans"]
    assert torch.equal(out["static"]["image_tokens"], out["eager"]["image_tokens"])


def test_mix_seed_is_splitmix64_reference_values():
    """SplitMix64 (Steele, Lea and Flood 2014) from state 0 outputs 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4 (its state
    moving on by the golden gamma 0x9E3779B97F4A7C15); each part is XORed into the state and mixed, and the seed is
    the top 63 bits. A change here would change every evaluation image of every earlier run."""
    first, second, gamma = 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x9E3779B97F4A7C15
    assert mix_seed(0) == first >> 1
    assert mix_seed(gamma) == second >> 1
    assert mix_seed(0, first ^ gamma) == second >> 1  # the second part XORs the state to the gamma
    assert mix_seed(-1) == mix_seed((1 << 64) - 1)  # parts are taken modulo 2^64


def test_row_seeds_draw_each_stream_from_its_own_generator_step_after_step():
    """Row ``r``'s noise is the stream ``torch.Generator().manual_seed(mix_seed(seed, stream))``, moving on by one
    draw per call: the plan and the image of one seed draw different numbers."""
    assert PLAN_STREAM != IMAGE_STREAM
    cpu, vocab = torch.device("cpu"), 20
    for stream in (PLAN_STREAM, IMAGE_STREAM):
        noise = RowSeeds(seeds=(5, 6), stream=stream)
        generators = [torch.Generator().manual_seed(mix_seed(seed, stream)) for seed in (5, 6)]
        for _ in range(2):
            u = torch.stack([torch.rand(vocab, generator=g) for g in generators])
            assert torch.equal(noise.gumbel(2, vocab, cpu), -torch.log(-torch.log(u)))
    plan = RowSeeds(seeds=(5,), stream=PLAN_STREAM).gumbel(1, vocab, cpu)
    assert not torch.equal(plan, RowSeeds(seeds=(5,), stream=IMAGE_STREAM).gumbel(1, vocab, cpu))


@pytest.mark.parametrize("rows", [1, 3])
def test_row_seeds_refuse_another_number_of_rows(rows):
    noise = RowSeeds(seeds=(1, 2))
    with pytest.raises(ValueError, match=f"{rows} rows requested but 2 row seeds"):
        noise.gumbel(rows, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match=f"{rows} rows requested but 2 row seeds"):
        noise.fill_uniform(torch.empty(rows, 5))


class RecordingPolicy:
    """Stands in for ``JanusPolicy`` in ``generate_janus``: records the noise of each stage, draws nothing."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1)
        self.calls = {}

    def sample_plans(self, prompts, template, num_samples, noise):
        self.calls["plans"] = (list(prompts), template, num_samples, noise, self.model.training)
        return types.SimpleNamespace(texts=[f"plan of {p}" for p in prompts])

    def image_context(self, prompts, plans):
        self.calls["context"] = (list(prompts), plans)
        return "context"

    def sample_images(self, context, noise):
        self.calls["images"] = (context, noise, self.model.training)
        return types.SimpleNamespace(tokens=torch.arange(len(noise.seeds))[:, None])

    def decode(self, tokens):
        return tokens.to(torch.uint8)


@pytest.mark.parametrize("training", [True, False])
def test_generate_janus_draws_plans_and_images_from_their_own_streams_of_each_image_seed(training):
    policy, batch = RecordingPolicy(), records("a cup", "two dogs", first_line=4)
    policy.model.train(training)
    out = generate_janus(policy, batch, 2, TEMPLATE, base_seed=7)
    seeds = [image_seed(7, line, sample) for line in (3, 4) for sample in (0, 1)]
    prompts = ["a cup", "a cup", "two dogs", "two dogs"]
    plan_prompts, template, samples, plan_noise, plan_training = policy.calls["plans"]
    assert (plan_prompts, template, samples, plan_training) == (prompts, TEMPLATE, 1, False)
    assert (plan_noise.seeds, plan_noise.stream) == (tuple(seeds), PLAN_STREAM)
    _, image_noise, image_training = policy.calls["images"]
    assert (image_noise.seeds, image_noise.stream, image_training) == (tuple(seeds), IMAGE_STREAM, False)
    assert policy.calls["context"] == (prompts, [f"plan of {p}" for p in prompts])
    assert out["prompts"] == prompts and out["seeds"] == seeds and out["plans"] == policy.calls["context"][1]
    assert policy.model.training is training  # the caller's mode comes back
    with pytest.raises(ValueError, match="images per prompt must be >= 1, got 0"):
        generate_janus(policy, batch, 0, TEMPLATE, base_seed=7)
