"""Pieces the model-based reward experts share: checkpoint checks, dtypes, image conversion, yes/no odds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from modules.hub import load_cache_first

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ExpertCheckpointError(ValueError):
    """A reward expert's checkpoint is missing or cannot be loaded; the message names what was tried."""


def resolve_dtype(name: str, expert: str) -> torch.dtype:
    """The torch dtype for ``name`` (``float32``, ``bfloat16`` or ``float16``).

    Raises:
        ValueError: an unknown name; the message names the expert.
    """
    if name not in DTYPES:
        raise ValueError(f"reward expert {expert!r}: dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def looks_local(source: str) -> bool:
    """Whether ``source`` is meant as a local path rather than a hub id such as ``owner/name``."""
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists() or source.count("/") != 1


def how_to_provide(arg: str, source: str) -> str:
    """The sentence every missing-checkpoint message ends with."""
    return (
        f"Set {arg} to a local folder written by save_pretrained, or to a hub id that is already in the local "
        f"Hugging Face cache (an offline machine cannot download it). To fetch it: `huggingface-cli download "
        f"{source} --local-dir DIR` on a machine with internet, then set {arg}=DIR."
    )


def check_source(source: str, arg: str, expert: str) -> None:
    """Fail at start-up, naming the path, when a local checkpoint folder does not exist.

    Args:
        source: the configured path or hub id.
        arg: the config key that holds it (named in the message).
        expert: the expert's name (named in the message).

    Raises:
        ExpertCheckpointError: ``source`` is a local path that is not a folder.
    """
    if not isinstance(source, str) or not source:
        raise ExpertCheckpointError(
            f"reward expert {expert!r}: {arg} must be a path or hub id, got {source!r}"
        )
    path = Path(source).expanduser()
    if looks_local(source) and not path.is_dir():
        raise ExpertCheckpointError(
            f"reward expert {expert!r}: checkpoint folder not found: {str(path)!r} (from {arg}={source!r}). "
            + how_to_provide(arg, "<hub id>")
        )


def load_pretrained(load: Callable[..., Any], source: str, arg: str, expert: str, **kwargs: Any) -> Any:
    """Call a ``from_pretrained`` loader, turning "not found" into a message that says what was tried.

    Args:
        load: e.g. ``GitForCausalLM.from_pretrained`` or ``AutoProcessor.from_pretrained``.
        source: the local folder or hub id.
        arg: the config key that holds ``source``.
        expert: the expert's name.
        **kwargs: passed to ``load`` (``dtype``, ``trust_remote_code`` ...).

    Raises:
        ExpertCheckpointError: the loader raised ``OSError`` (missing files, not in the cache, offline), or
            refused weights whose shapes are not those its ``config.json`` asks for.
    """
    check_source(source, arg, expert)
    try:
        return load_cache_first(load, source, **kwargs)
    except OSError as err:
        raise ExpertCheckpointError(
            f"reward expert {expert!r}: could not load {arg}={source!r}: {err}. "
            + how_to_provide(arg, source)
        ) from err
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):  # transformers' refusal of tensors of another shape
            raise
        raise ExpertCheckpointError(
            f"reward expert {expert!r}: {arg}={source!r}: its config.json does not match its weights (tensors of "
            "another shape, listed in the load report above); re-download the folder or fix its config.json"
        ) from None


def load_model_and_processor(
    model_cls: Any, processor_cls: Any, source: str, expert: str, dtype: str, trust_remote_code: bool, **model_kwargs: Any
) -> tuple[torch.nn.Module, Any]:
    """A frozen model and its processor from one folder or hub id (the expert's ``model_name_or_path``).

    Args:
        model_cls, processor_cls: classes with ``from_pretrained``.
        **model_kwargs: extra ``from_pretrained`` arguments for the model (``attn_implementation`` ...).
    """
    kwargs = {"trust_remote_code": trust_remote_code}
    arg = "model_name_or_path"
    processor = load_pretrained(processor_cls.from_pretrained, source, arg, expert, **kwargs)
    model = load_pretrained(
        model_cls.from_pretrained, source, arg, expert, dtype=resolve_dtype(dtype, expert), **model_kwargs, **kwargs
    )
    return freeze(model), processor


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: experts only score."""
    model.requires_grad_(False)
    return model.eval()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 ``[N, H, W, 3]`` (any device) to ``N`` RGB PIL images."""
    array = images.detach().to("cpu", torch.uint8).numpy()
    return [Image.fromarray(array[i]) for i in range(array.shape[0])]


def chunks(n: int, size: int | None) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` (``None``: one slice)."""
    step = n if not size else size
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(start + step, n))


def check_batch_size(batch_size: int | None, expert: str) -> int | None:
    """``None`` or an integer >= 1."""
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(
            f"reward expert {expert!r}: batch_size must be an integer >= 1 or null, got {batch_size!r}"
        )
    return batch_size


def unique(items: Iterable[str]) -> list[str]:
    """Stripped, non-empty items, first occurrence kept, order preserved."""
    seen: dict[str, None] = {}
    for item in items:
        if item and item.strip():
            seen.setdefault(item.strip(), None)
    return list(seen)


# ----------------------------------------------------------------------------- yes / no answers


def answer_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Ids of the single-token spellings of ``words`` (with and without a leading space).

    A tokenizer may spell "Yes" as one token and " yes" as another; each such id counts as that answer.

    Raises:
        ValueError: no spelling of any word is a single token.
    """
    ids: dict[int, None] = {}
    for word in words:
        for text in (word, " " + word):
            encoded = tokenizer(text, add_special_tokens=False).input_ids
            if len(encoded) == 1 and encoded[0] != getattr(tokenizer, "unk_token_id", None):
                ids.setdefault(int(encoded[0]), None)
    if not ids:
        raise ValueError(
            f"none of {list(words)} is a single token of this tokenizer; cannot read yes/no answers"
        )
    return list(ids)


def yes_probability(logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """P(yes) / (P(yes) + P(no)) from the logits of the first answer token.

    The softmax normaliser cancels in the ratio, so this is ``sigmoid(lse(yes) - lse(no))`` over the raw
    logits, which stays exact where the probabilities themselves would underflow.

    Args:
        logits: ``[N, V]`` next-token logits.
        yes_ids: vocabulary ids that mean "yes" (their probabilities add up).
        no_ids: vocabulary ids that mean "no".

    Returns:
        float32 ``[N]`` in ``[0, 1]``.
    """
    logits = logits.float()
    yes = torch.logsumexp(logits[:, list(yes_ids)], dim=-1)  # [N]
    no = torch.logsumexp(logits[:, list(no_ids)], dim=-1)  # [N]
    return torch.sigmoid(yes - no)


def last_token_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last real text token, for right-padded text.

    Args:
        logits: ``[N, P + L, V]``; ``P >= 0`` positions before the text (GIT puts the image there).
        mask: ``[N, L]`` text attention mask, 1 on real tokens, right padding.

    Returns:
        ``[N, V]``.
    """
    offset = logits.shape[1] - mask.shape[1]  # P
    last = offset + mask.long().sum(dim=1) - 1  # [N]
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to ``(ids [N, L], mask [N, L])``."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask
