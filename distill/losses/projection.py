"""Learned projection of student hidden states into the teacher's hidden size (FitNets-style regressor)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.errors import ConfigError


class HiddenProjector(nn.Module):
    """One Linear(student_hidden -> teacher_hidden) per mapped layer.

    Identity-initialised (weight = I, bias = 0) when the sizes match, so training starts from the plain
    feature distance instead of a random rotation of it.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.proj = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden) for _ in range(num_layers))
        if student_hidden == teacher_hidden:
            with torch.no_grad():
                for lin in self.proj:
                    nn.init.eye_(lin.weight)
                    nn.init.zeros_(lin.bias)

    def forward(self, student_feats: Tensor) -> Tensor:
        """student_feats [N, L, H_s] -> [N, L, H_t], layer l through its own Linear."""
        if student_feats.dim() != 3 or student_feats.shape[1] != self.num_layers:
            raise ConfigError(
                f"HiddenProjector expects [N, {self.num_layers}, H_s] student features (one slice per mapped "
                f"layer); got {tuple(student_feats.shape)}. Build it with num_layers = len(layer_map)."
            )
        return torch.stack([lin(student_feats[:, i]) for i, lin in enumerate(self.proj)], dim=1)
