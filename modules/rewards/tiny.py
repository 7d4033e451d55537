"""Tiny random reward-expert checkpoints, built from configs and saved like real ones: for tests and offline runs."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertTokenizer,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
    GroundingDinoImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from modules.rewards.hps import OpenClipArch, hf_to_open_clip
from modules.rewards.orm import ImageTextProcessor

# Words the tiny word-level tokenizers know; others become [UNK] (the models are random anyway).
WORDS = (
    "a an the of and in on at to is it this photo image picture does show yes no left right above below top "
    "bottom side near next cat dog car zebra book tv bench kite ball red green blue purple yellow white black "
    "elephant teddy bear apple clock cup couch giraffe plant sink mirror round fluffy two three four"
).split()
PUNCTUATION = [".", ",", "?", "!", '"', ":", "'"]


def save_clip_tokenizer(path: str | Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges); like OpenAI's, the end token has the largest id."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,?!'\""
    vocab: dict[str, int] = {}
    for ch in letters:
        vocab.setdefault(ch, len(vocab))
    for ch in letters:
        vocab.setdefault(ch + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tokenizer.save_pretrained(path)
    return tokenizer


def tiny_open_clip_arch(vocab_size: int) -> OpenClipArch:
    """A two-block ViT CLIP of width 32 on 28 px images."""
    return OpenClipArch(
        embed_dim=16,
        image_size=28,
        patch_size=14,
        vision_width=32,
        vision_layers=2,
        vision_heads=2,
        text_width=32,
        text_layers=2,
        text_heads=2,
        context_length=77,
        vocab_size=vocab_size,
    )


def save_tiny_hps(path: str | Path, seed: int = 0) -> tuple[Path, Path, OpenClipArch, CLIPModel]:
    """A random tiny CLIP written as an open_clip ``.pt`` state dict (``{"state_dict": ...}``, as HPS ships it).

    Returns:
        ``(checkpoint .pt, tokenizer folder, arch, the CLIPModel it came from)``.
    """
    path = Path(path)
    tokenizer = save_clip_tokenizer(path / "tokenizer")
    arch = tiny_open_clip_arch(len(tokenizer))
    config = arch.clip_config(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    state = hf_to_open_clip(model.state_dict(), arch.vision_layers, arch.text_layers)
    checkpoint = path / "HPS_tiny.pt"
    torch.save({"state_dict": state}, checkpoint)
    return checkpoint, path / "tokenizer", arch, model


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A random tiny ``CLIPModel`` with its ``CLIPProcessor`` (for the CLIPScore expert)."""
    path = Path(path)
    tokenizer = save_clip_tokenizer(path)
    arch = tiny_open_clip_arch(len(tokenizer))
    torch.manual_seed(seed)
    CLIPModel(
        arch.clip_config(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ).save_pretrained(path)
    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def _bert_tokenizer(path: Path, extra: Iterable[str] = ()) -> BertTokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = list(dict.fromkeys([*specials, *PUNCTUATION, *WORDS, *extra]))
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(path / "vocab.txt"))


TINY_LAYERS = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
"""the width and depth of every tiny transformer tower below (text, vision, detector text encoder)."""


def save_tiny_grounding_dino(path: str | Path, seed: int = 0) -> Path:
    """A random tiny ``GroundingDinoForObjectDetection`` (Swin + BERT, 8 queries) with its processor."""
    path = Path(path)
    tokenizer = _bert_tokenizer(path)
    backbone = dict(
        model_type="swin",
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_indices=[2, 3, 4],
    )
    text = dict(
        model_type="bert",
        vocab_size=len(tokenizer),
        **TINY_LAYERS,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        num_queries=8,
        encoder_layers=1,
        decoder_layers=2,  # the box-head tying rule of transformers needs at least two decoder layers
        d_model=32,  # the model's GroupNorm has 32 groups
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        max_text_len=32,
        encoder_n_points=1,
        decoder_n_points=1,
        disable_custom_kernels=True,
    )
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(path)
    images = GroundingDinoImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 32})
    GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_tiny_git(path: str | Path, seed: int = 0) -> Path:
    """A random tiny ``GitForCausalLM`` (32 px images) with its ``GitProcessor``."""
    path = Path(path)
    tokenizer = _bert_tokenizer(path)
    config = GitConfig(
        vision_config=dict(
            **TINY_LAYERS,
            image_size=32,
            patch_size=16,
        ),
        vocab_size=len(tokenizer),
        **TINY_LAYERS,
        max_position_embeddings=64,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    GitForCausalLM(config).save_pretrained(path)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


# A Qwen2-style turn format, written as our own template, with one image slot per image item.
ORM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _orm_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    words = [*specials, *PUNCTUATION, *WORDS, "user", "assistant", "Yes", "No", "answer", "description"]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=ORM_CHAT_TEMPLATE,
    )


def save_tiny_orm(path: str | Path, seed: int = 0) -> Path:
    """A random tiny ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2) and its processor files.

    ``processor_config.json`` names ``LlavaOnevisionProcessor``, as a real checkpoint's does.
    """
    path = Path(path)
    tokenizer = _orm_tokenizer()
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            **TINY_LAYERS,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            **TINY_LAYERS,
            num_key_value_heads=1,
            max_position_embeddings=512,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(path)
    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = ImageTextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=ORM_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    config_file = path / "processor_config.json"
    saved = json.loads(config_file.read_text())
    saved["processor_class"] = "LlavaOnevisionProcessor"
    config_file.write_text(json.dumps(saved, indent=2))
    return path
