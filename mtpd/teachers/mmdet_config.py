"""Reading mmdet configs and checkpoints for the mmdet teacher adapter, offline.

A config is a file path or the name of one of mmdet's bundled configs
(``mmdet/.mim/configs``); pretrained-backbone entries are stripped so building
a model never downloads. Checkpoints are local ``.pth`` files, loaded strictly:
every mismatch becomes one ``TeacherError`` line naming the file.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtpd import checkpoint
from mtpd.teachers.base import TeacherError


def one_line(exc: BaseException) -> str:
    """mmengine and torch errors span lines; ours are one line, the traceback keeps the rest."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}{'…' if len(text) > 400 else ''}"


def configs_root() -> Path:
    """Where mmdet keeps its bundled configs (``mmdet/.mim/configs`` in a wheel install)."""
    spec = importlib.util.find_spec("mmdet")
    if spec is None or spec.origin is None:
        raise TeacherError("mmdet is not installed: `pip install 'mtpd[mmdet]'` (or `make install-mmdet`)")
    pkg = Path(spec.origin).parent
    for cand in (pkg / ".mim" / "configs", pkg.parent / "configs"):  # wheel, then source checkout
        if cand.is_dir():
            return cand
    return pkg / ".mim" / "configs"


def resolve_config(config: str) -> Path:
    """A config file path, or a bundled config name (``retinanet_r50_fpn_1x_coco``,
    optionally with its folder ``retinanet/...`` or ``.py``) -> the file."""
    path = Path(config).expanduser()
    if path.is_file():
        return path.resolve()
    root = configs_root()
    rel = config if config.endswith(".py") else config + ".py"
    if "/" in rel and (root / rel).is_file():
        return (root / rel).resolve()
    stem = Path(rel).stem
    found = sorted(root.rglob(f"{stem}.py")) if root.is_dir() else []
    # `_base_` fragments share names with nothing users mean; prefer full configs.
    full = [p for p in found if "_base_" not in p.relative_to(root).parts]
    found = full or found
    if len(found) == 1:
        return found[0].resolve()
    if len(found) > 1:
        opts = ", ".join(str(p.relative_to(root).with_suffix("")) for p in found)
        raise TeacherError(f"mmdet config name {config!r} is ambiguous under {root}: pass one of {opts}")
    names = sorted({p.stem for p in root.rglob("*.py")}) if root.is_dir() else []
    close = difflib.get_close_matches(stem, names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise TeacherError(
        f"mmdet config {config!r} is neither a file nor a config bundled with mmdet (looked in {root}){hint}; "
        "pass a path to a config file or one of the bundled names"
    )


def _strip_pretrained(node: Any) -> Any:
    """Drop every ``pretrained=`` and ``init_cfg=dict(type='Pretrained')`` so that
    building or initialising the model never downloads ImageNet weights."""
    if isinstance(node, dict):
        out = {}
        for key, val in node.items():
            if key == "pretrained":
                continue
            if key == "init_cfg":
                val = _drop_pretrained_init(val)
            out[key] = _strip_pretrained(val)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_strip_pretrained(v) for v in node)
    return node


def _drop_pretrained_init(init_cfg: Any) -> Any:
    if isinstance(init_cfg, dict):
        return None if init_cfg.get("type") == "Pretrained" else init_cfg
    if isinstance(init_cfg, (list, tuple)):
        kept = [c for c in init_cfg if not (isinstance(c, dict) and c.get("type") == "Pretrained")]
        return kept or None
    return init_cfg


def _set_num_classes(model_cfg: dict, num_classes: int, config: str) -> None:
    """Set the class count everywhere a detector predicts classes (not the RPN: it has one)."""
    heads: list[dict] = []
    if isinstance(model_cfg.get("bbox_head"), dict):
        heads.append(model_cfg["bbox_head"])
    roi = model_cfg.get("roi_head")
    if isinstance(roi, dict):
        for key in ("bbox_head", "mask_head"):
            sub = roi.get(key)
            heads.extend(sub if isinstance(sub, (list, tuple)) else [sub] if isinstance(sub, dict) else [])
    heads = [h for h in heads if "num_classes" in h]
    if not heads:
        raise TeacherError(f"mmdet config {config!r} has no head with num_classes to override: leave num_classes unset")
    for head in heads:
        head["num_classes"] = int(num_classes)


def load_model_config(path: Path, num_classes: int | None, cfg_options: dict | None, config: str):
    """Read a config, apply ``cfg_options`` (mmengine dotted keys, as ``--cfg-options``)
    and ``num_classes``, and make it download-free. Returns the mmengine ``Config``."""
    from mmengine.config import Config, ConfigDict

    try:
        cfg = Config.fromfile(str(path))
    except Exception as exc:  # mmengine raises many types for syntax/base errors
        raise TeacherError(f"cannot read mmdet config {path}: {one_line(exc)}") from exc
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    if "model" not in cfg:
        raise TeacherError(
            f"mmdet config {path} has no `model` section: pass a detector config, not a dataset or schedule"
        )
    model_cfg = _strip_pretrained(cfg.model.to_dict())
    if num_classes is not None:
        _set_num_classes(model_cfg, num_classes, config)
    cfg.model = ConfigDict(model_cfg)
    return cfg


def config_digest(model_cfg: dict) -> str:
    """sha256 of the resolved model section: what decides the outputs (data and schedule do not)."""
    text = json.dumps(model_cfg, sort_keys=True, default=repr)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- weights


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    # Full mmengine training checkpoints pickle numpy values and log buffers in `meta`/`message_hub`:
    # checkpoint.load rebuilds those from its allow-list, as data.
    ckpt = checkpoint.load(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise TeacherError(
            f"checkpoint {path} is not an mmdet checkpoint: expected {{'state_dict': {{name: tensor}}, 'meta': ...}}"
        )
    # Checkpoints saved from DistributedDataParallel carry a `module.` prefix.
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_weights(model: nn.Module, path: Path) -> None:
    """Load an mmdet checkpoint strictly; every mismatch becomes one TeacherError line."""
    state = _read_checkpoint(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the checkpoint, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise TeacherError(
            f"checkpoint {path} does not fit the model: {'; '.join(parts)}. Pass the config the checkpoint was "
            "trained with (a class-count difference shows up in the *cls* layers: set num_classes to match)"
        )
    model.load_state_dict(state, strict=False)
