"""Tests for the HPS expert: the open_clip key mapping, open_clip-style preprocessing, loading errors, scores."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.records import PromptRecord
from modules.rewards.common import ExpertCheckpointError
from modules.rewards.hps import (
    CLIP_MEAN,
    CLIP_STD,
    HPSExpert,
    OpenClipArch,
    clip_preprocess,
    open_clip_rules,
    open_clip_to_hf,
    read_open_clip_state,
)
from modules.rewards.tiny import save_tiny_hps

PROMPTS = ["a red ball", "two cats near a tv", "a photo of a zebra below a car"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(checkpoint, tokenizer dir, arch, source CLIPModel)`` of a tiny random CLIP in open_clip layout."""
    return save_tiny_hps(tmp_path_factory.mktemp("hps"))


@pytest.fixture(scope="module")
def expert(tiny):
    checkpoint, tokenizer, arch, _ = tiny
    return HPSExpert(str(checkpoint), str(tokenizer), arch=arch)


def images(n: int, height: int = 30, width: int = 40, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, height, width, 3), dtype=torch.uint8, generator=generator)


# ----------------------------------------------------------------------------- an independent open_clip forward


def _block(x, state, prefix, heads, mask=None):
    """One open_clip ResidualAttentionBlock, written against open_clip's own tensor names."""
    width = x.shape[-1]
    attn = nn.MultiheadAttention(width, heads, batch_first=True)
    attn.load_state_dict({k.split("attn.")[1]: v for k, v in state.items() if k.startswith(prefix + "attn.")})
    h = F.layer_norm(x, (width,), state[prefix + "ln_1.weight"], state[prefix + "ln_1.bias"])
    x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = F.layer_norm(x, (width,), state[prefix + "ln_2.weight"], state[prefix + "ln_2.bias"])
    h = F.gelu(F.linear(h, state[prefix + "mlp.c_fc.weight"], state[prefix + "mlp.c_fc.bias"]))
    return x + F.linear(h, state[prefix + "mlp.c_proj.weight"], state[prefix + "mlp.c_proj.bias"])


