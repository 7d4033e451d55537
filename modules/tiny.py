"""Tiny random Janus models and word-level tokenizers, built from a config: for tests and offline runs."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor, PreTrainedTokenizerFast
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE, BOI, EOI, USER, ASSISTANT)

# Janus-Pro's turn format, written as our own template: "<|User|>: text\n\n<|Assistant|>:".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% set text = m['content'] if m['content'] is string else m['content'][0]['text'] %}"
    "{% if m['role'] == 'user' %}<|User|>: {{ text }}\n\n"
    "{% else %}<|Assistant|>: {{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)

BASE_WORDS = (
    ". , : ; ! ? ' - a an the of and with in on at to is are it its this that one two three four five six "
    "seven eight nine ten zero no left right above below top bottom side near next beside under over "
    "middle center centre corner red orange yellow green blue purple pink brown black white gray grey "
    "cyan circle circles square squares triangle triangles star shape shapes object objects image photo "
    "picture draw show scene small large big tiny colour color colored coloured many as has have "
    "first second there sky grass sun tomato lemon snow night coal banana leaf ocean"
).split()


def words_of(texts: Iterable[str]) -> list[str]:
    """Lower-case words and punctuation marks in ``texts``, in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def build_word_tokenizer(words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer with Janus's special tokens (``boi_token`` and friends).

    Args:
        words: extra vocabulary on top of :data:`BASE_WORDS`; unknown words map to ``<unk>``.
    """
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *BASE_WORDS, *words):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
        chat_template=CHAT_TEMPLATE,
    )


@dataclass
class TinyJanusSpec:
    """Shape of a tiny random Janus. Defaults: ~1 M parameters, 16 image tokens, 16 px images.

    Attributes:
        hidden_size: language-model width (also the generation aligner/head width).
        num_layers: decoder layers.
        num_heads: attention heads (key/value heads = half, at least 1).
        image_size: the vision tower's input side; image tokens = (image_size / patch_size)^2.
        patch_size: pixels per image-token side at the vision tower.
        codebook_size: VQ codebook entries (image-token vocabulary).
        vq_channels: VQ base channels (GroupNorm needs a multiple of 32).
        vq_upsamples: decoder upsamplings; decoded side = sqrt(image tokens) * 2^vq_upsamples.
        vq_res_blocks: residual blocks per VQ encoder level (the decoder has one more per level).
        vq_embed_dim: width of a VQ codebook entry.
        intermediate_size: the language model's MLP width (``None``: twice ``hidden_size``).
        vision_hidden_size: width of the (understanding) vision tower, unused by image generation.
        extra_words: vocabulary on top of the built-in words.
        seed: initialises the random weights.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    image_size: int = 64
    patch_size: int = 16
    codebook_size: int = 64
    vq_channels: int = 32
    vq_upsamples: int = 2
    vq_res_blocks: int = 1
    vq_embed_dim: int = 8
    intermediate_size: int | None = None
    vision_hidden_size: int = 32
    extra_words: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"tiny.hidden_size={self.hidden_size} must be a multiple of tiny.num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"tiny.image_size={self.image_size} must be a multiple of tiny.patch_size={self.patch_size}"
            )
        if self.vq_channels % 32:
            raise ValueError(f"tiny.vq_channels={self.vq_channels} must be a multiple of 32 (GroupNorm with 32 groups)")


def build_tiny_janus(spec: TinyJanusSpec | None = None) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """A random ``JanusForConditionalGeneration`` of the given shape and its processor."""
    spec = spec or TinyJanusSpec()
    tokenizer = build_word_tokenizer(spec.extra_words)
    side = spec.image_size // spec.patch_size
    num_image_tokens = side * side
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size or 2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=max(1, spec.num_heads // 2),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=spec.vision_hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.hidden_size,
        num_image_tokens=num_image_tokens,
        mlp_ratio=2.0,
    )
    vq = dict(
        embed_dim=spec.vq_embed_dim,
        num_embeddings=spec.codebook_size,
        latent_channels=spec.vq_channels,
        base_channels=spec.vq_channels,
        channel_multiplier=[1] * (spec.vq_upsamples + 1),
        num_res_blocks=spec.vq_res_blocks,
        projection_dim=spec.hidden_size,
        image_token_embed_dim=spec.hidden_size,
        num_hidden_layers=2,
    )
    config = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    torch.manual_seed(spec.seed)
    model = JanusForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)}
    image_processor = JanusImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=num_image_tokens,
    )
    return model, processor


def save_tiny_janus(path: str | Path, spec: TinyJanusSpec | None = None) -> Path:
    """Build a tiny random Janus and write it with ``save_pretrained`` (safetensors) plus its processor."""
    model, processor = build_tiny_janus(spec)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
