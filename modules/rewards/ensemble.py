"""The reward ensemble: runs every expert on a batch and sums their scores with fixed weights."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert


@dataclass
class RewardOutput:
    """The ensemble's scores for one batch of ``N`` images.

    Attributes:
        total: float32 ``[N]`` on CPU, the weighted sum of the experts' scores.
        per_expert: expert name -> float32 ``[N]`` on CPU, each expert's unweighted score in ``[0, 1]``.
        failed: the experts that raised on this batch and were scored 0 (``on_error: zero``).
    """

    total: Tensor
    per_expert: dict[str, Tensor]
    failed: tuple[str, ...] = ()


class RewardExpertError(RuntimeError):
    """An expert raised while scoring; the message names the expert and the batch."""


def _check_weight(name: str, weight: object, known: list[str]) -> float:
    if name not in known:
        raise ValueError(f"reward weight given for unknown expert {name!r}; known experts: {known}")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise ValueError(
            f"reward weight for {name!r} must be a number, got {weight!r}; known experts: {known}"
        )
    value = float(weight)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"reward weight for {name!r} must be finite and >= 0, got {weight!r}; known experts: {known}"
        )
    return value


class RewardEnsemble(pl.LightningModule):
    """Scores images with several experts and combines them into one reward.

    The paper sums its four experts with equal weight, hence a default weight of 1.0 each.

    Args:
        experts: the experts; each ``expert.name`` must be unique (it keys metrics and weights).
        weights: expert name -> weight >= 0; experts left out weigh 1.0.
        normalize_weights: divide the weights by their sum, so the total stays in ``[0, 1]``.
        on_error: ``raise`` (stop the run, naming the expert and the batch) or ``zero`` (score that
            expert 0 for the batch, warn, and count it in ``errors[name]``; under data parallel the
            training step zeroes it on every process, see :meth:`zero_failed_elsewhere`).

    Raises:
        ValueError: no experts, a duplicate or unusable name, or a weight that is unknown,
            negative, not finite or not a number, or weights that are all zero.
    """

    def __init__(
        self,
        experts: list[RewardExpert],
        weights: dict[str, float] | None = None,
        normalize_weights: bool = False,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "zero"):
            raise ValueError(f"rewards.on_error must be 'raise' or 'zero', got {on_error!r}")
        self.on_error = on_error
        self.errors: dict[str, int] = {e.name: 0 for e in experts if isinstance(e, RewardExpert)}
        if not experts:
            raise ValueError("RewardEnsemble needs at least one reward expert")
        self.experts = nn.ModuleDict()
        for expert in experts:
            if not isinstance(expert, RewardExpert):
                raise ValueError(
                    f"reward experts must be RewardExpert instances, got {type(expert).__name__}"
                )
            name = expert.name
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"reward expert name must be a non-empty string without '.', got {name!r}")
            if name in self.experts:
                raise ValueError(f"two reward experts share the name {name!r}; names must be unique")
            self.experts[name] = expert
        self.weights = self._resolve_weights(weights or {}, normalize_weights)

    def _resolve_weights(self, given: Mapping[str, object], normalize: bool) -> dict[str, float]:
        known = self.names
        if not isinstance(given, Mapping):
            raise ValueError(f"reward weights must be a mapping of expert name to number, got {given!r}")
        weights = {name: 1.0 for name in known}
        for name, weight in given.items():
            weights[name] = _check_weight(name, weight, known)
        total = sum(weights.values())
        if total <= 0:  # every reward 0: every advantage 0, nothing would learn
            what = "normalise reward weights" if normalize else "train on reward weights"
            raise ValueError(f"cannot {what} that sum to 0: {weights}")
        if normalize:
            weights = {name: weight / total for name, weight in weights.items()}
        return weights

    @property
    def names(self) -> list[str]:
        """The experts' names, in the order they were given."""
        return list(self.experts.keys())

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[PromptRecord]) -> RewardOutput:
        """Score a batch with every expert.

        Args:
            images: uint8 ``[N, H, W, 3]`` RGB images (each expert checks them).
            prompts: ``N`` prompt records, one per image.

        Returns:
            ``total`` float32 ``[N]`` (weighted sum) and each expert's ``[N]`` scores, all on CPU.

        Raises:
            RewardExpertError: an expert raised; the original error is chained as ``__cause__``.
        """
        n = int(images.shape[0]) if images.ndim > 0 else 0
        per_expert: dict[str, Tensor] = {}
        failed: list[str] = []
        for name, expert in self.experts.items():
            try:
                scores = expert(images, prompts)
            except Exception as err:
                first = repr(prompts[0].prompt) if len(prompts) else "<none>"
                message = (
                    f"reward expert {name!r} failed on a batch of {n} images (first prompt {first}): "
                    f"{type(err).__name__}: {err}"
                )
                if self.on_error == "raise":
                    raise RewardExpertError(message) from err
                rank_zero_warn(f"{message}; scoring it 0 for this batch (rewards.on_error=zero)")
                self.errors[name] = self.errors.get(name, 0) + 1
                failed.append(name)
                scores = torch.zeros(n)
            per_expert[name] = scores.detach().float().cpu()
        return self.combine(per_expert, tuple(failed))

    def combine(self, per_expert: dict[str, Tensor], failed: tuple[str, ...] = ()) -> RewardOutput:
        """The weighted sum of the experts' scores (each ``[N]`` on CPU) as a :class:`RewardOutput`."""
        total = torch.zeros_like(next(iter(per_expert.values())))
        for name in self.names:
            total = total + self.weights[name] * per_expert[name]
        return RewardOutput(total=total, per_expert=per_expert, failed=failed)

    def zero_failed_elsewhere(self, out: RewardOutput, failed_anywhere: Sequence[str]) -> RewardOutput:
        """``out`` with every expert that failed on any process scored 0 here too.

        Under data parallel a group's samples may sit on several processes; an expert zeroed on one of them
        only would give the group's rows different reward scales, hence advantages no sample earned.
        """
        more = [name for name in failed_anywhere if name not in out.failed]
        if not more:
            return out
        per_expert = {name: torch.zeros_like(s) if name in more else s for name, s in out.per_expert.items()}
        return self.combine(per_expert, (*out.failed, *more))