def reference_image(state, arch: OpenClipArch, pixels):
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=arch.patch_size).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = F.layer_norm(x, (arch.vision_width,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    for i in range(arch.vision_layers):
        x = _block(x, state, f"visual.transformer.resblocks.{i}.", arch.vision_heads)
    x = F.layer_norm(
        x[:, 0], (arch.vision_width,), state["visual.ln_post.weight"], state["visual.ln_post.bias"]
    )
    return F.normalize(x @ state["visual.proj"], dim=-1)


def reference_text(state, arch: OpenClipArch, ids):
    length = ids.shape[1]
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(arch.text_layers):
        x = _block(x, state, f"transformer.resblocks.{i}.", arch.text_heads, mask)
    x = F.layer_norm(x, (arch.text_width,), state["ln_final.weight"], state["ln_final.bias"])
    return F.normalize(x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ state["text_projection"], dim=-1)


# ----------------------------------------------------------------------------- mapping


def test_features_match_open_clip_math_and_the_source_model(tiny, expert):
    checkpoint, _, arch, source = tiny
    state = read_open_clip_state(checkpoint)
    pixels = clip_preprocess(images(2), arch.image_size)
    tokens = expert.tokenizer(PROMPTS, padding="max_length", max_length=arch.context_length, truncation=True)
    ids = torch.tensor(tokens.input_ids)
    with torch.no_grad():
        got_image = expert.image_features(images(2))
        got_text = expert.text_features(PROMPTS)
        torch.testing.assert_close(got_image, reference_image(state, arch, pixels), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_text, reference_text(state, arch, ids), atol=1e-5, rtol=1e-4)
        source_image = source.visual_projection(source.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(got_image, F.normalize(source_image, dim=-1), atol=1e-5, rtol=1e-4)


def test_every_key_is_used_once(tiny):
    _, _, arch, source = tiny
    rules = open_clip_rules(arch.vision_layers, arch.text_layers)
    hf_keys = [key for _, keys, _ in rules for key in keys]
    assert len(hf_keys) == len(set(hf_keys))
    assert set(hf_keys) == set(source.state_dict())
    assert len({oc for oc, _, _ in rules}) == len(rules)


def shapes_of(source):
    return {k: v.shape for k, v in source.state_dict().items()}


def test_leftover_missing_and_misshapen_keys_are_named(tiny):
    checkpoint, _, arch, source = tiny
    state = read_open_clip_state(checkpoint)
    extra = {**state, "visual.head.weight": torch.zeros(2)}
    with pytest.raises(ExpertCheckpointError, match="visual.head.weight"):
        open_clip_to_hf(extra, shapes_of(source), arch.vision_layers, arch.text_layers)
    missing = {k: v for k, v in state.items() if k != "ln_final.bias"}
    with pytest.raises(ExpertCheckpointError, match="missing from the checkpoint: ln_final.bias"):
        open_clip_to_hf(missing, shapes_of(source), arch.vision_layers, arch.text_layers)
    wrong = {**state, "visual.proj": torch.zeros(3, 3)}
    with pytest.raises(ExpertCheckpointError, match=r"visual.proj has shape \(3, 3\)"):
        open_clip_to_hf(wrong, shapes_of(source), arch.vision_layers, arch.text_layers)
    with_mask = {**state, "attn_mask": torch.zeros(77, 77)}  # a buffer older open_clip versions saved
    assert len(open_clip_to_hf(with_mask, shapes_of(source), arch.vision_layers, arch.text_layers)) == len(
        shapes_of(source)
    )


def test_arch_that_does_not_fit_the_checkpoint(tiny):
    checkpoint, tokenizer, arch, _ = tiny
    shallow = OpenClipArch(**{**vars(arch), "vision_layers": 1})
    with pytest.raises(ExpertCheckpointError, match=r"HPS_tiny.pt.*visual.transformer.resblocks.1"):
        HPSExpert(str(checkpoint), str(tokenizer), arch=shallow)


def test_bare_state_dict_with_ddp_prefix_is_accepted(tiny, tmp_path):
    checkpoint, _, _, _ = tiny
    state = read_open_clip_state(checkpoint)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "bare.pt")
    assert read_open_clip_state(tmp_path / "bare.pt").keys() == state.keys()


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "full.pt")
    with pytest.raises(ExpertCheckpointError, match="weights_only=True"):
        read_open_clip_state(tmp_path / "full.pt")


def test_missing_files_are_named(tiny, tmp_path):
    checkpoint, tokenizer, arch, _ = tiny
    with pytest.raises(ExpertCheckpointError, match=r"not found: .*nope.pt.*xswu/HPSv2"):
        HPSExpert(str(tmp_path / "nope.pt"), str(tokenizer), arch=arch)
    with pytest.raises(ExpertCheckpointError, match=r"not found: .*no_tokenizer.*tokenizer="):
        HPSExpert(str(checkpoint), str(tmp_path / "no_tokenizer"), arch=arch)


def test_long_prompts_are_cut_like_open_clip(tiny, expert):
    # open_clip's tokenize: start token, text tokens, end token; over 77, cut to 77 with the end token last.
    checkpoint, _, arch, _ = tiny
    tokenizer = expert.tokenizer
    long = "a red ball near a cat " * 6  # a token per letter in the tiny tokenizer: 96 tokens
    body = tokenizer(long, add_special_tokens=False).input_ids
    assert len(body) > arch.context_length
    ids = torch.tensor([[tokenizer.bos_token_id, *body[: arch.context_length - 2], tokenizer.eos_token_id]])
    with torch.no_grad():
        got = expert.text_features([long, "a cat"])
    torch.testing.assert_close(
        got[:1], reference_text(read_open_clip_state(checkpoint), arch, ids), atol=1e-5, rtol=1e-4
    )


def test_default_arch_is_vit_h_14():
    arch = OpenClipArch()
    assert (arch.vision_width, arch.vision_layers, arch.vision_heads, arch.patch_size, arch.image_size) == (
        1280,
        32,
        16,
        14,
        224,
    )
    assert (arch.text_width, arch.text_layers, arch.text_heads, arch.embed_dim) == (1024, 24, 16, 1024)


# ----------------------------------------------------------------------------- preprocessing and scores


def test_normalisation_is_openai_clips():
    # open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD, which ViT-H-14 and HPS v2.1 use.
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_preprocess_constant_image_is_normalised_exactly():
    gray = torch.full((1, 50, 70, 3), 128, dtype=torch.uint8)
    out = clip_preprocess(gray, 28)
    assert out.shape == (1, 3, 28, 28)
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 9], expected)


def test_preprocess_pads_non_square_images_like_hps_scoring():
    # hpsv2 scores through open_clip's ResizeMaxSize: longest side to 224, black padding, nothing cropped.
    wide = torch.full((1, 20, 40, 3), 255, dtype=torch.uint8)  # 40 wide -> 28, 20 high -> 14, 7 rows each side
    expected = torch.zeros(1, 3, 28, 28)
    expected[:, :, 7:21, :] = 1.0
    torch.testing.assert_close(clip_preprocess(wide, 28, mean=(0, 0, 0), std=(1, 1, 1)), expected)
    tall = torch.full((1, 60, 20, 3), 255, dtype=torch.uint8)  # 20 wide -> round(9.33) = 9, pad 9 left, 10 right
    out = clip_preprocess(tall, 28, mean=(0, 0, 0), std=(1, 1, 1))
    assert out[..., :9].abs().max() == 0 and out[..., 18:].abs().max() == 0
    torch.testing.assert_close(out[..., 9:18], torch.ones(1, 3, 28, 9))


def white_preprocessed(height: int, width: int) -> torch.Tensor:
    white = torch.full((1, height, width, 3), 255, dtype=torch.uint8)
    return clip_preprocess(white, 28, mean=(0, 0, 0), std=(1, 1, 1))


