"""ReferencePolicy: the frozen Janus that the KL term pulls the policy towards; log-probs only."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import lightning.pytorch as pl
import torch

from modules.lora import adapters_disabled
from modules.policy import DTYPES, ImageContext, JanusPolicy, PlanBatch, load_janus


class ReferencePolicy(pl.LightningModule):
    """A frozen copy of the starting policy (or another checkpoint), without gradients.

    Args:
        model_name_or_path: load the reference from here; ``None`` copies the policy's starting weights
            (see :meth:`from_policy`), which is the paper's set-up.
        dtype: weight dtype.
        trust_remote_code: passed to ``from_pretrained``; never on unless set.
    """

    def __init__(
        self, model_name_or_path: str | None = None, dtype: str = "float32", trust_remote_code: bool = False
    ) -> None:
        super().__init__()
        self.model = None
        self._shared: tuple = ()
        if model_name_or_path is not None:
            if dtype not in DTYPES:
                raise ValueError(f"reference dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            self.model, _ = load_janus(model_name_or_path, None, DTYPES[dtype], trust_remote_code)
            self._freeze()
        self.train(False)

    @classmethod
    def from_policy(cls, policy: JanusPolicy) -> ReferencePolicy:
        """A reference holding a frozen copy of the policy's current weights."""
        return cls().adopt(policy)

    def adopt(self, policy: JanusPolicy) -> ReferencePolicy:
        """Take the policy's starting weights: with LoRA, the policy's own model with adapters off
        (no copy); otherwise a frozen deep copy."""
        if policy.lora is not None:
            self._shared = (policy.model,)  # a tuple, so the model is not registered a second time
            return self
        self.model = copy.deepcopy(policy.model)
        self._freeze()
        return self

    @contextmanager
    def _weights(self):
        """Yield the model to score with (adapters off when it is the policy's own model).

        The policy's own model is in train mode between rollout and update; the reference scores it in eval
        mode (no dropout), like a separate reference, and gives each submodule its mode back afterwards."""
        if self._shared:
            model = self._shared[0]
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
            try:
                with adapters_disabled(model):
                    yield model
            finally:
                for module, mode in modes:
                    module.training = mode
        else:
            self._require_model()
            yield self.model

    def _require_model(self) -> None:
        if self.model is None and not self._shared:
            raise RuntimeError(
                "reference has no model: give model_name_or_path, or build it with ReferencePolicy.from_policy(policy)"
            )

    def _freeze(self) -> None:
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> ReferencePolicy:
        # Always in eval mode: the reference never trains, whatever Lightning toggles.
        return super().train(False)

    @torch.no_grad()
    def plan_logprobs(self, policy: JanusPolicy, plans: PlanBatch) -> torch.Tensor:
        """``[R, T]`` reference log-probs of plan tokens, with the policy's sampling settings."""
        with self._weights() as model:
            return policy.plan_logprobs(plans, model=model)

    @torch.no_grad()
    def image_logprobs(self, policy: JanusPolicy, context: ImageContext, tokens: torch.Tensor) -> torch.Tensor:
        """``[R, N]`` reference log-probs of image tokens, with the policy's sampling settings."""
        with self._weights() as model:
            return policy.image_logprobs(context, tokens, model=model)
