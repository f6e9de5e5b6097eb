"""A study's splits: ``val`` (the base plan's own data), ``dev`` (carved from the train set), and ``--quick``'s cut
of either. Carved and cut annotation files go under the split's working folder."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mtpd.study.spec import Study, StudyError

Log = Callable[[str], None]


@dataclass
class Split:
    """Where the rows of one split train and evaluate."""

    name: str  # val, dev, quick-val, quick-dev
    root: Path  # the split's working folder
    data: dict[str, str]  # the plan's data paths for this split (train_ann ... val_images)


def split_data(study: Study, split: str, quick: bool, log: Log) -> Split:
    """The split's data: ``val``, the base plan's own; ``dev``, the train set less the study's dev images, which
    become the val set; ``quick``, the first images of either."""
    base = study.base().data
    name = f"quick-{split}" if quick else split
    root = study.out_dir() / name
    data = {"train_ann": base.train_ann, "train_images": base.train_images}
    data |= {"val_ann": base.val_ann or "", "val_images": base.val_images or ""}
    if split == "dev":
        if study.dev is None:
            raise StudyError(f"{study.path}: --split dev needs a dev: {{images: N}} entry in the study file")
        dev = study.dev
        data["train_ann"], data["val_ann"] = carve_dev(Path(base.train_ann), dev.images, dev.seed, dev.digest, root)
        data["val_images"] = base.train_images
    elif not (base.val_ann and base.val_images):
        raise StudyError(f"{study.plan}: data.val_ann and data.val_images: a study evaluates every run; set them")
    if quick:
        data["train_ann"] = str(first_images(Path(data["train_ann"]), study.quick.images, root / "data" / "train.json"))
        data["val_ann"] = str(first_images(Path(data["val_ann"]), study.quick.images, root / "data" / "val.json"))
    if split == "dev" or quick:  # files this study wrote; the plan's own (COCO's is 450 MB) are not read to count
        log(f"split {name}: train {_count(data['train_ann'])} images, evaluate on {_count(data['val_ann'])}")
    else:
        log(f"split {name}: the base plan's train and val sets")
    return Split(name, root, data)


def _count(ann: str) -> int:
    return len(json.loads(Path(ann).read_text())["images"])


def _subset(coco: dict, ids: set[int]) -> dict:
    return {
        **coco,
        "images": [im for im in coco["images"] if im["id"] in ids],
        "annotations": [a for a in coco.get("annotations", []) if a["image_id"] in ids],
    }


def _write_json(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


def carve_dev(train_ann: Path, n: int, seed: int, digest: str, root: Path) -> tuple[str, str]:
    """Annotation files of ``train_ann`` less ``n`` images, and of those ``n``: the first by the hash of
    ``dev<seed>:<file name>``, so the carve depends on neither the file's order nor the machine."""
    coco = json.loads(train_ann.read_text())
    ids = sorted(im["id"] for im in coco["images"])
    if not 0 < n < len(ids):
        raise StudyError(f"dev.images: {n} of {train_ann}'s {len(ids)} images; choose 1 to {len(ids) - 1}")
    if digest not in hashlib.algorithms_available:
        raise StudyError(f"dev.digest: {digest!r} is not a hash this Python has (e.g. sha256, sha1)")
    key = lambda im: hashlib.new(digest, f"dev{seed}:{im['file_name']}".encode()).hexdigest()  # noqa: E731
    dev = {im["id"] for im in sorted(coco["images"], key=key)[:n]}
    out = root / "data"
    rest = _write_json(_subset(coco, set(ids) - dev), out / "train_minus_dev.json")
    return str(rest), str(_write_json(_subset(coco, dev), out / "dev.json"))


def first_images(ann: Path, n: int, out: Path) -> Path:
    """``ann`` cut to its first ``n`` images (by id)."""
    coco = json.loads(ann.read_text())
    keep = set(sorted(im["id"] for im in coco["images"])[:n])
    return _write_json(_subset(coco, keep), out)