def test_preprocess_rounds_the_short_side_and_keeps_a_one_pixel_strip():
    # ResizeMaxSize rounds the short side: 25 wide x 60 high -> 28 * 25 / 60 = 11.67 -> 12 columns,
    # 8 black ones each side.
    expected = torch.zeros(1, 3, 28, 28)
    expected[..., 8:20] = 1.0
    torch.testing.assert_close(white_preprocessed(60, 25), expected)
    # 40 wide x 16 high -> 11.2 -> 11 rows; 17 rows of padding, the smaller half (8) on top.
    expected = torch.zeros(1, 3, 28, 28)
    expected[:, :, 8:19] = 1.0
    torch.testing.assert_close(white_preprocessed(16, 40), expected)
    # 1 high x 500 wide -> 0.056 rounds to 0 rows: one row is kept, 13 black rows above it.
    expected = torch.zeros(1, 3, 28, 28)
    expected[:, :, 13] = 1.0
    torch.testing.assert_close(white_preprocessed(1, 500), expected)


def test_preprocess_resizes_bicubic_with_antialiasing():
    # PIL's bicubic filter, which torchvision's Resize applies to PIL images in HPS's transform, agrees with
    # torch's antialiased bicubic to rounding (bilinear is off by about 7 / 255 on average on noise).
    image = images(1, 30, 40)
    out = clip_preprocess(image, 28, mean=(0, 0, 0), std=(1, 1, 1))  # 40 x 30 -> 28 x 21, rows 3 to 23
    reference = F.interpolate(image.permute(0, 3, 1, 2).float(), (21, 28), mode="bicubic", antialias=True)
    reference = reference.clamp(0, 255) / 255
    assert out[:, :, :3].abs().max() == 0 and out[:, :, 24:].abs().max() == 0
    torch.testing.assert_close(out[:, :, 3:24], reference, atol=4 / 255, rtol=0)
    assert (out[:, :, 3:24] - reference).abs().mean() < 1 / 255


def test_scores_are_the_cosines_of_open_clips_embeddings(tiny):
    # The tiny model's cosines are negative (clipped to 0) for these pairs; with the text projection negated
    # they are positive, so the score is the cosine itself, from the right prompt, for every image.
    checkpoint, tokenizer, arch, _ = tiny
    state = read_open_clip_state(checkpoint)
    state["text_projection"] = -state["text_projection"]
    flipped = HPSExpert(str(checkpoint), str(tokenizer), arch=arch, batch_size=3)
    with torch.no_grad():
        flipped.model.text_projection.weight.neg_()
    order = [2, 0, 0, 2]  # repeated prompts, not in their first-seen order
    scores = flipped(images(4), [PromptRecord(prompt=PROMPTS[i]) for i in order])
    tokens = flipped.tokenizer(PROMPTS, padding="max_length", max_length=arch.context_length, truncation=True)
    text = reference_text(state, arch, torch.tensor(tokens.input_ids))[order]
    image = reference_image(state, arch, clip_preprocess(images(4), arch.image_size))
    expected = (image * text).sum(-1)
    assert (expected > 0.05).all()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


def test_scores_are_cosines_in_range(expert):
    records = [PromptRecord(prompt=p) for p in PROMPTS]
    scores = expert(images(3), records)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert ((scores >= 0) & (scores <= 1)).all()
    with torch.no_grad():
        cos = (expert.image_features(images(3)) * expert.text_features(PROMPTS)).sum(-1)
    torch.testing.assert_close(scores, cos.clamp(0, 1))


def test_batch_size_does_not_change_scores(tiny, expert):
    checkpoint, tokenizer, arch, _ = tiny
    records = [PromptRecord(prompt=p) for p in PROMPTS] * 2
    one_by_one = HPSExpert(str(checkpoint), str(tokenizer), arch=arch, batch_size=1)
    torch.testing.assert_close(one_by_one(images(6), records), expert(images(6), records))


def test_bfloat16_weights(tiny, expert):
    checkpoint, tokenizer, arch, _ = tiny
    half = HPSExpert(str(checkpoint), str(tokenizer), arch=arch, dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    records = [PromptRecord(prompt=p) for p in PROMPTS]
    scores = half(images(3), records)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expert(images(3), records), atol=0.05, rtol=0)


def test_empty_images_score_zero_and_are_counted(expert):
    before = expert.unreadable
    with pytest.warns(UserWarning, match="empty images"):
        scores = expert(torch.zeros(2, 0, 5, 3, dtype=torch.uint8), [PromptRecord(prompt="a cat")] * 2)
    assert scores.tolist() == [0.0, 0.0] and expert.unreadable == before + 2
    with pytest.warns(UserWarning, match="empty images"):
        scores = expert(torch.zeros(1, 5, 0, 3, dtype=torch.uint8), [PromptRecord(prompt="a cat")])
    assert scores.tolist() == [0.0]
    assert expert.unreadable == before + 3
