"""The memory plan: each component's arithmetic by hand, sharding, LoRA and beta, the recipes, and the
estimate against what a tiny Janus really allocates on CPU (tensor sizes, KV cache, profiler peak)."""

from __future__ import annotations

import dataclasses
import json
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.profiler import ProfilerActivity, profile

from bicot import loop, memory
from bicot.loss import GRPOConfig
from bicot.memory import Lengths, Numerics, kv_cache_bytes, layer_activation_bytes, load_shape, plan_for
from bicot.templates import resolve_template
from datamodules.records import PromptRecord
from modules import decode_attention, fp8, janus_ops
from modules.policy import JanusPolicy, SamplingConfig
from modules.tiny import TinyJanusSpec

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
# Big enough that the decoder layers dominate what the update keeps, small enough for milliseconds.
MEASURE_SPEC = dict(hidden_size=128, num_layers=4, num_heads=4, image_size=64, patch_size=8, codebook_size=256)
PROMPTS = [PromptRecord("a red circle above a blue square"), PromptRecord("three green stars")]
G = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(spec: dict, precision: str = "32-true", **model) -> dict:
    """A recipe as the YAML would give it (no class_path/init_args levels), on the tiny model."""
    return {
        "trainer": {"precision": precision, "devices": 1, **model.pop("trainer", {})},
        "model": {"policy": {"tiny": spec, "sampling": {"plan_max_tokens": 12, "cfg_scale": 3.0}},
                  "algo": {"num_generations": G, "beta": 0.01}, **model},
        "data": {"batch_size": len(PROMPTS)},
    }


def small_shape(**fields) -> memory.ModelShape:
    """The tiny shape with hand-picked dimensions for arithmetic checks."""
    return dataclasses.replace(load_shape(tiny=TinyJanusSpec()), **fields)


# --------------------------------------------------------------------------- arithmetic by hand


def test_kv_cache_bytes_by_hand():
    shape = small_shape(layers=2, kv_heads=2, head_dim=4)
    # 2 layers x 3 rows x 5 tokens x 2 heads x 4 dims x (4 B keys + 2 B values)
    assert kv_cache_bytes(shape, rows=3, tokens=5, k_bytes=4, v_bytes=2) == 2 * 3 * 5 * 2 * 4 * 6


@pytest.mark.parametrize(
    ("num", "expected"),
    [
        (Numerics(4, 2, 4, True, 4), 36 * 8 + 8 * 16),  # bf16-mixed, fp32 weights
        (Numerics(2, 2, 2, False, 2), 26 * 8 + 8 * 16),  # bf16 weights
        (Numerics(4, 4, 4, False, 4), 44 * 8 + 16 * 16),  # fp32
    ],
)
def test_layer_activation_bytes_by_hand(num, expected):
    shape = small_shape(hidden=8, intermediate=16, heads=2, kv_heads=2, head_dim=4)
    assert layer_activation_bytes(shape, num) == expected


def test_numerics_of_precisions():
    assert memory.numerics("bf16-mixed", "float32") == Numerics(4, 2, 4, True, 4)
    assert memory.numerics("bf16-mixed", "bfloat16").casts is False  # nothing to cast: weights are bf16
    assert memory.numerics("bf16-true", "float32").weight == 2  # Lightning converts the module
    assert memory.numerics("32-true", "float32") == Numerics(4, 4, 4, False, 4)


def test_weights_gradients_optimizer_and_logits_by_hand(tiny_spec):
    spec = dataclasses.asdict(tiny_spec)
    p = plan_for(tiny_config(spec), 1)
    shape, r = p.recipe.shape, p.recipe
    assert p.policy_weights_gib * GIB == shape.total_params * 4
    assert r.trainable_params == shape.part_params["language_model"]
    assert p.gradients_gib * GIB == r.trainable_params * 4
    assert p.optimizer_gib * GIB == 2 * r.trainable_params * 4  # exp_avg and exp_avg_sq
    assert p.reference_gib == p.policy_weights_gib  # beta > 0: a frozen copy
    rows = len(PROMPTS) * G
    text = rows * 12 * shape.text_vocab
    image = rows * shape.image_tokens * shape.image_vocab
    assert p.logits_gib * GIB == 4 * (text + image) + (4 + 4) * max(text, image)


