"""JanusPolicy: loading, trainable parts, sampling settings, plans, image contexts, rollout/update agreement."""

from __future__ import annotations

import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn
from transformers import JanusForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

from datamodules.records import PromptRecord
from modules.policy import PARTS, CheckpointError, JanusPolicy, SamplingConfig, set_trainable
from modules.tiny import (
    CHAT_TEMPLATE,
    PAD,
    SPECIAL_TOKENS,
    TinyJanusSpec,
    build_tiny_janus,
    build_word_tokenizer,
)

TEMPLATE = "describe {prompt} with every object and colour"
PROMPTS = ["a red circle", "two blue squares left of a green star under the sun near the ocean", "a sun"]


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def eos_biased_head(policy: JanusPolicy, bias: float) -> nn.Linear:
    """``lm_head`` with the same weights plus a fixed bias on EOS, so plans end early at random places."""
    old = policy.model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight = old.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[policy.tokenizer.eos_token_id] = bias
    return head


class ScheduledEOS(nn.Module):
    """Wraps ``lm_head`` during sampling: row r says EOS exactly at step ``stop_at[r]`` (None: never).

    Other special tokens are suppressed so every other sampled token is an ordinary word.
    """

    def __init__(
        self, head: nn.Module, eos_id: int, special_ids: list[int], stop_at: list[int | None]
    ) -> None:
        super().__init__()
        self.head, self.eos_id, self.special_ids, self.stop_at = head, eos_id, special_ids, stop_at
        self.step = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden [B, H], one call per sampling step
        logits = self.head(hidden).clone()
        logits[:, self.special_ids] = -1e4
        for row, stop in enumerate(self.stop_at):
            logits[row, self.eos_id] = 1e4 if stop == self.step else -1e4
        self.step += 1
        return logits


# --------------------------------------------------------------------------- loading


def test_saved_tiny_checkpoint_loads_with_the_saved_weights(tiny_janus_dir, tiny_policy):
    saved = load_file(tiny_janus_dir / "model.safetensors")
    loaded = tiny_policy.model.state_dict()
    assert len(saved) > 100
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    assert tiny_policy.model.dtype == torch.float32
    assert tiny_policy.num_image_tokens == 16
    assert tiny_policy.tokenizer.convert_ids_to_tokens(tiny_policy.boi_id) == "<begin_of_image>"
    assert tiny_policy.pad_id == tiny_policy.tokenizer.convert_tokens_to_ids("<pad>")


def test_loading_in_bfloat16(tiny_janus_dir):
    policy = JanusPolicy(str(tiny_janus_dir), dtype="bfloat16")
    assert {p.dtype for p in policy.model.parameters()} == {torch.bfloat16}


def test_unknown_dtype_is_refused(tiny_janus_dir):
    with pytest.raises(ValueError, match="float64"):
        JanusPolicy(str(tiny_janus_dir), dtype="float64")


@pytest.mark.parametrize("count", [0, -1, True])
def test_predict_images_per_prompt_below_one_is_refused_by_name(tiny_janus_dir, count):
    with pytest.raises(ValueError, match=f"predict_images_per_prompt must be an integer >= 1, got {count!r}"):
        JanusPolicy(str(tiny_janus_dir), predict_images_per_prompt=count)


def test_missing_checkpoint_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(CheckpointError, match="not found") as err:
        JanusPolicy(str(missing))
    assert str(missing) in str(err.value)


def test_a_file_given_for_the_checkpoint_folder_is_called_a_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file; give the checkpoint folder") as err:
        JanusPolicy(str(weights))
    assert repr(str(tmp_path)) in str(err.value)  # the folder that holds it


def test_a_relative_folder_that_exists_but_does_not_load_is_not_called_missing(tmp_path, monkeypatch):
    def incomplete(source, *args, **kwargs):
        raise OSError(f"{source} does not appear to have a file named preprocessor_config.json")

    monkeypatch.setattr(JanusForConditionalGeneration, "from_pretrained", incomplete)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "janus"}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="preprocessor_config.json") as err:
        JanusPolicy("ckpt")
    assert "no folder" not in str(err.value)


