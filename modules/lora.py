"""LoRA adapters on the language model through peft: the reference is the same model, adapters off."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSpec:
    """Low-rank adapters on the language model's projections.

    Attributes:
        r: adapter rank.
        alpha: scaling numerator (the update is ``alpha / r * B A``).
        dropout: dropout on the adapter input (0 keeps rollout and update log-probs identical).
        target_modules: projection names inside the decoder layers.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"lora: need r >= 1, alpha > 0, 0 <= dropout < 1; got {self}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty")


def add_lora(model: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """Inject adapters into ``model.model.language_model`` in place; freeze everything else.

    Returns:
        Names of the trainable (adapter) parameters.
    """
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.target_modules)
    )
    try:
        inject_adapter_in_model(config, model.model.language_model)
    except ValueError as err:  # peft's own message does not say which setting to change
        raise ValueError(f"lora.target_modules {spec.target_modules} matched no module of the language model: {err}") from err
    model.requires_grad_(False)
    names = []
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            names.append(name)
    if not names:
        raise ValueError(f"lora.target_modules {spec.target_modules} matched no module of the language model")
    return names


def lora_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    """The adapter-carrying layers inside ``model``."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return bool(lora_layers(model))


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the base model: the frozen starting weights, i.e. the reference, without a second copy."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_weight(layer: BaseTunerLayer) -> torch.Tensor:
    """The weight an adapted linear layer applies in eval mode: its base weight plus each active adapter's
    ``scaling * B @ A`` (what :func:`merged_copy`'s ``merge`` writes, the same additions), or the base weight alone
    where the adapters are off (:func:`adapters_disabled`) or already merged."""
    weight = layer.get_base_layer().weight
    if layer.disable_adapters or layer.merged:
        return weight
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            weight = weight + layer.get_delta_weight(adapter)
    return weight


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with every adapter merged into its base weight and removed: a stock Janus model."""
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, module.get_base_layer())
    return merged


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """Merge adapter weights into their base weights inside a (full) state dict, with stock key names.

    ``W' = W + (alpha / r) * B @ A`` for every ``<layer>.base_layer.weight`` that has
    ``<layer>.lora_A.<adapter>.weight`` and ``<layer>.lora_B.<adapter>.weight``. Works on a gathered
    FSDP2 state dict, where the adapted modules themselves cannot be merged in place. The sum is formed in
    float32 and rounded to the weight's dtype once: bf16 weights get the nearest bf16 of the merged value
    (peft's ``merge`` rounds the delta first, then the sum).
    """
    scaling = spec.alpha / spec.r
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        prefix, _, leaf = key.partition(".base_layer.")
        merged = value
        if leaf == "weight":
            a = [v for k, v in state_dict.items() if k.startswith(f"{prefix}.lora_A.") and k.endswith(".weight")]
            b = [v for k, v in state_dict.items() if k.startswith(f"{prefix}.lora_B.") and k.endswith(".weight")]
            if a:
                total = value.float()
                for lora_a, lora_b in zip(a, b, strict=True):
                    total = total + scaling * (lora_b.float() @ lora_a.float())
                merged = total.to(value.dtype)
        out[f"{prefix}.{leaf}"] = merged
    return out