def test_sharding_divides_by_world_size(tiny_spec):
    config = tiny_config(dataclasses.asdict(tiny_spec), trainer={"strategy": "bicot.parallel.FSDP2Strategy"})
    config["data"]["batch_size"] = 4  # 16 rollout rows: an even share on 1, 2 and 4 processes
    one, four = plan_for(config, 1), plan_for(config, 4)
    for name in ("policy_weights_gib", "gradients_gib", "optimizer_gib", "reference_gib"):
        assert getattr(four, name) == pytest.approx(getattr(one, name) / 4)
    assert four.rollout_gather_gib == pytest.approx(one.policy_weights_gib)  # the gathered copy is whole
    assert four.kv_cache_gib == pytest.approx(one.kv_cache_gib / 4)  # each process samples 1/4 of the rows
    unsharded = plan_for(tiny_config(dataclasses.asdict(tiny_spec)), 4)
    assert unsharded.policy_weights_gib == one.policy_weights_gib and unsharded.rollout_gather_gib == 0


def test_lora_and_beta_zero_remove_the_reference():
    config = {"trainer": {"precision": "bf16-mixed", "devices": 8, "strategy": "bicot.parallel.FSDP2Strategy"},
              "model": {"policy": {"model_name_or_path": "janus-pro-7b"}, "algo": {"beta": 0.01}},
              "data": {"batch_size": 16}}
    full = plan_for(config)
    assert full.reference_gib > 0 and full.score_gather_gib > 0
    config["model"]["policy"]["lora"] = {"r": 16}
    lora = plan_for(config)
    h, i, layers = 4096, 11008, 30
    adapters = layers * 16 * (4 * (h + h) + 2 * (h + i) + (i + h))  # q, k, v, o; gate, up; down
    assert lora.recipe.trainable_params == adapters
    assert lora.reference_gib == 0
    assert lora.optimizer_gib * GIB == pytest.approx(2 * adapters * 4 / 8)
    assert lora.score_gather_gib == pytest.approx(lora.rollout_gather_gib)  # the policy, adapters off
    assert memory._lora({"r": 8, "target_modules": "all-linear"}) == (8, memory.LORA_TARGETS)
    assert memory.lora_params(lora.recipe.shape, 8, ("q_proj", "v_proj")) == layers * 8 * 2 * (h + h)
    config["model"]["policy"].pop("lora")
    config["model"]["algo"]["beta"] = 0.0
    no_kl = plan_for(config)
    assert no_kl.reference_gib == no_kl.score_gather_gib == no_kl.reference_logits_gib == 0
    assert no_kl.optimizer_gib == full.optimizer_gib


def test_activation_checkpointing_shrinks_the_update():
    config = {"trainer": {"precision": "bf16-mixed"}, "data": {"batch_size": 4},
              "model": {"policy": {"model_name_or_path": "janus-pro-1b"}, "minibatch_size": 8}}
    off, on = plan_for(config, activation_checkpointing=False), plan_for(config, activation_checkpointing=True)
    assert on.activations_gib < off.activations_gib / 5
    assert on.weight_casts_gib < off.weight_casts_gib
    assert off.activations_gib == off.activations_without_checkpointing_gib == on.activations_without_checkpointing_gib
    assert on.update_gib < off.update_gib


# --------------------------------------------------------------------------- shapes and recipes


def test_presets_match_the_janus_pro_configs():
    seven = load_shape("deepseek-community/Janus-Pro-7B")
    assert (seven.name, seven.hidden, seven.layers, seven.heads, seven.kv_heads, seven.head_dim) == (
        "janus-pro-7b", 4096, 30, 32, 32, 128)
    assert (seven.intermediate, seven.text_vocab, seven.image_vocab, seven.image_tokens, seven.image_side) == (
        11008, 102400, 16384, 576, 384)
    assert 7.40e9 < seven.total_params < 7.42e9  # the 14.8 GB bf16 checkpoint
    one = load_shape("janus-pro-1b")
    assert (one.hidden, one.layers, one.heads, one.intermediate) == (2048, 24, 16, 5632)
    assert 2.07e9 < one.total_params < 2.08e9
    with pytest.raises(ValueError, match="no checkpoint folder"):
        load_shape(str(ROOT / "no-such-checkpoint"))


def test_checkpoint_folder_is_read_from_its_config(tiny_janus_dir, tiny_spec):
    from_folder = load_shape(str(tiny_janus_dir))
    assert from_folder.total_params == load_shape(tiny=tiny_spec).total_params
    assert from_folder.hidden == tiny_spec.hidden_size


