"""Building blocks shared by the registered architectures: norms, levels, anchors,
local weight files and state-dict checks. No downloads anywhere."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from mtpd.checkpoint import CheckpointError, load_state_dict

NORMS = ("auto", "bn", "frozen_bn")
# Backbone stages left trainable over pretrained weights by default (torchvision's choice).
PRETRAINED_TRAINABLE_LAYERS = 3


def resolve_norm(norm: str, pretrained: bool, **bn_kwargs: Any) -> Callable[..., nn.Module]:
    """The backbone's norm layer. ``auto`` freezes BatchNorm only over pretrained weights:
    frozen statistics from random init never move, so a from-scratch model would not train."""
    if norm not in NORMS:
        raise ValueError(f"norm {norm!r} is not one of {', '.join(NORMS)}")
    frozen = norm == "frozen_bn" or (norm == "auto" and pretrained)
    if frozen:
        eps = bn_kwargs.get("eps")
        return partial(FrozenBatchNorm2d, eps=eps) if eps is not None else FrozenBatchNorm2d
    return partial(nn.BatchNorm2d, **bn_kwargs) if bn_kwargs else nn.BatchNorm2d


def set_frozen_bn_eps(model: nn.Module, eps: float) -> None:
    """Set every FrozenBatchNorm2d's eps (torchvision's legacy v1 COCO weights need 0.0)."""
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps


def hub_checkpoint_path(url: str) -> Path:
    """Where torch.hub keeps the file downloaded from ``url``: ``<hub dir>/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def name_hash_problem(path: Path, digest: str) -> str:
    """A one-line problem when the sha256 ``digest`` of ``path`` does not start with the hex digits its
    name ends in (torchvision's file names do; torch.hub's ``check_hash``), else ""."""
    m = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if m and not digest.startswith(m.group(1)):
        return (
            f"{path} has sha256 {digest[:12]}…, not {m.group(1)}… as its name says: the file is damaged or incomplete"
        )
    return ""


def check_levels(levels: Sequence[int], lowest: int, highest: int, arch: str) -> tuple[int, ...]:
    """Levels must be contiguous, within [lowest, highest], and include P5 (the last backbone stage)."""
    lv = tuple(int(x) for x in levels)
    ok = len(lv) >= 1 and lv == tuple(range(lv[0], lv[0] + len(lv))) and lowest <= lv[0] <= 5 <= lv[-1] <= highest
    if not ok:
        raise ValueError(
            f"{arch}: levels {list(lv)} must be a contiguous range that includes 5 within {lowest}..{highest} "
            f"(e.g. {list(range(3, highest + 1))})"
        )
    return lv


class NoExtraLevels(ExtraFPNBlock):
    """No levels past P5 (BackboneWithFPN would otherwise add a max-pool level)."""

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        return results, names


class LastLevelP6(ExtraFPNBlock):
    """P6 alone: the first half of RetinaNet's P6P7 (a stride-2 3x3 conv on P5, or on C5 when the widths
    differ), for students and teachers that end at P6."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        nn.init.kaiming_uniform_(self.p6.weight, a=1)  # as torchvision's LastLevelP6P7
        nn.init.constant_(self.p6.bias, 0)
        self.use_p5 = in_channels == out_channels

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        results.append(self.p6(results[-1] if self.use_p5 else x[-1]))
        names.append("p6")
        return results, names


def extra_block(
    levels: tuple[int, ...], style: str, fpn_channels: int, c5_channels: int | None = None
) -> ExtraFPNBlock:
    """Levels past P5: ``p6p7`` (RetinaNet/FCOS, two stride-2 convs; from C5 when
    ``c5_channels`` is given, as RetinaNet v2, else from P5) or ``pool`` (R-CNN's P6 by
    subsampling P5)."""
    extra = levels[-1] - 5
    if extra == 0:
        return NoExtraLevels()
    if style == "p6p7" and extra == 2:
        return LastLevelP6P7(c5_channels or fpn_channels, fpn_channels)
    if style == "p6p7" and extra == 1:
        return LastLevelP6(c5_channels or fpn_channels, fpn_channels)
    if style == "pool" and extra == 1:
        return LastLevelMaxPool()
    top = 7 if style == "p6p7" else 6
    raise ValueError(f"levels {list(levels)}: this architecture ends at P5 or P{top}")


def retinanet_anchors(
    levels: Sequence[int], base: float = 4.0, scales: int = 3, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
) -> AnchorGenerator:
    """RetinaNet anchors: on level l, sizes base·2^l·2^(i/scales), i < scales, per aspect ratio.
    base=4, scales=3 reproduces torchvision's (32, 40, 50) … (512, 645, 812) on P3–P7."""
    sizes = tuple(tuple(int(base * 2**lvl * 2 ** (i / scales)) for i in range(scales)) for lvl in levels)
    return AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))