@pytest.mark.parametrize("reachable", [True, False])
def test_hub_id_that_does_not_load_says_where_a_relative_folder_was_looked_for(tmp_path, monkeypatch, reachable):
    from modules import hub

    def offline(source, *args, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {source}")

    monkeypatch.setattr(JanusForConditionalGeneration, "from_pretrained", offline)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None if reachable else "https://huggingface.co did not answer")
    monkeypatch.chdir(tmp_path)  # "checkpoints/toy" run from outside the repository
    expected = "couldn't connect" if reachable else "hub cannot be reached"  # unreachable: no loader, no retries
    with pytest.raises(CheckpointError, match=expected) as err:
        JanusPolicy("checkpoints/toy")
    assert f"no folder 'checkpoints/toy' under {tmp_path}" in str(err.value)


def test_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json") as err:
        JanusPolicy(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_config_of_another_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        JanusPolicy(str(tmp_path))


def test_config_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        JanusPolicy(str(tmp_path))


def test_exactly_one_of_path_and_tiny(tiny_janus_dir, tiny_spec):
    with pytest.raises(CheckpointError, match="exactly one"):
        JanusPolicy()
    with pytest.raises(CheckpointError, match="exactly one"):
        JanusPolicy(str(tiny_janus_dir), tiny=tiny_spec)


def test_in_memory_tiny_equals_the_saved_checkpoint_of_the_same_spec(tiny_spec, tiny_policy):
    built = JanusPolicy(tiny=tiny_spec).model.state_dict()
    for name, tensor in tiny_policy.model.state_dict().items():
        assert torch.equal(built[name], tensor), name


def test_trust_remote_code_is_off_unless_asked(tiny_janus_dir, monkeypatch):
    calls = []
    original = JanusForConditionalGeneration.from_pretrained

    def recording(source, *args, **kwargs):
        calls.append(kwargs)
        return original(source, *args, **kwargs)

    monkeypatch.setattr(JanusForConditionalGeneration, "from_pretrained", recording)
    JanusPolicy(str(tiny_janus_dir))
    JanusPolicy(str(tiny_janus_dir), trust_remote_code=True)
    assert [c.get("trust_remote_code") for c in calls] == [False, True]


def broken_copy(tiny_janus_dir, tmp_path) -> Path:
    """A copy of the saved tiny checkpoint, for a test to break one thing in."""
    return Path(shutil.copytree(tiny_janus_dir, tmp_path / "ckpt"))


def refusal(folder: Path) -> str:
    """The one-line CheckpointError that loading ``folder`` raises; it names the folder."""
    with pytest.raises(CheckpointError) as err:
        JanusPolicy(str(folder))
    message = str(err.value)
    assert str(folder) in message and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("damage", "cause"),
    [
        pytest.param(lambda data: data[:100_000], "incomplete metadata", id="truncated"),  # a download cut short
        pytest.param(lambda data: bytes(range(256)) * 400, "header too large", id="not_safetensors"),
    ],
)
def test_unreadable_weights_are_named(tiny_janus_dir, tmp_path, damage, cause):
    folder = broken_copy(tiny_janus_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    message = refusal(folder)
    assert "model.safetensors is not a readable safetensors file" in message and cause in message, message


def test_config_that_does_not_match_the_weights_names_a_tensor(tiny_janus_dir, tmp_path):
    folder = broken_copy(tiny_janus_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    hidden = config["text_config"]["hidden_size"]
    config["text_config"]["hidden_size"] = 2 * hidden
    (folder / "config.json").write_text(json.dumps(config))
    message = refusal(folder)
    assert "config.json does not match the weights" in message, message
    # one example: a language-model tensor, with the checkpoint's shape and the shape the config asks for
    example = re.search(r"e\.g\. (model\.language_model\.\S+): checkpoint \[([\d, ]+)\], config \[([\d, ]+)\]", message)
    assert example, message
    saved = load_file(folder / "model.safetensors")[example[1]]
    assert example[2] == ", ".join(map(str, saved.shape)) and example[3] != example[2]


def test_folder_without_tokenizer_files_is_refused(tiny_janus_dir, tmp_path):
    folder = broken_copy(tiny_janus_dir, tmp_path)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    message = refusal(folder)
    assert "no tokenizer files" in message and "tokenizer.json" in message and "sentencepiece" not in message


def test_config_that_is_not_a_json_object_is_refused(tiny_janus_dir, tmp_path):
    folder = broken_copy(tiny_janus_dir, tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    assert "config.json is not a JSON object" in refusal(folder)


# --------------------------------------------------------------------------- trainable parts


def test_default_trains_the_language_model_only(tiny_policy):
    model = tiny_policy.model
    tied = model.lm_head.weight is model.model.language_model.get_input_embeddings().weight
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, flag in trains.items():
        inside = name.startswith("model.language_model.") or (name.startswith("lm_head.") and not tied)
        assert flag == inside, name
    assert model.lm_head.weight.requires_grad  # tied to the embeddings, or trained as part of the LM
    assert any(name.startswith("model.vqmodel.") for name in trains)


def test_default_trains_an_untied_text_head_as_the_paper(tiny_spec):
    """Janus-Pro's ``lm_head`` is its own matrix, outside ``language_model``; the paper trains it."""
    model, _ = build_tiny_janus(tiny_spec)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie, as Janus-Pro-1B/7B
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    default = inspect.signature(JanusPolicy).parameters["trainable"].default
    assert set_trainable(model, default) == ["language_model", "lm_head"]
    assert model.lm_head.weight.requires_grad and not model.model.generation_head.proj_out.weight.requires_grad
    set_trainable(model, ["language_model"])
    assert not model.lm_head.weight.requires_grad  # the head of an untied model is its own part


def test_trainable_all_and_a_single_part(tiny_janus_dir):
    everything = JanusPolicy(str(tiny_janus_dir), trainable=["all"])
    assert everything.trainable == list(PARTS)
    assert all(p.requires_grad for p in everything.model.parameters())
    head_only = JanusPolicy(str(tiny_janus_dir), trainable=["generation_head"])
    for name, p in head_only.model.named_parameters():
        assert p.requires_grad == name.startswith("model.generation_head."), name


def test_unknown_trainable_part_names_the_valid_parts(tiny_janus_dir):
    with pytest.raises(ValueError, match="unknown parts") as err:
        JanusPolicy(str(tiny_janus_dir), trainable=["language_model", "decoder"])
    for part in ("decoder", *PARTS):
        assert part in str(err.value)


# --------------------------------------------------------------------------- sampling settings


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cfg_scale": 0.5}, "cfg_scale"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"plan_top_p": 0.0}, "plan_top_p"),
        ({"image_top_p": 0.0}, "image_top_p"),
        ({"image_top_p": 1.5}, "image_top_p"),
        ({"plan_temperature": -0.1}, "plan_temperature"),
        ({"image_temperature": -1.0}, "image_temperature"),
        ({"image_temperature": 1e-38}, "image_temperature"),  # logits / T overflows to inf: NaN log-probs
        ({"plan_temperature": 5e-5}, "plan_temperature"),
        ({"plan_top_k": -1}, "plan_top_k"),
        ({"plan_max_tokens": 0}, "plan_max_tokens"),
        ({"image_logprob": "behaviour"}, "image_logprob"),
    ],
)
def test_sampling_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"sampling.{field}"):
        SamplingConfig(**kwargs)


