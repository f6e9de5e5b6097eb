"""A small Swin Transformer RetinaNet: the transformer teacher of the digits benchmark.

MTPD's headline is a transformer teacher (Swin-T → Swin-S) distilled into a conv student. This is
that case at the benchmark's scale: torchvision's own Swin blocks (``SwinTransformerBlock``,
``PatchMerging``: shifted-window attention with relative position bias) at reduced width and
depth, a feature pyramid over its last three stages (strides 8/16/32, as Swin-T's RetinaNet in
MTPD and mmdet), and the same RetinaNet head as ``retinanet_tiny`` so a conv student's neck and head
have its shapes.

One departure from Swin, on purpose: the stride-4 patch embedding is two conv-BN-ReLU layers
instead of one 4×4 patch projection. Transformers trained from scratch on a few thousand images
learn slowly without a convolutional stem (Xiao et al., "Early convolutions help transformers see
better", 2021); every layer past the stem is a Swin block. No ImageNet weights exist offline, so it
trains from scratch.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Sequence

from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torchvision.ops.misc import Conv2dNormActivation

from mtpd.models.arch_info import ArchInfo, arch_table
from mtpd.models.parts import check_levels, extra_block, load_backbone_weights, retinanet_anchors
from mtpd.models.tiny import tiny_head_convs

# This module's architectures, read by mtpd.models.registry (this module never imports the registry).
ARCHS: list[ArchInfo] = []
register_arch = arch_table(ARCHS.append)


class SwinStage(nn.Module):
    """One Swin stage on NCHW maps: an optional 2× patch merging, then ``depth`` blocks whose
    windows alternate unshifted / shifted by half a window. NCHW in and out, so torchvision's
    ``IntermediateLayerGetter`` and FPN take it like any conv stage."""

    def __init__(
        self, in_dim: int, depth: int, heads: int, window: int, merge: bool, drop_path: Sequence[float]
    ) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-5)
        self.merge = PatchMerging(in_dim, norm_layer=norm) if merge else nn.Identity()
        dim = 2 * in_dim if merge else in_dim
        self.blocks = nn.Sequential(
            *[
                SwinTransformerBlock(
                    dim,
                    heads,
                    window_size=[window, window],
                    shift_size=[0 if i % 2 == 0 else window // 2] * 2,
                    stochastic_depth_prob=drop_path[i],
                    norm_layer=norm,
                )
                for i in range(depth)
            ]
        )
        self.norm = norm(dim)  # each stage's output is normalised, as Swin's detection backbones do
        self.out_channels = dim

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # NHWC: torchvision's Swin layout
        x = self.norm(self.blocks(self.merge(x)))
        return x.permute(0, 3, 1, 2).contiguous()


class SwinBody(nn.Sequential):
    """stem (stride 4, conv) and stage2..stage5 (strides 4..32, Swin blocks)."""

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        heads: Sequence[int],
        window: int,
        drop_path: float,
    ) -> None:
        if len(depths) != 4 or len(heads) != 4:
            raise ValueError(f"swin: depths and num_heads need 4 entries (one per stage), got {depths}, {heads}")
        total = sum(depths)
        rates = [drop_path * i / max(1, total - 1) for i in range(total)]  # linearly rising, as Swin's
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["stem"] = nn.Sequential(
            Conv2dNormActivation(3, embed_dim // 2, stride=2),
            Conv2dNormActivation(embed_dim // 2, embed_dim, stride=2),
        )
        dim, start = embed_dim, 0
        channels = []
        for k, (depth, h) in enumerate(zip(depths, heads)):
            stage = SwinStage(dim, depth, h, window, merge=k > 0, drop_path=rates[start : start + depth])
            layers[f"stage{k + 2}"] = stage
            dim, start = stage.out_channels, start + depth
            channels.append(dim)
        super().__init__(layers)
        self.stage_channels = channels  # per level 2..5 (index: level - 2)


@register_arch("retinanet_swin_tiny", family="retinanet")
def retinanet_swin_tiny(
    num_classes: int,
    *,
    embed_dim: int = 32,
    depths: Sequence[int] = (2, 2, 4, 2),
    num_heads: Sequence[int] = (1, 2, 4, 8),
    window_size: int = 4,
    drop_path: float = 0.1,
    fpn_channels: int = 64,
    levels: Sequence[int] = (3, 4, 5),
    head_convs: int = 1,
    anchor_base: float = 1.0,
    anchor_scales: int = 3,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    backbone_weights: str | None = None,
    min_size: int = 128,
    max_size: int = 128,
) -> RetinaNet:
    """RetinaNet on a small Swin Transformer (conv stem, Swin blocks at strides 4–32, FPN on P3–P5),
    with retinanet_tiny's anchors and head: the digits benchmark's transformer teacher."""
    name = "retinanet_swin_tiny"
    lv = check_levels(levels, 3, 7, name)
    body = SwinBody(embed_dim, tuple(depths), tuple(num_heads), window_size, drop_path)
    if backbone_weights is not None:
        load_backbone_weights(body, backbone_weights, None, name)
    backbone_levels = [lvl for lvl in lv if lvl <= 5]
    return_layers = {f"stage{lvl}": str(i) for i, lvl in enumerate(backbone_levels)}
    in_channels = [body.stage_channels[lvl - 2] for lvl in backbone_levels]
    backbone = BackboneWithFPN(
        body, return_layers, in_channels, fpn_channels, extra_blocks=extra_block(lv, "p6p7", fpn_channels)
    )
    anchors = retinanet_anchors(lv, base=anchor_base, scales=anchor_scales, aspect_ratios=aspect_ratios)
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
    # retinanet_tiny's head: the same convs (and init), so a conv student inherits its shapes.
    head.classification_head.conv = tiny_head_convs(fpn_channels, head_convs)
    head.regression_head.conv = tiny_head_convs(fpn_channels, head_convs)
    return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors, head=head)
