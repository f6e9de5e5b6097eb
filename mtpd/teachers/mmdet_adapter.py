"""mmdet detectors as mtpd teachers: a config (file or bundled name) plus a local checkpoint.

The adapter builds the model from its config alone (``Config.fromfile`` and
mmdet's ``MODELS`` registry), never a data pipeline and never a download, and
runs only the cacheable part of it on prepared views:

- one-stage detectors (RetinaNet, ATSS, GFL, FCOS, ...): neck features
  ``fpn``, dense head class logits ``cls`` and box regression ``box`` (as the
  head emits it: deltas for RetinaNet/ATSS/FCOS, 4*(reg_max+1) distribution
  logits for GFL), plus centerness ``ctr`` for heads that predict it (FCOS, ATSS);
- two-stage detectors (Faster/Mask R-CNN, Cascade): neck features ``fpn`` and
  the RPN head's ``rpn_obj``/``rpn_box``; RoI-head outputs depend on proposals
  and are not cacheable.

Levels come from the dense head's prior-generator strides (level l has stride
2**l) and are checked against a probe forward at build time, so a neck with
an unusual set of outputs fails loudly instead of being mislabelled.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from mtpd.checkpoint import sha256_file
from mtpd.data.views import IMAGENET_MEAN, IMAGENET_STD
from mtpd.output_spec import NEGATE_DX, NONE, SWAP_LR, OutputSpec
from mtpd.teachers.base import INIT_SEED, TeacherError, TeacherIdentity, check_outputs
from mtpd.teachers.convert import InputConversion
from mtpd.teachers.mmdet_config import config_digest, load_model_config, load_weights, one_line, resolve_config
from mtpd.teachers.mmdet_detr import MMDetDETRTeacher, is_detr

Triple = tuple[float, float, float]
# Attribute names of the centerness conv in mmdet's FCOS and ATSS heads; a head
# returning a third output without one of these (VFNet, PAA, DDOD) returns
# something else, which is not offered.
_CENTERNESS_CONVS = ("conv_centerness", "atss_centerness")
# How a box map mirrors, by the head's box coder: deltas (dx, dy, dw, dh) negate dx; distances (l, t, r, b),
# one value each (FCOS) or reg_max + 1 distribution bins each (GFL), swap l and r. Any other coder: unknown.
_BOX_MIRROR = {"DeltaXYWHBBoxCoder": NEGATE_DX, "DistancePointBBoxCoder": SWAP_LR}

# --------------------------------------------------------------------------- input


def input_conversion(preprocessor_cfg: dict | None, view_mean: Triple, view_std: Triple) -> InputConversion:
    """Build the conversion from the model config's ``data_preprocessor``.

    mmdet pipelines load images BGR (mmcv's default) and the preprocessor flips
    them when ``bgr_to_rgb``/``rgb_to_bgr`` is set, then normalises with mean/std
    given in the order the model sees; without mean/std it sees raw 0-255 pixels.
    """
    dp = dict(preprocessor_cfg or {})
    model_rgb = bool(dp.get("bgr_to_rgb") or dp.get("rgb_to_bgr"))
    mean_m = [float(v) for v in dp["mean"]] if dp.get("mean") is not None else [0.0, 0.0, 0.0]
    std_m = [float(v) for v in dp["std"]] if dp.get("std") is not None else [1.0, 1.0, 1.0]
    if len(mean_m) == 1:
        mean_m = mean_m * 3
    if len(std_m) == 1:
        std_m = std_m * 3
    perm = [0, 1, 2] if model_rgb else [2, 1, 0]
    # model_in[c] = (pixel[perm[c]] - mean_m[c]) / std_m[c], pixel = x * std_v + mean_v
    scale = [view_std[p] / std_m[c] for c, p in enumerate(perm)]
    shift = [(view_mean[p] - mean_m[c]) / std_m[c] for c, p in enumerate(perm)]
    return InputConversion(perm, scale, shift)


# --------------------------------------------------------------------------- teacher


def _level_of(stride: Any, where: str) -> int:
    """Level l of a stride 2**l; prior generators give ints or (w, h) pairs."""
    sw, sh = (stride, stride) if isinstance(stride, (int, float)) else tuple(stride)
    lvl = math.log2(sw) if sw > 0 else -1.0
    if sw != sh or lvl != int(lvl) or lvl < 0:
        raise TeacherError(
            f"{where} has stride {stride}: mtpd stores need square power-of-two strides (level l = stride 2**l)"
        )
    return int(lvl)


class MMDetTeacher:
    """A built mmdet detector in eval mode, answering the ``Teacher`` protocol."""

    def __init__(
        self, model: nn.Module, identity: TeacherIdentity, conversion: InputConversion, device: str = "cpu"
    ) -> None:
        self.model = model.eval()
        self.identity = identity
        self.conversion = conversion
        self.two_stage = getattr(model, "rpn_head", None) is not None and getattr(model, "with_rpn", False)
        self.head = model.rpn_head if self.two_stage else getattr(model, "bbox_head", None)
        if self.head is None or not hasattr(self.head, "prior_generator") or not hasattr(model, "extract_feat"):
            raise TeacherError(
                f"{identity.name}: {type(model).__name__} has no dense head with a prior generator; use a one-stage, "
                "RPN-based or DETR-family config"
            )
        self.levels = tuple(
            _level_of(s, f"{type(self.head).__name__}.prior_generator") for s in self.head.prior_generator.strides
        )
        self.head_names = ("rpn_obj", "rpn_box") if self.two_stage else ("cls", "box", "ctr")
        self.to(device)
        self._specs = self._probe()

    # -- protocol ------------------------------------------------------------

    def output_specs(self) -> dict[str, OutputSpec]:
        return dict(self._specs)

    def to(self, device: str | torch.device) -> "MMDetTeacher":
        self.device = torch.device(device)
        self.model.to(self.device)
        self.conversion.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, outputs: Sequence[str]) -> dict[str, torch.Tensor]:
        check_outputs(self, outputs, self.identity.name)
        if images.ndim != 4 or images.shape[1] != 3:
            raise TeacherError(f"{self.identity.name}: expected images [B, 3, H, W], got {tuple(images.shape)}")
        maps = self._forward(
            images.to(self.device, torch.float32), need_head=any(o in self.head_names for o in outputs)
        )
        size = images.shape[-2:]
        result: dict[str, torch.Tensor] = {}
        for name in outputs:
            for lvl, t in zip(self._specs[name].levels, maps[name]):
                want = (math.ceil(size[0] / 2**lvl), math.ceil(size[1] / 2**lvl))
                if tuple(t.shape[-2:]) != want:
                    raise TeacherError(
                        f"{self.identity.name}: {name}.p{lvl} is {tuple(t.shape[-2:])}, expected {want} for input "
                        f"{tuple(size)}; pad views to a multiple of 32 (mtpd.data.prepare_view does)"
                    )
                result[f"{name}.p{lvl}"] = t
        return result

    # -- internals -----------------------------------------------------------

    def _forward(self, images: torch.Tensor, need_head: bool) -> dict[str, list[torch.Tensor]]:
        feats = list(self.model.extract_feat(self.conversion(images)))
        if len(feats) != len(self.levels):
            raise TeacherError(
                f"{self.identity.name}: the neck gives {len(feats)} maps but the head's prior generator has "
                f"{len(self.levels)} strides; fix the config so they agree"
            )
        maps: dict[str, list[torch.Tensor]] = {"fpn": feats}
        if need_head:
            outs = self.head(tuple(feats))
            maps[self.head_names[0]] = list(outs[0])
            maps[self.head_names[1]] = list(outs[1])
            if not self.two_stage and len(outs) == 3 and any(hasattr(self.head, n) for n in _CENTERNESS_CONVS):
                maps["ctr"] = list(outs[2])
        return maps

    def _probe(self) -> dict[str, OutputSpec]:
        """One forward on a blank image twice the largest stride: measures channels and
        checks that the declared strides are the ones the network really has."""
        side = 2 * 2 ** max(self.levels)
        with torch.no_grad():
            maps = self._forward(torch.zeros(1, 3, side, side, device=self.device), need_head=True)
        for lvl, t in zip(self.levels, maps["fpn"]):
            if t.shape[-1] * 2**lvl != side:
                raise TeacherError(
                    f"{self.identity.name}: neck output declared at stride {2**lvl} measures stride "
                    f"{side / t.shape[-1]:g}; the head's strides do not match the neck in this config"
                )
        head = self.head
        anchors = list(head.prior_generator.num_base_priors)
        num_anchors = int(anchors[0]) if len(set(anchors)) == 1 else 1
        num_classes = int(getattr(head, "num_classes", 0))
        kinds = {
            "fpn": "feature",
            "cls": "logits",
            "box": "deltas",
            "ctr": "logits",
            "rpn_obj": "objectness",
            "rpn_box": "deltas",
        }
        specs = {}
        for name, tensors in maps.items():
            chans = {int(t.shape[1]) for t in tensors}
            if len(chans) != 1:
                raise TeacherError(
                    f"{self.identity.name}: output {name} has different channels per level {sorted(chans)}; not "
                    "storable"
                )
            is_pred = name != "fpn"
            coder = type(getattr(head, "bbox_coder", None)).__name__
            mirror = _BOX_MIRROR.get(coder, NONE) if kinds[name] == "deltas" else ""
            specs[name] = OutputSpec(
                name=name,
                kind=kinds[name],
                levels=self.levels,
                channels=chans.pop(),
                num_anchors=num_anchors if is_pred else 1,
                num_classes=num_classes if name == "cls" else 0,
                mirror=mirror,
            )
        return specs


@contextlib.contextmanager
def _quiet_mmengine() -> Iterator[None]:
    """mmengine logs every parameter's init at INFO; a cache build wants warnings only."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _weights_path(weights: str) -> Path | None:
    """The checkpoint file ``weights`` names (None for ``none``); TeacherError for ``default`` or a missing file."""
    if weights == "default":
        raise TeacherError(
            "mmdet teachers have no 'default' weights here (mtpd never downloads): download the checkpoint "
            "from mmdet's model zoo yourself and pass its path as weights, or use 'none' for random weights"
        )
    wpath = None if weights == "none" else Path(weights).expanduser().resolve()
    if wpath is not None and not wpath.is_file():
        raise TeacherError(
            f"checkpoint {weights} not found: pass a local mmdet .pth file, or 'none' for random weights"
        )
    return wpath


def _build_model(registry, cfg, path: Path, wpath: Path | None) -> nn.Module:
    # `none` weights come from a fixed seed, so every Ray worker of one build holds
    # the same random teacher; fork_rng keeps the caller's RNG stream untouched.
    with _quiet_mmengine(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        try:
            model = registry.build(cfg.model)
        except Exception as exc:  # registry errors wrap the real cause in a long chain
            raise TeacherError(f"cannot build the model of mmdet config {path}: {one_line(exc)}") from exc
        if wpath is None:
            model.init_weights()  # mmdet's own init (e.g. focal-loss bias prior); pretrained entries were removed
        else:
            load_weights(model, wpath)
    return model


def build_mmdet_teacher(
    config: str,
    weights: str = "none",
    num_classes: int | None = None,
    device: str = "cpu",
    *,
    view_mean: Triple = IMAGENET_MEAN,
    view_std: Triple = IMAGENET_STD,
    cfg_options: dict[str, Any] | None = None,
) -> MMDetTeacher | MMDetDETRTeacher:
    """Build an mmdet detector as a teacher in eval mode on ``device``.

    ``config``: a config file, or the name of a config bundled with mmdet.
    ``weights``: a local mmdet checkpoint (``{"state_dict", "meta"}``) or ``none``
    (mmdet's random init, seeded with ``INIT_SEED`` so rebuilds agree).
    ``num_classes`` overrides the config's class count (``bbox_head``, RoI heads).
    ``view_mean``/``view_std``: the normalisation of the views fed in (the view
    spec's); inputs are converted to the model's own data_preprocessor settings.
    ``cfg_options``: mmengine dotted-key overrides (``{"model.backbone.depth": 18}``),
    part of the teacher's identity through the resolved config digest.
    """
    wpath = _weights_path(weights)
    try:
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    except ImportError as exc:
        raise TeacherError(
            f"mmdet is not importable ({exc}): `pip install 'mtpd[mmdet]'` or `make install-mmdet`"
        ) from exc

    path = resolve_config(config)
    cfg = load_model_config(path, num_classes, cfg_options, config)
    register_all_modules(init_default_scope=True)
    model = _build_model(MODELS, cfg, path, wpath)

    model_cfg = cfg.model.to_dict()
    conversion = input_conversion(model_cfg.get("data_preprocessor"), tuple(view_mean), tuple(view_std))
    identity = TeacherIdentity(
        name="mmdet:" + config,
        config=config_digest(model_cfg),
        weights=str(weights) if wpath is None else str(wpath),
        weights_sha256="" if wpath is None else sha256_file(wpath),
        extra={
            "model": type(model).__name__,
            "input": conversion.describe(),
            **({"init_seed": INIT_SEED} if wpath is None else {}),
        },
    )
    # DETR family: neck maps and encoder memory only (the queries' predictions are not cacheable)
    cls = MMDetDETRTeacher if is_detr(model) else MMDetTeacher
    return cls(model, identity, conversion, device=device)