def test_sampling_config_accepts_the_edges():
    config = SamplingConfig(
        cfg_scale=1.0, plan_temperature=0.0, plan_top_p=1.0, image_top_k=0, image_logprob="guided"
    )
    assert config.cfg_scale == 1.0 and config.image_logprob == "guided"


def test_the_smallest_temperature_keeps_log_probs_finite_where_a_tinier_one_does_not():
    from modules.janus_ops import sample_tokens
    from modules.policy import MIN_TEMPERATURE

    SamplingConfig(plan_temperature=MIN_TEMPERATURE, image_temperature=MIN_TEMPERATURE)  # accepted
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 200  # far wider than real logits
    tokens, logp, entropy = sample_tokens(logits, MIN_TEMPERATURE)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert torch.equal(tokens, logits.argmax(-1))  # that cold, sampling is greedy
    _, logp, entropy = sample_tokens(logits, 1e-38)  # what the config refuses
    assert not (torch.isfinite(logp).all() and torch.isfinite(entropy).all())


# --------------------------------------------------------------------------- contexts


def test_unconditional_pads_every_real_token_but_the_first_and_last(tiny_policy):
    pad = tiny_policy.pad_id
    ids = torch.tensor([[99, 98, 1, 20, 21, 22, 5], [1, 30, 31, 32, 33, 34, 5], [97, 96, 95, 94, 93, 1, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])
    expected = torch.tensor(
        [[99, 98, 1, pad, pad, pad, 5], [1, pad, pad, pad, pad, pad, 5], [97, 96, 95, 94, 93, 1, 5]]
    )  # padding (whatever it holds) untouched; a two-token row keeps both
    assert torch.equal(tiny_policy.unconditional(ids, mask), expected)


def test_image_context_is_prompt_dot_plan_in_chat_format_then_begin_of_image(tiny_policy):
    ctx = tiny_policy.image_context(["a red circle", "a sun."], ["  a big red circle ", "a yellow sun"])
    expected, _ = tiny_policy.encode(
        [tiny_policy.chat("a red circle. a big red circle", "image"), tiny_policy.chat("a sun. a yellow sun", "image")],
        suffix_id=tiny_policy.boi_id,
    )
    assert torch.equal(ctx.cond_ids, expected)
    without_plan = tiny_policy.image_context(["a red circle"], None)
    alone, _ = tiny_policy.encode([tiny_policy.chat("a red circle", "image")], suffix_id=tiny_policy.boi_id)
    assert torch.equal(without_plan.cond_ids, alone)


@pytest.mark.parametrize("writes_bos", [True, False], ids=["template_writes_bos", "bos_from_encode"])
def test_plan_context_has_the_default_system_prompt_where_the_processor_asks_and_images_none(tiny_policy, writes_bos):
    """Janus-Pro's converted checkpoints set ``use_default_system_prompt``: JanusProcessor then starts a text turn with
    its default system prompt (Janus's own chat processor too), never an image prompt. Their template writes no BOS."""
    if not writes_bos:
        tiny_policy.processor.chat_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    tiny_policy.processor.use_default_system_prompt = True
    bos = tiny_policy.tokenizer.bos_token if writes_bos else ""
    image_turn = tiny_policy.chat("a red circle", "image")
    assert DEFAULT_SYSTEM_PROMPT not in image_turn and image_turn.startswith(bos + "<|User|>: a red circle")
    assert tiny_policy.chat("a red circle") == bos + DEFAULT_SYSTEM_PROMPT + image_turn[len(bos) :]

    plans = tiny_policy.sample_plans(["a red circle"], TEMPLATE, 1, tiny_policy.noise(0))
    plan_turn = tiny_policy.chat(TEMPLATE.replace("{prompt}", "a red circle"), "image")
    expected, _ = tiny_policy.encode([bos + DEFAULT_SYSTEM_PROMPT + plan_turn[len(bos) :]])
    assert torch.equal(plans.context_ids, expected)
    bos_id = tiny_policy.tokenizer.bos_token_id
    assert plans.context_ids[0, 0] == bos_id and (plans.context_ids[0] == bos_id).sum() == 1  # one BOS, first
    context = tiny_policy.image_context(["a red circle"], None)
    alone, _ = tiny_policy.encode([image_turn], suffix_id=tiny_policy.boi_id)
    assert torch.equal(context.cond_ids, alone)
    with pytest.raises(ValueError, match="generation_mode"):
        tiny_policy.chat("a red circle", "audio")


def test_plan_system_prompt_overrides_the_processors_choice(tiny_policy):
    image_turn = tiny_policy.chat("a red circle", "image")
    tiny_policy.processor.use_default_system_prompt = True
    tiny_policy.plan_system_prompt = "  You turn requests into picture plans. "  # trimmed, then a blank line
    assert tiny_policy.chat("a red circle") == (
        tiny_policy.tokenizer.bos_token + "You turn requests into picture plans.\n\n"
        + image_turn[len(tiny_policy.tokenizer.bos_token) :]
    )
    assert tiny_policy.chat("a red circle", "image") == image_turn  # never before an image
    tiny_policy.plan_system_prompt = ""  # none, although the processor asks for its default
    assert tiny_policy.chat("a red circle") == image_turn
    with pytest.raises(ValueError, match="plan_system_prompt must be a text"):
        JanusPolicy(tiny=TinyJanusSpec(), plan_system_prompt=["not", "a", "text"])


def test_image_context_unconditional_branch_as_the_paper(tiny_policy):
    ctx = tiny_policy.image_context(PROMPTS, None)
    pad, bos, boi = tiny_policy.pad_id, tiny_policy.tokenizer.bos_token_id, tiny_policy.boi_id
    assert ctx.uncond_ids.shape == ctx.cond_ids.shape
    assert (ctx.cond_ids[:, -1] == boi).all() and (ctx.uncond_ids[:, -1] == boi).all()
    for row in range(len(PROMPTS)):
        real = ctx.cond_mask[row].bool()
        cond, uncond = ctx.cond_ids[row][real], ctx.uncond_ids[row][real]
        assert cond[0] == bos and uncond[0] == bos
        assert (uncond[1:-1] == pad).all() and (cond[1:-1] != pad).all()
        assert torch.equal(ctx.uncond_ids[row][~real], ctx.cond_ids[row][~real])  # padding untouched
    assert not ctx.cond_mask[2].all()  # the short prompt really is padded


# --------------------------------------------------------------------------- rollout == update


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(plan_max_tokens=10, plan_temperature=0.7, plan_top_k=20, plan_top_p=0.9),
        SamplingConfig(plan_max_tokens=10, plan_temperature=1.3),
        SamplingConfig(plan_max_tokens=10, plan_temperature=0.0),
    ],
    ids=["tempered_topk_topp", "hot", "greedy"],
)
def test_plan_rollout_logprobs_equal_teacher_forced(sharp_policy, sampling):
    sharp_policy.sampling = sampling
    sharp_policy.model.lm_head = eos_biased_head(sharp_policy, 3.0)
    plans = sharp_policy.sample_plans(PROMPTS, TEMPLATE, 3, sharp_policy.noise(0))
    assert plans.tokens.shape[0] == 9 and not plans.context_mask.all()  # left padding exercised
    if sampling.plan_temperature > 0:
        lengths = plans.mask.sum(1)
        assert lengths.min() < plans.tokens.shape[1]  # some plans stopped at EOS, the mask matters
    with torch.no_grad():
        teacher_forced = sharp_policy.plan_logprobs(plans)
    close(teacher_forced, plans.logp, atol=1e-4)
    assert (plans.logp[plans.mask] < 0).all() and (plans.logp[~plans.mask] == 0).all()