def test_7b_recipe_prints_a_plan_at_8_gpus(capsys):
    """Parses the recipe like ``bicot fit`` without building anything: its expert checkpoints do not exist here."""
    assert memory.main(["-c", str(ROOT / "configs/t2i_r1_janus_pro_7b.yaml"), "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "janus-pro-7b (7.41 B parameters), 8 GPU(s), FSDP2, precision bf16-mixed" in out
    weights = 7.4078e9 * 4 / 8 / GIB
    assert re.search(rf"policy weights \(float32, 1/8 shard\)\s+{weights:.2f}", out)
    assert "experts moved in to score (ORM)" in out
    peak = float(re.search(r"peak per GPU: ([\d.]+) GiB", out).group(1))
    assert 30 < peak < 200
    assert ("WARNING" in out) == (peak > 80.0)


def test_1b_recipe_reads_its_config():
    r = memory.recipe_from_config(memory.parse_config(["-c", str(ROOT / "configs/janus_pro_1b_1gpu.yaml")]))
    assert (r.world_size, r.sharded, r.prompts, r.group_size, r.minibatch_size) == (1, False, 4, 8, 8)
    assert (r.precision, r.policy_dtype, r.reference, r.plan_tokens, r.cfg) == ("bf16-mixed", "float32", "copy", 128, True)
    assert {e.name: (e.placement, e.dtype) for e in r.experts} == {
        "HPSExpert": ("device", "float16"), "GroundingDinoExpert": ("device", "float32"),
        "GitVQAExpert": ("device", "float32"), "ORMExpert": ("offload", "bfloat16")}


def test_warn_if_too_big():
    config = {"trainer": {"precision": "bf16-mixed"}, "data": {"batch_size": 4},
              "model": {"policy": {"model_name_or_path": "janus-pro-1b"}}}
    p = plan_for(config, 1)
    assert memory.warn_if_too_big(p, p.total_gib + 1) is None
    with pytest.warns(memory.MemoryPlanWarning, match="GiB per GPU"):
        message = memory.warn_if_too_big(p, p.total_gib - 1)
    assert message and "python -m bicot.memory" in message
    assert "WARNING" in memory.format_plan(p, p.total_gib - 1)
    assert "WARNING" not in memory.format_plan(p, p.total_gib + 1)


CONFIG_1B = str(ROOT / "configs/janus_pro_1b_1gpu.yaml")


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--world-size", "0", "argument --world-size: must be at least 1, got 0"),
        ("--world-size", "two", "argument --world-size: not an integer: 'two'"),
        ("--prompt-tokens", "-5", "argument --prompt-tokens: must be at least 1, got -5"),
        ("--template-tokens", "-1", "argument --template-tokens: must be at least 0, got -1"),
        ("--gpu-gib", "0", "argument --gpu-gib: must be a number above 0, got 0"),
        ("--gpu-gib", "nan", "argument --gpu-gib: must be a number above 0, got nan"),
    ],
)
def test_cli_refuses_meaningless_numbers(flag, value, message, capsys):
    """Refused by argparse, before the config is parsed: a plan for 0 GPUs or -5 tokens means nothing."""
    with pytest.raises(SystemExit) as exit_info:
        memory.main(["-c", CONFIG_1B, flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m bicot.memory: error: {message}"


def test_cli_plan_errors_are_one_line(monkeypatch, capsys):
    """The plan's own errors (a hub id not in the cache, an unknown dtype) end the command in one line."""
    def plan_for(*args, **kwargs):
        raise ValueError("memory plan: cannot read a Janus config from 'owner/name' (not in the\ncache)")

    monkeypatch.setattr("bicot.memory.cli.parse_config", lambda args: {})
    monkeypatch.setattr("bicot.memory.cli.plan_for", plan_for)
    with pytest.raises(SystemExit) as exit_info:
        memory.main(["-c", CONFIG_1B, "--shape", "owner/name"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "python -m bicot.memory: error: cannot read a Janus config from 'owner/name' (not in the cache)\n"
    )
    def bug(*args, **kwargs):
        raise ValueError("math domain error")

    monkeypatch.setattr("bicot.memory.cli.plan_for", bug)  # not one of the plan's messages: a traceback
    with pytest.raises(ValueError, match="math domain error"):
        memory.main(["-c", CONFIG_1B])


def test_plan_of_a_live_module_matches_the_plan_of_its_config(tiny_spec):
    """``recipe_from_module`` (for ``BiCoTGRPO.setup``) counts the built model like the config path does."""
    import lightning.pytorch as pl

    from bicot.grpo import BiCoTGRPO
    from modules.rewards.color import ColorMatchExpert
    from modules.rewards.ensemble import RewardEnsemble

    spec = dataclasses.asdict(tiny_spec)
    policy = JanusPolicy(tiny=tiny_spec, sampling=SamplingConfig(plan_max_tokens=12, cfg_scale=3.0))
    module = BiCoTGRPO(policy, RewardEnsemble([ColorMatchExpert()]), GRPOConfig(num_generations=G, beta=0.01))
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", logger=False)
    live = memory.plan(memory.recipe_from_module(module, prompts=len(PROMPTS)))
    config = tiny_config(spec, "bf16-mixed", rewards={"experts": [{"class_path": "modules.rewards.color.ColorMatchExpert"}]})
    planned = plan_for(config, 1)
    for name in ("policy_weights_gib", "optimizer_gib", "reference_gib", "kv_cache_gib", "activations_gib",
                 "weight_casts_gib", "logits_gib", "total_gib"):
        assert getattr(live, name) == pytest.approx(getattr(planned, name)), name


def test_the_plan_context_counts_the_plan_system_prompt_the_policy_will_use(tmp_path, tiny_spec):
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    from bicot.memory.recipe import INSTRUCTION_TOKENS, system_prompt_tokens

    def template(shape=None, lengths=None, **policy):
        config = tiny_config(dataclasses.asdict(tiny_spec))
        config["model"]["policy"].update(policy)
        return plan_for(config, 1, shape=shape, lengths=lengths).recipe.lengths.template_tokens

    default = INSTRUCTION_TOKENS + system_prompt_tokens(DEFAULT_SYSTEM_PROMPT)
    assert system_prompt_tokens(DEFAULT_SYSTEM_PROMPT) == 36 and system_prompt_tokens("") == 0
    assert template() == INSTRUCTION_TOKENS  # a tiny processor sets no default system prompt
    assert template(shape="janus-pro-1b") == default  # Janus-Pro's converted checkpoints do
    assert template(shape="janus-pro-1b", plan_system_prompt="") == INSTRUCTION_TOKENS
    assert template(plan_system_prompt="Plan it.") == INSTRUCTION_TOKENS + system_prompt_tokens("Plan it.\n\n")
    assert template(shape="janus-pro-1b", lengths=Lengths(64, 7)) == 7  # --template-tokens wins
    folder = tmp_path / "ckpt"  # a folder's processor_config.json says
    folder.mkdir()
    (folder / "config.json").write_text(load_shape_config_json())
    (folder / "processor_config.json").write_text(json.dumps({"use_default_system_prompt": True}))
    assert template(shape=str(folder)) == default
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "JanusProcessor"}))
    assert template(shape=str(folder)) == INSTRUCTION_TOKENS


