"""HPS v2.1 human-preference expert: an open_clip ViT-H-14 checkpoint run as a transformers CLIPModel.

The HPS checkpoint (``HPS_v2.1_compressed.pt``, from the hub repo ``xswu/HPSv2``) is a state dict in
open_clip's key layout. open_clip itself is not a dependency: :func:`open_clip_to_hf` maps every key
onto ``transformers.CLIPModel`` (each key used once, each shape checked). The preprocessing is HPS's own
scoring transform (``hpsv2`` builds it with ``light_augmentation=True``: longest side to 224 bicubic, black
padding to a square, OpenAI mean/std) and the tokenisation open_clip's (the OpenAI CLIP BPE, 77 tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer, CLIPConfig, CLIPModel
from transformers.initialization import no_init_weights

from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert
from modules.rewards.common import (
    ExpertCheckpointError,
    check_batch_size,
    chunks,
    freeze,
    load_pretrained,
    resolve_dtype,
)

# OpenAI CLIP's normalisation, which open_clip uses for ViT-H-14 and HPS keeps.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class OpenClipArch:
    """Shape of an open_clip ViT CLIP. Defaults: ViT-H-14 (open_clip ``model_configs/ViT-H-14.json``).

    Attributes:
        embed_dim: joint image-text embedding width.
        image_size: input side in pixels.
        patch_size: ViT patch side.
        vision_width: ViT width.
        vision_layers: ViT blocks.
        vision_heads: ViT heads (open_clip: ``width / head_width`` = 1280 / 80).
        text_width: text transformer width.
        text_layers: text transformer blocks.
        text_heads: text transformer heads.
        context_length: text positions.
        vocab_size: BPE vocabulary.
        mlp_ratio: MLP width / model width.
        activation: ``gelu`` (ViT-H-14 is not a QuickGELU model) or ``quick_gelu``.
    """

    embed_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    text_width: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"arch.image_size={self.image_size} must be a multiple of arch.patch_size={self.patch_size}"
            )
        for width, heads, tower in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if width % heads:
                raise ValueError(
                    f"arch.{tower}_width={width} must be a multiple of arch.{tower}_heads={heads}"
                )
        if self.activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"arch.activation must be 'gelu' or 'quick_gelu', got {self.activation!r}")

    def clip_config(self, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> CLIPConfig:
        """The ``CLIPConfig`` of the same network (the token ids decide where the text is pooled)."""
        text = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            intermediate_size=int(self.text_width * self.mlp_ratio),
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.context_length,
            hidden_act=self.activation,
            layer_norm_eps=1e-5,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        vision = dict(
            hidden_size=self.vision_width,
            intermediate_size=int(self.vision_width * self.mlp_ratio),
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=self.activation,
            layer_norm_eps=1e-5,
        )
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.embed_dim)


# ----------------------------------------------------------------------------- key mapping

# One rule per open_clip tensor: (open_clip key, transformers keys, how). "same" copies, "T" transposes
# (open_clip's projections are [width, embed] matrices used as x @ proj; transformers' are Linear
# weights [embed, width]), "qkv" splits nn.MultiheadAttention's packed in_proj into q, k, v.
Rule = tuple[str, tuple[str, ...], str]


def _block_rules(oc: str, hf: str) -> list[Rule]:
    """The rules of one residual attention block."""
    qkv = tuple(f"{hf}self_attn.{p}_proj" for p in "qkv")
    return [
        (f"{oc}ln_1.weight", (f"{hf}layer_norm1.weight",), "same"),
        (f"{oc}ln_1.bias", (f"{hf}layer_norm1.bias",), "same"),
        (f"{oc}attn.in_proj_weight", tuple(f"{k}.weight" for k in qkv), "qkv"),
        (f"{oc}attn.in_proj_bias", tuple(f"{k}.bias" for k in qkv), "qkv"),
        (f"{oc}attn.out_proj.weight", (f"{hf}self_attn.out_proj.weight",), "same"),
        (f"{oc}attn.out_proj.bias", (f"{hf}self_attn.out_proj.bias",), "same"),
        (f"{oc}ln_2.weight", (f"{hf}layer_norm2.weight",), "same"),
        (f"{oc}ln_2.bias", (f"{hf}layer_norm2.bias",), "same"),
        (f"{oc}mlp.c_fc.weight", (f"{hf}mlp.fc1.weight",), "same"),
        (f"{oc}mlp.c_fc.bias", (f"{hf}mlp.fc1.bias",), "same"),
        (f"{oc}mlp.c_proj.weight", (f"{hf}mlp.fc2.weight",), "same"),
        (f"{oc}mlp.c_proj.bias", (f"{hf}mlp.fc2.bias",), "same"),
    ]


def open_clip_rules(vision_layers: int, text_layers: int) -> list[Rule]:
    """Every open_clip ViT CLIP tensor and the ``CLIPModel`` tensor(s) it becomes."""
    v, t = "vision_model.", "text_model."
    rules: list[Rule] = [
        ("visual.class_embedding", (f"{v}embeddings.class_embedding",), "same"),
        ("visual.positional_embedding", (f"{v}embeddings.position_embedding.weight",), "same"),
        ("visual.conv1.weight", (f"{v}embeddings.patch_embedding.weight",), "same"),
        ("visual.ln_pre.weight", (f"{v}pre_layrnorm.weight",), "same"),
        ("visual.ln_pre.bias", (f"{v}pre_layrnorm.bias",), "same"),
        ("visual.ln_post.weight", (f"{v}post_layernorm.weight",), "same"),
        ("visual.ln_post.bias", (f"{v}post_layernorm.bias",), "same"),
        ("visual.proj", ("visual_projection.weight",), "T"),
        ("token_embedding.weight", (f"{t}embeddings.token_embedding.weight",), "same"),
        ("positional_embedding", (f"{t}embeddings.position_embedding.weight",), "same"),
        ("ln_final.weight", (f"{t}final_layer_norm.weight",), "same"),
        ("ln_final.bias", (f"{t}final_layer_norm.bias",), "same"),
        ("text_projection", ("text_projection.weight",), "T"),
        ("logit_scale", ("logit_scale",), "same"),
    ]
    for i in range(vision_layers):
        rules += _block_rules(f"visual.transformer.resblocks.{i}.", f"{v}encoder.layers.{i}.")
    for i in range(text_layers):
        rules += _block_rules(f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}.")
    return rules


# Non-parameter tensors some open_clip versions save: the text tower's causal mask. Checked, not used
# (CLIPModel builds its own causal mask).
IGNORED_BUFFERS: tuple[str, ...] = ("attn_mask",)


def _forward_op(tensor: torch.Tensor, how: str) -> list[torch.Tensor]:
    if how == "T":
        return [tensor.t().contiguous()] if tensor.ndim == 2 else [tensor]
    if how == "qkv":
        return list(tensor.chunk(3, dim=0)) if tensor.shape[0] % 3 == 0 else [tensor]
    return [tensor]


def _describe(problems: list[str], label: str, limit: int = 8) -> str:
    shown = "; ".join(problems[:limit]) + (
        "" if len(problems) <= limit else f"; ... {len(problems) - limit} more"
    )
    return f"{len(problems)} {label}: {shown}"


def open_clip_to_hf(
    state: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], vision_layers: int, text_layers: int
) -> dict[str, torch.Tensor]:
    """Map an open_clip ViT CLIP state dict onto ``CLIPModel`` keys, using every key exactly once.

    Args:
        state: open_clip keys -> tensors (``module.`` prefixes already stripped).
        shapes: ``CLIPModel`` state-dict key -> expected shape (from the model the arch builds).
        vision_layers, text_layers: blocks per tower.

    Returns:
        ``CLIPModel`` key -> tensor, every key of ``shapes`` present.

    Raises:
        ExpertCheckpointError: keys missing, keys left over, or shapes that do not match; the message
            lists them (which usually means the arch does not match the checkpoint).
    """
    left = dict(state)
    out: dict[str, torch.Tensor] = {}
    missing, wrong = [], []
    for oc_key, hf_keys, how in open_clip_rules(vision_layers, text_layers):
        if oc_key not in left:
            missing.append(oc_key)
            continue
        tensor = left.pop(oc_key)
        parts = _forward_op(tensor, how)
        expected = [tuple(shapes.get(k, ())) for k in hf_keys]
        if len(parts) != len(hf_keys) or [tuple(p.shape) for p in parts] != expected:
            wrong.append(f"{oc_key} has shape {tuple(tensor.shape)}, the arch expects {expected} ({how})")
            continue
        out.update(zip(hf_keys, parts, strict=True))
    for key in IGNORED_BUFFERS:
        left.pop(key, None)
    named = {key for _, hf_keys, _ in open_clip_rules(vision_layers, text_layers) for key in hf_keys}
    unfilled = sorted(set(shapes) - named)
    problems = []
    if missing:
        problems.append(_describe(missing, "keys missing from the checkpoint"))
    if left:
        problems.append(_describe(sorted(left), "checkpoint keys the arch has no place for"))
    if wrong:
        problems.append(_describe(wrong, "shape mismatches"))
    if unfilled:
        problems.append(_describe(unfilled, "CLIPModel tensors no rule fills"))
    if problems:
        raise ExpertCheckpointError(
            "the open_clip state dict does not fit the configured arch: " + " | ".join(problems)
        )
    return out


def hf_to_open_clip(
    hf_state: Mapping[str, torch.Tensor], vision_layers: int, text_layers: int
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`open_clip_to_hf`: a ``CLIPModel`` state dict in open_clip's key layout."""
    out = {}
    for oc_key, hf_keys, how in open_clip_rules(vision_layers, text_layers):
        parts = [hf_state[k] for k in hf_keys]
        if how == "T":
            out[oc_key] = parts[0].t().contiguous()
        elif how == "qkv":
            out[oc_key] = torch.cat(parts, dim=0)
        else:
            out[oc_key] = parts[0].clone()
    return out