@pytest.mark.parametrize("mode", ["conditional", "guided"])
def test_image_rollout_logprobs_equal_teacher_forced(sharp_policy, mode):
    sharp_policy.sampling = SamplingConfig(
        cfg_scale=3.0, image_temperature=0.8, image_top_k=12, image_top_p=0.9, image_logprob=mode
    )
    ctx = sharp_policy.image_context(PROMPTS, ["a big circle", "", "a yellow sun in the sky"])
    assert not ctx.cond_mask.all()
    sample = sharp_policy.sample_images(ctx, sharp_policy.noise(1))
    assert sample.tokens.shape == (3, sharp_policy.num_image_tokens)
    with torch.no_grad():
        teacher_forced = sharp_policy.image_logprobs(ctx, sample.tokens)
    rollout = sample.logp_conditional if mode == "conditional" else sample.logp_guided
    other = sample.logp_guided if mode == "conditional" else sample.logp_conditional
    close(teacher_forced, rollout, atol=1e-4)
    assert (teacher_forced - other).abs().max() > 1e-2  # the modes score different distributions


def test_image_logprobs_carry_gradient_to_the_language_model(tiny_policy):
    tiny_policy.sampling = SamplingConfig(cfg_scale=2.0, image_logprob="guided")
    ctx = tiny_policy.image_context(PROMPTS[:2], None)
    sample = tiny_policy.sample_images(ctx, tiny_policy.noise(2))
    tiny_policy.image_logprobs(ctx, sample.tokens).sum().backward()
    q_proj = tiny_policy.model.model.language_model.layers[0].self_attn.q_proj.weight
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0
    assert tiny_policy.model.model.generation_head.proj_out.weight.grad is None  # frozen by default