def load_shape_config_json() -> str:
    """A small Janus config.json (the tiny model's), as a checkpoint folder holds it."""
    from modules.tiny import build_tiny_janus

    model, _ = build_tiny_janus(TinyJanusSpec())
    return model.config.to_json_string()


# --------------------------------------------------------------------------- against measurements


def tiny_rollout(policy: JanusPolicy, context) -> loop.Rollout:
    with context:
        r = loop.rollout_phase(policy, PROMPTS, G, resolve_template("default"), loop.RowPlacement(seed=0))
    r.rewards = torch.rand(r.num_rows)
    r.global_rewards, r.advantages = r.rewards, torch.randn(r.num_rows)
    return r


def exact_lengths(r: loop.Rollout) -> Lengths:
    """The token counts this rollout really has, so the plan and the measurement see the same batch."""
    plan = r.plan_tokens.shape[1]
    prompt = r.image_cond_ids.shape[1] - plan
    return Lengths(prompt_tokens=prompt, template_tokens=r.plan_context_ids.shape[1] - prompt)


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}.values())


def test_kv_cache_matches_the_dynamic_cache(monkeypatch):
    """The rollout's image-stage cache, under bf16 autocast with fp32 weights: K in fp32, V in bf16."""
    caches = []

    class Recorded(janus_ops.DynamicCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(janus_ops, "DynamicCache", Recorded)
    policy = JanusPolicy(tiny=TinyJanusSpec(**MEASURE_SPEC))
    context = policy.image_context([r.prompt for r in PROMPTS], None)
    with MixedPrecision("bf16-mixed", "cpu").forward_context():
        policy.sample_images(context)
    layers = caches[-1].layers
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    num = memory.numerics("bf16-mixed", "float32")
    assert (layers[0].keys.dtype, layers[0].values.dtype) == (torch.float32, torch.bfloat16)
    tokens = context.cond_ids.shape[1] + policy.num_image_tokens - 1  # the last token is never fed back
    shape = load_shape(tiny=TinyJanusSpec(**MEASURE_SPEC))
    assert measured == kv_cache_bytes(shape, 2 * len(PROMPTS), tokens, num.residual, num.compute)


def _fsdp2_bf16_cache(rank: int, world: int, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from bicot.parallel import ParallelConfig, gathered, parallelize

    caches = []

    class Recorded(janus_ops.DynamicCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    janus_ops.DynamicCache = Recorded
    policy = JanusPolicy(tiny=TinyJanusSpec(**MEASURE_SPEC), sampling=SamplingConfig(plan_max_tokens=12, cfg_scale=3.0))
    parallelize(policy.model, init_device_mesh("cpu", (world,)), ParallelConfig(param_dtype="bfloat16"))
    residual = set()  # dtypes entering and leaving a decoder layer and its first RMSNorm
    layer = policy.model.model.language_model.layers[1]
    for module in (layer, layer.input_layernorm):
        module.register_forward_hook(
            lambda m, args, out: residual.update(str(t.dtype) for t in (args[0], out[0] if isinstance(out, tuple) else out))
        )
    context = policy.image_context([r.prompt for r in PROMPTS], None)
    mixed = MixedPrecision("bf16-mixed", "cpu")
    with mixed.forward_context(), gathered(policy.model):
        policy.sample_images(context)
    layers = caches[-1].layers
    results["dtypes"] = (str(layers[0].keys.dtype), str(layers[0].values.dtype))
    results["bytes"] = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    results["tokens"] = context.cond_ids.shape[1] + policy.num_image_tokens - 1
    results["rollout_residual"] = sorted(residual)
    residual.clear()
    r = tiny_rollout(policy, mixed.forward_context())  # gathers layer by layer, as the update does
    with mixed.forward_context():
        out, _ = loop.minibatch_loss(policy, r, GRPOConfig(num_generations=G, beta=0.0), None)
    out.loss.backward()
    results["update_residual"] = sorted(residual)


@pytest.mark.slow
def test_kv_cache_and_residual_stream_under_fsdp2_bf16_gathers_are_bf16():
    """With ``model.parallel.param_dtype: bfloat16`` the gathered embeddings are bf16, so the residual stream
    (rollout and update) and K are too; the plan counts them so."""
    from gloo import run_ranks

    results = run_ranks(_fsdp2_bf16_cache, 1)
    assert results["dtypes"] == ("torch.bfloat16", "torch.bfloat16")
    assert results["rollout_residual"] == results["update_residual"] == ["torch.bfloat16"]
    config = tiny_config(dataclasses.asdict(TinyJanusSpec(**MEASURE_SPEC)), "bf16-mixed",
                         parallel={"param_dtype": "bfloat16"})
    config["trainer"]["strategy"] = "bicot.parallel.FSDP2Strategy"
    recipe = memory.recipe_from_config(config, 1)
    assert recipe.sharded and recipe.param_dtype == "bfloat16"
    num = memory.recipe_numerics(recipe)
    assert (num.residual, num.casts) == (2, False)  # the measured bf16 residual stream; nothing to re-cast
    k, v = memory.eager_cache_bytes(num)
    shape = load_shape(tiny=TinyJanusSpec(**MEASURE_SPEC))
    assert (k, v) == (2, 2)
    assert results["bytes"] == kv_cache_bytes(shape, 2 * len(PROMPTS), results["tokens"], k, v)
    # the update's activations: a bf16 residual stream, no autocast weight casts to keep
    planned = memory.plan(recipe)
    assert planned.activations_gib * GIB == memory.activation_bytes(recipe, num, recipe.activation_checkpointing)
    unsharded = memory.plan(dataclasses.replace(recipe, param_dtype=None))
    assert planned.activations_gib < unsharded.activations_gib and planned.vq_decode_gib == unsharded.vq_decode_gib


def test_static_engine_buffers_match_the_plan(monkeypatch):
    """The static engine's KV buffers of both stages and its bf16 weight copy, under bf16 autocast with fp32
    weights, at the capacity the plan rounds to (128 slots, the CUDA chunk), against what the engine holds."""
    from modules.engine import RolloutEngine

    monkeypatch.setattr("modules.engine.DEFAULT_CHUNK", {"cpu": 128, "cuda": 128})
    policy = JanusPolicy(tiny=TinyJanusSpec(**MEASURE_SPEC), sampling=SamplingConfig(
        plan_max_tokens=12, cfg_scale=3.0, engine="static"))
    policy._engine = engine = RolloutEngine(compile="off")
    with MixedPrecision("bf16-mixed", "cpu").forward_context():
        r = loop.rollout_phase(policy, PROMPTS, G, resolve_template("default"), loop.RowPlacement(seed=0))
        # rollout_phase freed the buffers before decoding (end_rollout); sample again to see them held
        assert not engine._buffers
        policy.sample_plans([p.prompt for p in PROMPTS for _ in range(G)], resolve_template("default"), 1)
        policy.sample_images(loop.image_context(r))
    held = sum(t.nbytes for state in engine._buffers.values() for t in [*state.get("kv", []), *state.get("copies", [])])
    shape = load_shape(tiny=TinyJanusSpec(**MEASURE_SPEC))
    config = tiny_config(dataclasses.asdict(TinyJanusSpec(**MEASURE_SPEC)), "bf16-mixed")
    config["model"]["policy"]["sampling"]["engine"] = "static"
    lengths = exact_lengths(r)
    planned = memory.plan(dataclasses.replace(memory.recipe_from_config(config, 1), lengths=lengths, shape=shape))
    assert held == pytest.approx(planned.engine_buffers_gib * GIB, rel=1e-3)  # the plan counts a few biases too
    assert planned.rollout_gib > planned.engine_buffers_gib and planned.update_gib < plan_for(
        {**config, "model": {**config["model"], "policy": {**config["model"]["policy"], "sampling": {
            **config["model"]["policy"]["sampling"], "engine_compile": "reduce-overhead"}}}}, 1).update_gib
    # the eager loop holds nothing between stages
    config["model"]["policy"]["sampling"]["engine"] = "eager"
    assert plan_for(config, 1).engine_buffers_gib == 0


def test_packed_engine_weights_match_the_plan(monkeypatch):
    """``sampling.engine_pack`` with bf16 weights: the packed q/k/v and gate/up matrices are a copy the plan counts;
    under bf16-mixed they hold the autocast copies, and the plan adds nothing."""
    from modules.engine import RolloutEngine

    monkeypatch.setattr("modules.engine.DEFAULT_CHUNK", {"cpu": 128, "cuda": 128})
    sampling = SamplingConfig(plan_max_tokens=12, cfg_scale=3.0, engine="static", engine_pack=True)
    policy = JanusPolicy(tiny=TinyJanusSpec(**MEASURE_SPEC), sampling=sampling, dtype="bfloat16")
    policy._engine = engine = RolloutEngine(compile="off", pack=True)
    r = loop.rollout_phase(policy, PROMPTS, G, resolve_template("default"), loop.RowPlacement(seed=0))
    policy.sample_plans([p.prompt for p in PROMPTS for _ in range(G)], resolve_template("default"), 1)
    policy.sample_images(loop.image_context(r))
    states = engine._buffers.values()
    # the step_weights entry holds the packs; each stage's state refers to the same matrices
    packs = list({t.data_ptr(): t for state in states for pair in state.get("packed") or () for t in pair}.values())
    assert packs and all(t.dtype == torch.bfloat16 for t in packs)
    held = sum(t.nbytes for t in packs) + sum(t.nbytes for state in states for t in state.get("kv", []))
    config = tiny_config(dataclasses.asdict(TinyJanusSpec(**MEASURE_SPEC)), "bf16-true")
    config["model"]["policy"]["sampling"].update(engine="static", engine_pack=True)
    recipe = dataclasses.replace(memory.recipe_from_config(config, 1), lengths=exact_lengths(r))
    assert recipe.engine_pack
    planned = memory.plan(recipe)
    assert held == pytest.approx(planned.engine_buffers_gib * GIB, rel=1e-6)
    unpacked = memory.plan(dataclasses.replace(recipe, engine_pack=False))
    assert planned.engine_buffers_gib * GIB - unpacked.engine_buffers_gib * GIB == pytest.approx(
        sum(t.nbytes for t in packs), rel=1e-6)
    mixed = memory.recipe_from_config({**config, "trainer": {**config["trainer"], "precision": "bf16-mixed"}}, 1)
    assert memory.plan(mixed).engine_buffers_gib == memory.plan(dataclasses.replace(mixed, engine_pack=False)).engine_buffers_gib


@pytest.mark.skipif(not decode_attention.available(), reason="needs the triton package")
def test_fp8_engine_weights_match_the_plan():
    """``sampling.engine_weights: fp8``: the float8 projections and their scales are what the plan counts, in place of
    the bf16 packs (bf16 weights) or of the decoder's autocast copies (bf16-mixed, where the heads keep theirs)."""
    from modules.engine import RolloutEngine

    sampling = SamplingConfig(engine="static", engine_pack=True, engine_linear="triton", engine_weights="fp8")
    planned = {}
    for precision in ("bf16-true", "bf16-mixed"):
        config = tiny_config(dataclasses.asdict(TinyJanusSpec(**MEASURE_SPEC)), precision)
        config["model"]["policy"]["sampling"].update(engine="static", engine_pack=True, engine_linear="triton",
                                                     engine_weights="fp8")
        recipe = memory.recipe_from_config(config, 1)
        assert recipe.engine_weights == "fp8"
        kv_only = dataclasses.replace(recipe, engine_weights="model", engine_pack=False, precision="bf16-true")
        planned[precision] = (memory.plan(recipe).engine_buffers_gib - memory.plan(kv_only).engine_buffers_gib) * GIB
    for precision, dtype in (("bf16-true", "bfloat16"), ("bf16-mixed", "float32")):
        policy = JanusPolicy(tiny=TinyJanusSpec(**MEASURE_SPEC), sampling=sampling, dtype=dtype)
        engine = RolloutEngine(compile="off", pack=True, linear="triton", weights="fp8")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            with engine.step_weights(policy.model, torch.device("cpu")):
                pass
        held = [t for e in engine._buffers.values() for layer in e["packed"] or () for t in _flat(layer)]
        held += [t for e in engine._buffers.values() for t in e.get("copies", [])]
        # bf16-true: the fp8 matrices and scales alone; bf16-mixed: the heads' bf16 copies too (the plan counts
        # their biases: 640 numbers, 0.17 % at this tiny shape)
        assert {t.dtype for t in held} == {fp8.FP8, torch.float32} | (
            {torch.bfloat16} if precision == "bf16-mixed" else set())
        assert sum(t.nbytes for t in held) == pytest.approx(planned[precision], rel=2e-3 if precision == "bf16-mixed"
                                                            else 1e-9)


def test_fp8_kv_cache_matches_the_plan():
    """``sampling.engine_kv: fp8``: a byte an entry and a float32 scale a vector, what the engine allocates."""
    from bicot.memory.plan import kv_cache_bytes
    from bicot.memory.shapes import shape_from_model
    from modules.engine import RolloutEngine

    policy = JanusPolicy(tiny=TinyJanusSpec(**MEASURE_SPEC), dtype="bfloat16")
    engine = RolloutEngine(attention="triton", kv="fp8", chunk=128)
    state = engine.buffers(policy.model, "image", 6, 200, {}, torch.device("cpu"), torch.bfloat16)
    held = sum(t.nbytes for t in state["kv"] + state["kv_scale"])
    shape = shape_from_model(policy.model, "tiny")
    assert held == kv_cache_bytes(shape, 6, 256, 1 + 4 / shape.head_dim, 1 + 4 / shape.head_dim)
    config = tiny_config(dataclasses.asdict(TinyJanusSpec(**MEASURE_SPEC)), "bf16-true")
    config["model"]["policy"]["sampling"].update(engine="static", engine_attention="triton", engine_kv="fp8")
    recipe = memory.recipe_from_config(config, 1)
    assert recipe.engine_kv == "fp8"
    planned = {kv: memory.plan(dataclasses.replace(recipe, engine_kv=kv)).engine_buffers_gib for kv in ("fp8", "model")}
    assert planned["fp8"] == pytest.approx(planned["model"] * (1 + 4 / shape.head_dim) / 2, rel=1e-9)  # the engine buffers are the caches


def _flat(value):
    return [value] if isinstance(value, torch.Tensor) else [t for item in value for t in _flat(item)]


def test_tiny_states_after_one_step_match_the_plan():
    """Weights, gradients and AdamW state after one real optimizer step equal the plan (to 0.1 %)."""
    policy = JanusPolicy(tiny=TinyJanusSpec(**MEASURE_SPEC), sampling=SamplingConfig(plan_max_tokens=12, cfg_scale=3.0))
    r = tiny_rollout(policy, nullcontext())
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    out, _ = loop.minibatch_loss(policy, r, GRPOConfig(num_generations=G, beta=0.0), None)
    out.loss.backward()
    optimizer.step()
    grads = storage_bytes(p.grad for p in params)
    state = storage_bytes(v for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
    p = plan_for(tiny_config(MEASURE_SPEC), 1, lengths=exact_lengths(r))
    assert storage_bytes(policy.model.parameters()) == pytest.approx(p.policy_weights_gib * GIB, rel=1e-3)
    assert grads == pytest.approx(p.gradients_gib * GIB, rel=1e-3)
    assert state == pytest.approx(p.optimizer_gib * GIB, rel=1e-3)


@pytest.mark.filterwarnings("ignore:`export_memory_timeline` is deprecated:FutureWarning")  # CPU has no successor
@pytest.mark.parametrize(
    ("precision", "checkpointing", "low", "high"),
    [("bf16-mixed", False, 0.8, 1.25), ("32-true", False, 0.8, 1.25), ("bf16-mixed", True, 0.5, 1.1)],
)
def test_tiny_update_peak_matches_the_plan(tmp_path, precision, checkpointing, low, high):
    """torch.profiler's peak of one update step (forward + backward + AdamW) on CPU, less weights and
    optimizer state, against the plan's activations + autocast weight copies + logits + gradients.

    Measured ratios (CPU, this shape): 0.99 bf16-mixed, 1.01 fp32, 0.77 with checkpointing (the plan
    counts a whole layer's recompute at once: conservative). GPU attention kernels and allocator rounding
    differ, so this pins the arithmetic, not a GPU figure.
    """
    policy = JanusPolicy(tiny=TinyJanusSpec(**MEASURE_SPEC), sampling=SamplingConfig(plan_max_tokens=12, cfg_scale=3.0))
    mixed = MixedPrecision("bf16-mixed", "cpu").forward_context if precision == "bf16-mixed" else nullcontext
    r = tiny_rollout(policy, mixed())
    if checkpointing:
        policy.model.model.language_model.activation_checkpointing_enable({"use_reentrant": False})
    policy.model.train()
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-3)
    algo = GRPOConfig(num_generations=G, beta=0.0)

    def step():
        with mixed():
            out, _ = loop.minibatch_loss(policy, r, algo, None)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW state exists from here on, as in every step but the first
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    prof.export_memory_timeline(str(tmp_path / "timeline.json"), device="cpu")
    _, sizes = json.loads((tmp_path / "timeline.json").read_text())
    # categories from index 1: parameter, optimizer state, input, temporary, activation, gradient, ...
    measured = max(sum(s) - s[1] - s[2] for s in sizes)
    config = tiny_config(MEASURE_SPEC, precision, parallel={"activation_checkpointing": checkpointing})
    config["model"]["algo"]["beta"] = 0.0
    p = plan_for(config, 1, lengths=exact_lengths(r))
    estimate = (p.activations_gib + p.weight_casts_gib + p.logits_gib + p.gradients_gib) * GIB
    assert low < measured / estimate < high


def test_a_shape_folder_that_is_missing_or_has_no_config_json_is_named(tmp_path):
    """(transformers would plan its default model for a folder without config.json: 216 GiB.) The command line
    prints these as one line, like every plan error (test_cli_plan_errors_are_one_line)."""
    missing, empty = tmp_path / "no-such-checkpoint", tmp_path / "empty"
    empty.mkdir()
    hint = "give a checkpoint folder or a preset: janus-pro-1b, janus-pro-7b"
    for shape, problem in ((missing, f"no checkpoint folder {str(missing)!r}"),
                           (empty, f"the folder {str(empty)!r} has no config.json")):
        with pytest.raises(ValueError) as info:
            load_shape(str(shape))
        assert str(info.value) == f"memory plan: {problem}; {hint}"
