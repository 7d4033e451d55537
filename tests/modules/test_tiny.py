"""Tiny random Janus factory: the word tokenizer, the spec's checks, and a model that samples and decodes."""

from __future__ import annotations

import pytest
import torch

from modules.tiny import (
    BOI,
    SPECIAL_TOKENS,
    TinyJanusSpec,
    build_tiny_janus,
    build_word_tokenizer,
    words_of,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(["tulip", "windmill"])


def test_word_tokenizer_round_trips_words_and_punctuation(tokenizer):
    text = "a red tulip, near the windmill! two blue squares."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 12 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_word_tokenizer_lower_cases(tokenizer):
    lower = tokenizer("a red tulip", add_special_tokens=False).input_ids
    assert tokenizer("A RED Tulip", add_special_tokens=False).input_ids == lower
    assert tokenizer.unk_token_id not in lower


def test_unknown_words_map_to_unk(tokenizer):
    ids = tokenizer("a zebra", add_special_tokens=False).input_ids
    assert ids == [tokenizer.convert_tokens_to_ids("a"), tokenizer.unk_token_id]


def test_special_tokens_are_single_ids_and_survive_lower_casing(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id], token
    boi = tokenizer.convert_tokens_to_ids(BOI)
    red = tokenizer.convert_tokens_to_ids("red")
    assert tokenizer(f"red {BOI}", add_special_tokens=False).input_ids == [red, boi]
    assert tokenizer(f"RED{BOI}", add_special_tokens=False).input_ids == [red, boi]
    assert tokenizer.boi_token == BOI
    assert tokenizer.decode([red, boi, tokenizer.eos_token_id], skip_special_tokens=True) == "red"


def test_word_tokenizer_knows_janus_roles_and_pads_left(tokenizer):
    assert tokenizer.padding_side == "left"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a red tulip"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<bos><|User|>: a red tulip\n\n<|Assistant|>:"


def test_words_of_lower_cases_splits_punctuation_and_keeps_first_seen_order():
    assert words_of(["A red, RED tulip!", "two Tulips"]) == ["a", "red", ",", "tulip", "!", "two", "tulips"]


def test_extra_words_extend_the_vocabulary():
    base = build_word_tokenizer()
    extended = build_word_tokenizer(["tulip", "red"])  # "red" is already there: no duplicate entry
    assert len(extended) == len(base) + 1
    assert base("tulip", add_special_tokens=False).input_ids == [base.unk_token_id]
    assert extended("tulip", add_special_tokens=False).input_ids != [extended.unk_token_id]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hidden_size": 30, "num_heads": 4}, "tiny.hidden_size"),
        ({"image_size": 40, "patch_size": 16}, "tiny.image_size"),
        ({"vq_channels": 48}, "tiny.vq_channels"),
    ],
)
def test_tiny_spec_rejects_shapes_that_cannot_build(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TinyJanusSpec(**kwargs)


def test_tiny_model_has_the_shape_of_its_spec(tiny_spec):
    model, processor = build_tiny_janus(tiny_spec)
    config = model.config
    assert config.vision_config.num_image_tokens == (tiny_spec.image_size // tiny_spec.patch_size) ** 2 == 16
    assert config.text_config.hidden_size == tiny_spec.hidden_size
    assert config.text_config.num_hidden_layers == tiny_spec.num_layers
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer)
    assert model.model.generation_embeddings.num_embeddings == tiny_spec.codebook_size
    boi = processor.tokenizer.convert_tokens_to_ids(BOI)
    assert model.generation_config.generation_kwargs["boi_token_id"] == boi
    images = model.decode_image_tokens(torch.zeros(1, 16, dtype=torch.long))
    assert images.shape[1:3] == (8, 8)  # 4 x 4 tokens, one 2x upsampling


def test_tiny_weights_follow_the_seed(tiny_spec):
    a = build_tiny_janus(tiny_spec)[0].state_dict()
    b = build_tiny_janus(tiny_spec)[0].state_dict()
    c = build_tiny_janus(TinyJanusSpec(**{**vars(tiny_spec), "seed": tiny_spec.seed + 1}))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_saved_tiny_folder_has_weights_config_and_processor(tiny_janus_dir):
    names = {p.name for p in tiny_janus_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