# --------------------------------------------------------------------------- plans stop at EOS


def test_plans_stop_at_eos_with_pad_and_mask_after_it(tiny_policy):
    tiny_policy.sampling = SamplingConfig(plan_max_tokens=5)
    tokenizer = tiny_policy.tokenizer
    eos, pad = tokenizer.eos_token_id, tiny_policy.pad_id
    specials = [i for i in tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) if i != eos]
    tiny_policy.model.lm_head = ScheduledEOS(tiny_policy.model.lm_head, eos, specials, [0, 2, None])
    plans = tiny_policy.sample_plans(["a red circle"], TEMPLATE, 3, tiny_policy.noise(3))

    assert plans.tokens.shape == (3, 5)
    assert plans.mask.tolist() == [
        [True, False, False, False, False],
        [True, True, True, False, False],
        [True, True, True, True, True],
    ]
    assert plans.tokens[0, 0] == eos and (plans.tokens[0, 1:] == pad).all()
    assert plans.tokens[1, 2] == eos and (plans.tokens[1, 3:] == pad).all()
    assert (plans.tokens[2] != eos).all() and (plans.tokens[2] != pad).all()
    assert (plans.logp[~plans.mask] == 0).all()
    for row, words in enumerate([0, 2, 5]):
        text = plans.texts[row]
        assert "<" not in text and text == text.strip()
        assert tokenizer(text, add_special_tokens=False).input_ids == plans.tokens[row, :words].tolist()


