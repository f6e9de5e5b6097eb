"""DETR-family mmdet detectors (DINO, Deformable DETR, …) as teachers: what of them depends on the image alone.

A DETR's predictions come from its decoder's queries, which depend on the query embeddings and on each
other, not on image cells, so they are not cacheable as maps. What is:

- ``fpn``: the multi-scale neck maps after the channel mapper (DINO-4scale: strides 8–64, 256 channels);
- ``memory`` (on request): the transformer encoder's output, one token per neck cell, reshaped per level
  to [B, C, h, w] like the neck maps.

Views are zero-padded at the bottom and right, so the encoder is given each view's valid size
(``sizes``): the same padding mask mmdet builds from ``img_shape`` against ``batch_input_shape``, so its
attention never mixes padding in. Levels are measured by a probe forward (no prior generator to read).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from mtpd.output_spec import OutputSpec
from mtpd.teachers.base import TeacherError, TeacherIdentity, check_outputs

CACHEABLE = ("fpn", "memory")
QUERY_OUTPUTS = ("cls", "box", "ctr")


def is_detr(model: nn.Module) -> bool:
    """mmdet's ``DetectionTransformer`` family: an encoder fed by ``pre_transformer``."""
    return all(hasattr(model, a) for a in ("extract_feat", "pre_transformer", "forward_encoder"))


class MMDetDETRTeacher:
    """A built DETR-family mmdet detector in eval mode, answering the ``Teacher`` protocol (see the module
    docstring); ``conversion`` maps views to the model's own input normalisation."""

    def __init__(self, model: nn.Module, identity: TeacherIdentity, conversion: nn.Module, device: str = "cpu") -> None:
        self.model = model.eval()
        self.identity = identity
        self.conversion = conversion
        self.to(device)
        self._specs = self._probe()

    def output_specs(self) -> dict[str, OutputSpec]:
        return dict(self._specs)

    def to(self, device: str | torch.device) -> "MMDetDETRTeacher":
        self.device = torch.device(device)
        self.model.to(self.device)
        self.conversion.to(self.device)
        return self

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, outputs: Sequence[str], sizes: Sequence[tuple[int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        asked = [o for o in outputs if o in QUERY_OUTPUTS]
        if asked:
            raise TeacherError(
                f"{self.identity.name}: {', '.join(asked)} of a DETR-family detector come from its decoder's queries, "
                f"not from image cells, and are not cacheable; cache {' and/or '.join(CACHEABLE)} (--outputs fpn)"
            )
        check_outputs(self, outputs, self.identity.name)
        x = self.conversion(images.to(self.device, torch.float32))
        h, w = x.shape[-2:]
        sizes = [(int(h), int(w))] * x.shape[0] if sizes is None else [tuple(s) for s in sizes]
        feats = self.model.extract_feat(x)
        for lvl, f in zip(self.levels, feats):
            if tuple(f.shape[-2:]) != (math.ceil(h / 2**lvl), math.ceil(w / 2**lvl)):
                raise TeacherError(
                    f"{self.identity.name}: level P{lvl} is {tuple(f.shape[-2:])} for input {(int(h), int(w))}, not "
                    f"ceil(size / {2**lvl}); the neck rounds differently from the views' padding"
                )
        result = {f"fpn.p{lvl}": f for lvl, f in zip(self.levels, feats)} if "fpn" in outputs else {}
        if "memory" in outputs:
            result.update(self._memory(feats, (int(h), int(w)), sizes))
        return result

    def _memory(
        self, feats: Sequence[torch.Tensor], padded: tuple[int, int], sizes: Sequence[tuple[int, int]]
    ) -> dict[str, torch.Tensor]:
        """The encoder's output per level, with each view's padding masked as mmdet masks it."""
        from mmdet.structures import DetDataSample

        samples = []
        for s in sizes:
            d = DetDataSample()
            d.set_metainfo({"img_shape": tuple(s), "batch_input_shape": padded, "pad_shape": padded})
            samples.append(d)
        encoder_inputs, _ = self.model.pre_transformer(tuple(feats), samples)
        memory = self.model.forward_encoder(**encoder_inputs)["memory"]  # [B, Σ h·w, C]
        out, start = {}, 0
        for lvl, f in zip(self.levels, feats):
            hw = f.shape[-2] * f.shape[-1]
            out[f"memory.p{lvl}"] = memory[:, start : start + hw].transpose(1, 2).reshape(f.shape[0], -1, *f.shape[-2:])
            start += hw
        return out

    def _probe(self) -> dict[str, OutputSpec]:
        """The neck's levels (strides measured on a 256-px blank view) and the two outputs' channels."""
        side = 256
        with torch.no_grad():
            feats = self.model.extract_feat(torch.zeros(1, 3, side, side, device=self.device))
        levels = []
        for f in feats:
            stride = side / f.shape[-1]
            lvl = math.log2(stride)
            if lvl != int(lvl) or f.shape[-1] * stride != side:
                raise TeacherError(f"{self.identity.name}: a neck map has stride {stride:g}: not a power of two")
            levels.append(int(lvl))
        self.levels = tuple(levels)
        chans = {int(f.shape[1]) for f in feats}
        if len(chans) != 1:
            raise TeacherError(f"{self.identity.name}: neck maps have channels {sorted(chans)} per level; not storable")
        c = chans.pop()
        embed = int(getattr(getattr(self.model, "encoder", None), "embed_dims", c))
        return {
            "fpn": OutputSpec("fpn", "feature", self.levels, c),
            "memory": OutputSpec("memory", "feature", self.levels, embed),
        }

    def __repr__(self) -> str:
        return (
            f"MMDetDETRTeacher({self.identity.name!r}, weights={self.identity.weights!r}, device={str(self.device)!r})"
        )
