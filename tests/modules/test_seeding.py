"""Per-image seeds: an image depends only on (seed, prompt line, sample), never on batching or sharding."""

from __future__ import annotations

import pytest
import torch

from datamodules.records import PromptRecord
from modules.engine import RolloutEngine
from modules.policy import SamplingConfig
from modules.seeding import RowSeeds, generate_janus, image_seed, image_seeds, prompt_line, rank_share

TEMPLATE = "plan a picture of {prompt}"


def records(*prompts: str, first_line: int = 1) -> list[PromptRecord]:
    return [PromptRecord(prompt=p, source=f"prompts.jsonl:{first_line + i}") for i, p in enumerate(prompts)]


def test_prompt_line_reads_the_source_and_refuses_records_without_one():
    assert prompt_line(PromptRecord(prompt="a", source="dir/with:colon/p.txt:12")) == 11
    with pytest.raises(ValueError, match="needs 'path:line'"):
        prompt_line(PromptRecord(prompt="a cup"))


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