def test_plan_text_leaves_out_the_pads_after_eos_whatever_their_id(tiny_policy):
    """Nothing ties a tokenizer's id 0 to its pad (DeepSeek's tokenizers put their special tokens near 100000);
    the tiny tokenizer's id 0 is its pad. A copy with a word at id 0: text after EOS must not show that word."""
    tokenizer = tiny_policy.tokenizer
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    assert tokenizer.pad_token_id == 0  # the premise: otherwise this test checks nothing new
    word = next(w for w, i in state["model"]["vocab"].items() if w.isalpha() and i > 20)
    new_pad = state["model"]["vocab"][word]
    state["model"]["vocab"][word], state["model"]["vocab"][PAD] = 0, new_pad
    for added in state["added_tokens"]:
        if added["content"] == PAD:
            added["id"] = new_pad
    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=PAD,
        unk_token=tokenizer.unk_token,
        padding_side="left",
        chat_template=tokenizer.chat_template,
    )
    assert swapped.pad_token_id == new_pad and swapped.convert_ids_to_tokens(0) == word
    tiny_policy.tokenizer, tiny_policy.pad_id = swapped, new_pad
    tiny_policy.sampling = SamplingConfig(plan_max_tokens=4)
    eos = swapped.eos_token_id
    specials = [i for i in swapped.all_special_ids if i != eos]
    tiny_policy.model.lm_head = ScheduledEOS(tiny_policy.model.lm_head, eos, specials + [0], [1, None])
    plans = tiny_policy.sample_plans(["a red circle"], TEMPLATE, 2, tiny_policy.noise(5))

    assert plans.mask.sum(1).tolist() == [2, 4] and (plans.tokens[0, 2:] == new_pad).all()
    for row, words in enumerate([1, 4]):
        assert word not in plans.texts[row].split()
        assert swapped(plans.texts[row], add_special_tokens=False).input_ids == plans.tokens[row, :words].tolist()


def test_sampling_stops_when_every_plan_has_ended(tiny_policy):
    tiny_policy.sampling = SamplingConfig(plan_max_tokens=8)
    eos = tiny_policy.tokenizer.eos_token_id
    tiny_policy.model.lm_head = ScheduledEOS(tiny_policy.model.lm_head, eos, [], [1, 0, 2])
    plans = tiny_policy.sample_plans(["a red circle"], TEMPLATE, 3, tiny_policy.noise(4))
    assert plans.tokens.shape == (3, 3)
    assert plans.mask.sum(1).tolist() == [2, 1, 3]


# --------------------------------------------------------------------------- decode and generate


def test_decode_returns_uint8_images_of_the_expected_side(tiny_policy, tiny_spec):
    side = int(tiny_policy.num_image_tokens**0.5) * 2**tiny_spec.vq_upsamples
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, tiny_spec.codebook_size, (3, tiny_policy.num_image_tokens), generator=generator)
    images = tiny_policy.decode(tokens)
    assert images.dtype == torch.uint8 and images.shape == (3, side, side, 3) == (3, 8, 8, 3)
    assert not torch.equal(images[0], images[1])  # the pixels depend on the tokens