def point_anchors(levels: Sequence[int], base: float = 1.0) -> AnchorGenerator:
    """FCOS "anchors": one square of side base·stride per location (torchvision uses base=1)."""
    sizes = tuple((int(base * 2**lvl),) for lvl in levels)
    return AnchorGenerator(sizes, ((1.0,),) * len(sizes))


def rpn_anchors(
    levels: Sequence[int], base: float = 8.0, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
) -> AnchorGenerator:
    """Faster R-CNN RPN anchors: one size base·stride per level (torchvision: 32 on P2 … 512 on P6)."""
    sizes = tuple((int(base * 2**lvl),) for lvl in levels)
    return AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))


def load_checked(module: nn.Module, state_dict: Mapping[str, Tensor]) -> str:
    """Load ``state_dict`` into ``module``; return "" on a full fit, else a one-line summary
    of mis-shaped / missing / unexpected keys (the module is then partly loaded: discard it).

    BatchNorm's ``num_batches_tracked`` counters are ignored both ways, so checkpoints
    move between BatchNorm2d and FrozenBatchNorm2d builds.
    """
    own = module.state_dict()
    misshaped = {
        k: f"{k} {list(v.shape)} vs {list(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    }
    keep = [
        (k, v)
        for k, v in state_dict.items()
        if k not in misshaped and (not k.endswith("num_batches_tracked") or k in own)
    ]
    sd = OrderedDict(keep)
    # Keep torch's per-module version metadata: old torchvision heads rename keys on load by it.
    if hasattr(state_dict, "_metadata"):
        sd._metadata = state_dict._metadata  # type: ignore[attr-defined]
    result = module.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked") and k not in misshaped]
    unexpected = list(result.unexpected_keys)
    if misshaped or missing or unexpected:
        return _summary(missing, unexpected, list(misshaped.values()))
    return ""


def _summary(missing: list[str], unexpected: list[str], misshaped: list[str], show: int = 3) -> str:
    parts = []
    for label, keys in (("mis-shaped (file vs model)", misshaped), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f", … {len(keys) - show} more" if len(keys) > show else ""
            parts.append(f"{len(keys)} {label}: " + ", ".join(keys[:show]) + more)
    return "; ".join(parts)


def load_backbone_weights(module: nn.Module, weights: str, imagenet_enum: Any, arch: str) -> None:
    """Load ImageNet weights into a classification backbone (before it is cut for the FPN).

    ``weights``: a local file, or ``imagenet`` for torchvision's file in the local torch cache.
    """
    if weights == "imagenet":
        if imagenet_enum is None:
            raise ValueError(f"{arch}: no torchvision ImageNet weights for this backbone; pass a local file path")
        path = hub_checkpoint_path(imagenet_enum.url)
        if not path.is_file():
            raise ValueError(
                f"{arch}: backbone_weights='imagenet' needs {path}; download {imagenet_enum.url} "
                "on a machine with network access and place it there, or pass the file's path"
            )
    else:
        path = Path(weights)
    try:
        sd, _ = load_state_dict(path, mmap=True)
    except CheckpointError as e:
        raise ValueError(f"{arch}: cannot read backbone weights: {e}") from e
    problem = load_checked(module, sd)
    if problem:
        raise ValueError(f"{arch}: backbone weights {path} do not fit the {type(module).__name__} backbone: {problem}")


def freeze_except(module: nn.Module, trainable_prefixes: Sequence[str]) -> None:
    """requires_grad=False on every parameter whose name starts with none of the prefixes."""
    for name, p in module.named_parameters():
        if not any(name.startswith(t) for t in trainable_prefixes):
            p.requires_grad_(False)
