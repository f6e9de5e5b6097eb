"""A teacher's own input normalisation applied to the prepared view: teacher and student see the same pixels,
each normalised as it was trained (mmdet data preprocessors, ONNX graphs' mapping files)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class InputConversion(nn.Module):
    """Maps a view normalised with (view_mean, view_std) on RGB 0-255 to what the
    model's data_preprocessor would have produced: per-channel affine plus an
    optional RGB->BGR flip. Identity (and skipped) for ImageNet-RGB models.
    Padding (0 in view space, the view's mean pixel) maps to 0 in model space
    exactly when the model's mean is the same pixel, as for Caffe configs."""

    def __init__(self, perm: Sequence[int], scale: Sequence[float], shift: Sequence[float]) -> None:
        super().__init__()
        self.perm = list(perm)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.identity = (
            self.perm == [0, 1, 2]
            and torch.allclose(self.scale, torch.ones(()))
            and torch.allclose(self.shift, torch.zeros(()), atol=1e-6)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        return x[:, self.perm] * self.scale + self.shift

    def describe(self) -> dict:
        return {
            "channels": "rgb" if self.perm == [0, 1, 2] else "bgr",
            "scale": [round(float(v), 6) for v in self.scale.flatten()],
            "shift": [round(float(v), 6) for v in self.shift.flatten()],
        }