def records(*prompts: str) -> list[PromptRecord]:
    return [PromptRecord(p) for p in prompts]


def test_predict_step_with_plans_repeats_each_prompt(sharp_policy, tiny_spec):
    sharp_policy.sampling = SamplingConfig(plan_max_tokens=4, cfg_scale=2.0)
    sharp_policy.reasoning_template = TEMPLATE
    sharp_policy.predict_images_per_prompt = 2
    out = sharp_policy.predict_step(records("a red circle", "a blue square"), 0)
    assert out["prompts"] == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert out["images"].shape == (4, 8, 8, 3) and out["images"].dtype == torch.uint8
    assert out["image_tokens"].shape == (4, sharp_policy.num_image_tokens)
    assert len(out["plans"]) == 4 and all(isinstance(p, str) for p in out["plans"])
    again = sharp_policy.predict_step(records("a red circle", "a blue square"), 0)
    assert torch.equal(again["image_tokens"], out["image_tokens"]) and again["plans"] == out["plans"]
    other_batch = sharp_policy.predict_step(records("a red circle", "a blue square"), 1)
    assert not torch.equal(other_batch["image_tokens"], out["image_tokens"])


def test_predict_step_without_plans(sharp_policy):
    sharp_policy.sampling = SamplingConfig(cfg_scale=2.0)
    sharp_policy.use_plan = False
    sharp_policy.predict_images_per_prompt = 3
    out = sharp_policy.predict_step(records("a red circle"), 0)
    assert out["plans"] is None
    assert out["prompts"] == ["a red circle"] * 3
    assert out["images"].shape == (3, 8, 8, 3)
    assert len({tuple(row.tolist()) for row in out["image_tokens"]}) == 3  # three different samples


def test_predict_step_with_use_plan_and_no_template_is_refused(tiny_policy):
    tiny_policy.use_plan = True
    tiny_policy.reasoning_template = None
    with pytest.raises(ValueError, match="reasoning_template"):
        tiny_policy.predict_step(records("a red circle"), 0)


def test_generate_with_a_template_conditions_images_on_the_plans(sharp_policy):
    sharp_policy.sampling = SamplingConfig(plan_max_tokens=4, cfg_scale=2.0)
    with_plans = sharp_policy.generate(["a red circle", "a sun"], num_images=2, template=TEMPLATE, seed=5)
    without = sharp_policy.generate(["a red circle", "a sun"], num_images=2, template=None, seed=5)
    assert len(with_plans["plans"]) == 4 and without["plans"] is None
    assert with_plans["images"].shape == without["images"].shape == (4, 8, 8, 3)
    # Same image noise, different contexts: the plans changed what was drawn.
    assert not torch.equal(with_plans["image_tokens"], without["image_tokens"])


@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_generate_rows_are_prompt_major_and_match_the_prompt_drawn_alone(sharp_policy, template):
    # Greedy plans and images: a row depends only on its prompt, so the row order is visible.
    sharp_policy.sampling = SamplingConfig(plan_max_tokens=4, plan_temperature=0.0, image_temperature=0.0)
    prompts = ["a red circle", "two blue squares left of a green star"]
    out = sharp_policy.generate(prompts, num_images=2, template=template)
    tokens = out["image_tokens"]
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[2], tokens[3])
    assert not torch.equal(tokens[0], tokens[2])
    alone = sharp_policy.generate(prompts[:1], num_images=1, template=template)
    assert torch.equal(alone["image_tokens"][0], tokens[0])
    if template is not None:
        assert out["plans"][0] == out["plans"][1] == alone["plans"][0] and out["plans"][2] == out["plans"][3]


def test_encode_left_pads_with_one_bos_and_the_suffix(tiny_policy):
    tokenizer = build_word_tokenizer()
    ids, mask = tiny_policy.encode(["<bos>a red circle", "a sun"], suffix_id=tiny_policy.boi_id)
    bos, pad, boi = tokenizer.bos_token_id, tiny_policy.pad_id, tiny_policy.boi_id
    red, circle = tokenizer.convert_tokens_to_ids(["red", "circle"])
    a, sun = tokenizer.convert_tokens_to_ids(["a", "sun"])
    assert ids.tolist() == [[bos, a, red, circle, boi], [pad, bos, a, sun, boi]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
