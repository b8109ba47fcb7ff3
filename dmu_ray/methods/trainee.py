"""What a training worker optimises: one ``nn.Module`` holding everything trained and frozen, whose
``forward`` returns the method's loss (so DDP synchronises all of it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from dmu_ray.methods.base import Method
    from dmu_ray.models.embedding import EmbeddingModel
    from dmu_ray.models.heads import MarginHead
    from dmu_ray.models.upgrade import UpgradeModule


class Trainee(nn.Module):
    """New model + new classifier (+ upgrade module psi), the frozen old classifier (or UniBCT's
    prototypes) with the classes it knows, and the method whose :meth:`~Method.loss` is the
    forward pass. With ``frozen_model`` (FastFill) the new model and classifier do not learn."""

    def __init__(
        self,
        model: EmbeddingModel,
        head: MarginHead,
        method: Method,
        *,
        psi: UpgradeModule | None = None,
        old_head: MarginHead | None = None,
        old_classes: torch.Tensor | None = None,
        frozen_model: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.head, self.psi, self.method = model, head, psi, method
        #: ids of the images of the current batch (for methods that keep per-image state)
        self.batch_ids: torch.Tensor | None = None
        self.old_head = old_head
        self.frozen_model = frozen_model
        if frozen_model:
            model.requires_grad_(False)
            head.requires_grad_(False)
        if old_head is not None:
            old_head.requires_grad_(False)
            self.register_buffer("old_classes", old_classes.bool())

    def train(self, mode: bool = True) -> Trainee:
        super().train(mode)
        if self.frozen_model:  # its BatchNorm statistics must not move either
            self.model.eval()
        return self

    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        f_o: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.batch_ids = ids
        return self.method.loss(self, x, labels, f_o)