def read_open_clip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a ``.pt`` open_clip checkpoint with ``torch.load(weights_only=True)``.

    Accepts a bare state dict or ``{"state_dict": ...}`` (the HPS release), and strips the
    ``module.`` prefix that DistributedDataParallel training leaves.

    Raises:
        ExpertCheckpointError: the file is missing, is not a weights-only pickle, or holds no tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ExpertCheckpointError(
            f"reward expert 'hps': checkpoint file not found: {str(path)!r}. Download HPS_v2.1_compressed.pt "
            "from the hub repo xswu/HPSv2 (`huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt "
            "--local-dir DIR`) and set checkpoint=DIR/HPS_v2.1_compressed.pt."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling error names the offending global; pass it on
        raise ExpertCheckpointError(
            f"reward expert 'hps': {str(path)!r} cannot be read with torch.load(weights_only=True): {err}. "
            "bicot only loads plain state dicts; re-save the checkpoint's 'state_dict' on its own."
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExpertCheckpointError(
            f"reward expert 'hps': {str(path)!r} does not hold a state dict of tensors"
        )
    if all(key.startswith("module.") for key in obj):
        obj = {key[len("module.") :]: value for key, value in obj.items()}
    return dict(obj)


# ----------------------------------------------------------------------------- preprocessing


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """HPS v2.1's scoring transform (``hpsv2`` builds it with ``light_augmentation=True``: open_clip's
    ``ResizeMaxSize``): the longest side to ``size`` (bicubic, the other side rounded), black padding centred
    to a square (the smaller half on the left/top), normalise. Square images are simply resized.

    Args:
        images: uint8 ``[N, H, W, 3]``.
        size: output side.

    Returns:
        float32 ``[N, 3, size, size]``.
    """
    array = images.detach().to("cpu", torch.uint8).numpy()
    out = np.empty((array.shape[0], size, size, 3), dtype=np.float32)
    for i in range(array.shape[0]):
        img = Image.fromarray(array[i])
        w, h = img.size
        scale = size / max(w, h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))  # a 1 x 500 strip keeps a row
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        square = Image.new("RGB", (size, size))  # black: ResizeMaxSize pads with 0 before normalising
        square.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
        out[i] = np.asarray(square, dtype=np.float32) / 255.0
    pixels = torch.from_numpy(out).permute(0, 3, 1, 2)  # [N, 3, size, size]
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# ----------------------------------------------------------------------------- the expert


def build_hps_model(
    state: Mapping[str, torch.Tensor], checkpoint: str, arch: OpenClipArch, tokenizer, dtype: torch.dtype
) -> CLIPModel:
    """A ``CLIPModel`` of ``arch`` holding the open_clip weights ``state`` (read from ``checkpoint``)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = arch.clip_config(tokenizer.bos_token_id, tokenizer.eos_token_id, pad)
    with no_init_weights():  # every weight is overwritten below: skip a billion random draws
        model = AutoModel.from_config(config, dtype=dtype)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    try:
        hf_state = open_clip_to_hf(state, shapes, arch.vision_layers, arch.text_layers)
    except ExpertCheckpointError as err:
        raise ExpertCheckpointError(f"reward expert 'hps': {checkpoint!r}: {err}") from err
    model.load_state_dict(hf_state, strict=True)
    return freeze(model)


class HPSExpert(RewardExpert):
    """Human Preference Score v2.1: cosine of the normalised image and prompt embeddings.

    Score range: the raw cosine is in ``[-1, 1]``; it is clipped at 0, so scores lie in ``[0, 1]``.
    HPS v2.1 gives real images about 0.2 to 0.35 (no logit scale is applied), so the clip never
    bites in practice.

    Args:
        checkpoint: ``HPS_v2.1_compressed.pt`` (hub repo ``xswu/HPSv2``), an open_clip state dict.
        tokenizer: a CLIP BPE tokenizer folder or hub id (open_clip's ViT-H-14 tokenizer is the OpenAI
            CLIP BPE, e.g. the tokenizer files of ``openai/clip-vit-large-patch14``).
        arch: the network's shape; default ViT-H-14.
        dtype: ``float32``, ``bfloat16`` or ``float16`` weights.
        batch_size: images per forward (``None``: all at once).
        placement: ``device``, ``cpu`` or ``offload`` (see :class:`RewardExpert`).
        trust_remote_code: passed to the tokenizer's ``from_pretrained``; never on unless set.

    Raises:
        ExpertCheckpointError: checkpoint or tokenizer missing, or the checkpoint does not fit ``arch``.
    """

    name = "hps"

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str = "openai/clip-vit-large-patch14",
        arch: OpenClipArch | None = None,
        dtype: str = "float32",
        batch_size: int | None = 32,
        placement: str = "device",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(placement)
        self.arch = arch or OpenClipArch()
        self.batch_size = check_batch_size(batch_size, self.name)
        state = read_open_clip_state(checkpoint)  # first: the file most likely to be missing
        self.tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained,
            tokenizer,
            "tokenizer",
            self.name,
            trust_remote_code=trust_remote_code,
        )
        self.model = build_hps_model(
            state, checkpoint, self.arch, self.tokenizer, resolve_dtype(dtype, self.name)
        )

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 ``[T, E]`` L2-normalised prompt embeddings (77 tokens, truncated like open_clip)."""
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.arch.context_length,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)  # [T, 77]
        # Causal attention only, as open_clip: padding after the end token cannot reach the pooled state.
        hidden = self.model.text_model(input_ids=ids).last_hidden_state  # [T, 77, W], after ln_final
        # Pool at the first end token (open_clip: argmax of the ids, the end token being the largest id).
        end = (ids == self.tokenizer.eos_token_id).int().argmax(dim=-1)  # [T]
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), end]  # [T, W]
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, E]`` L2-normalised image embeddings for uint8 ``[N, H, W, 3]``."""
        pixels = clip_preprocess(images, self.arch.image_size).to(self.device, self.model.dtype)
        out = self.model.vision_model(pixel_values=pixels)
        return torch.nn.functional.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]``: cosine of image and prompt embeddings, clipped to ``[0, 1]``."""
        n, height, width, _ = images.shape
        if height == 0 or width == 0:
            self.mark_unreadable(n, f"empty images of shape {tuple(images.shape)}")
            return torch.zeros(n)
        # A prompt repeats across its group: embed each distinct prompt once.
        texts = list(dict.fromkeys(record.prompt for record in prompts))
        row_of = {text: i for i, text in enumerate(texts)}
        text = self.text_features(texts)  # [T, E]
        which = torch.tensor([row_of[record.prompt] for record in prompts], device=text.device)  # [N]
        scores = torch.empty(n, device=text.device)
        for rows in chunks(n, self.batch_size):
            image = self.image_features(images[rows])  # [n, E]
            scores[rows] = (image * text[which[rows]]).sum(-1)
        return scores.clamp(0.0, 1.0)
