"""Fuzzed inputs: the plan loader, the COCO JSON loader and the store header reader take arbitrary
bytes and shapes and answer with their own one-line error (an MtpdError), never another exception."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mtpd.errors import MtpdError

# JSON-like values of any shape.
LEAVES = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
VALUES = st.recursive(
    LEAVES,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mutations(base: dict) -> st.SearchStrategy[dict]:
    """``base`` with one key path replaced by an arbitrary value, deleted, or a stray key added."""
    paths: list[tuple] = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + (k,))
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append(path + (i,))
                walk(v, path + (i,))

    walk(base, ())

    def apply(args):
        path, value, how = args
        out = copy.deepcopy(base)
        parent = out
        for k in path[:-1]:
            parent = parent[k]
        if how == "delete" and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif how == "stray" and isinstance(parent, dict):
            parent["zz_stray"] = value
        else:
            parent[path[-1]] = value
        return out

    return st.tuples(st.sampled_from(paths), VALUES, st.sampled_from(["replace", "delete", "stray"])).map(apply)


def _only_mtpd_errors(fn, *args) -> None:
    try:
        fn(*args)
    except MtpdError as e:
        assert "\n" not in str(e).strip(), str(e)


# -- plans ---------------------------------------------------------------------------------------
PLAN = {
    "output_dir": "runs/x",
    "seed": 0,
    "student": {"arch": "retinanet_tiny", "init": "none", "options": {"width": 8}},
    "data": {"train_ann": "a.json", "train_images": "img", "short": 64, "long": 64, "flip": True, "batch_size": 2},
    "stages": [
        {
            "name": "s",
            "stores": ["st"],
            "losses": [{"name": "mgd", "weight": 1.0, "params": {}}],
            "epochs": 1,
            "optimizer": {"type": "sgd", "lr": 0.01},
            "schedule": {"steps": [0.5]},
        }
    ],
}


def _load_plan_text(data: bytes) -> None:
    from mtpd.trainer.plan import load_plan

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "plan.yaml"
        p.write_bytes(data)
        load_plan(p)


@SETTINGS
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(b"?")  # {None: None}: a key that is not a string
@example(b"1: a\nb: c")  # keys of two types, which do not sort together
def test_plan_loader_on_arbitrary_bytes(data: bytes) -> None:
    _only_mtpd_errors(_load_plan_text, data)


@SETTINGS
@given(_mutations(PLAN))
def test_plan_loader_on_mutated_plans(plan: dict) -> None:
    _only_mtpd_errors(_load_plan_text, yaml.safe_dump(plan, allow_unicode=True).encode())


# -- COCO annotation files ------------------------------------------------------------------------
COCO = {
    "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
    "annotations": [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "bbox": [1, 1, 4, 4],
            "area": 16,
            "iscrowd": 0,
            "segmentation": [[1, 1, 5, 1, 5, 5]],
        }
    ],
    "categories": [{"id": 3, "name": "c"}],
}


def _load_coco(doc: object, raw: bytes | None = None) -> None:
    from mtpd.data import CocoDataset

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "ann.json"
        p.write_bytes(raw if raw is not None else json.dumps(doc).encode())
        ds = CocoDataset(p, d)
        for i in range(len(ds)):
            ds.annotations(i)
        ds.manifest_hash()


@SETTINGS
@given(_mutations(COCO))
def test_coco_loader_on_mutated_files(doc: dict) -> None:
    _only_mtpd_errors(_load_coco, doc)


@SETTINGS
@given(VALUES | st.binary(max_size=100))
def test_coco_loader_on_arbitrary_content(doc) -> None:
    _only_mtpd_errors(_load_coco, doc, doc if isinstance(doc, bytes) else None)


# -- store headers --------------------------------------------------------------------------------
def _header_attrs() -> dict:
    return {
        "mtpd_format": 1,
        "created_by": "mtpd",
        "teacher": {"name": "retinanet_tiny", "config": "{}", "weights": "none", "weights_sha256": "", "extra": {}},
        "views": {
            "short": 64,
            "long": 64,
            "pad": 32,
            "views": ["orig"],
            "mean": [0.4, 0.4, 0.4],
            "std": [0.2, 0.2, 0.2],
        },
        "dataset": {"manifest_sha256": "ab", "num_images": 1, "num_classes": 2, "ann_file": "a.json"},
        "precision": "lossless",
        "images_per_shard": 1,
        "levels": [3],
        "outputs": {
            "fpn": {
                "name": "fpn",
                "kind": "feature",
                "levels": [3],
                "strides": [8],
                "channels": 4,
                "num_anchors": 1,
                "num_classes": 0,
                "dtype": "float16",
                "encoding": "fp16",
                "keepbits": None,
                "l_max": 4,
                "codec": {},
            }
        },
    }


@settings(max_examples=60, deadline=None)
@given(_mutations(_header_attrs()))
def test_store_header_reader_on_mutated_attributes(attrs: dict) -> None:
    import numpy as np
    import zarr

    from mtpd.cache.store import StoreReader

    with tempfile.TemporaryDirectory() as d:
        root = zarr.open_group(zarr.storage.LocalStore(d), mode="w")
        idx = root.create_group("index")
        for name, data in (
            ("image_ids", np.array([1])),
            ("orig_size", np.array([[8, 8]])),
            ("view_size", np.array([[8, 8]])),
            ("grid", np.array([[[1, 1]]])),
        ):
            idx.create_array(name, data=data)
        root.create_group("outputs").create_array("fpn", shape=(1, 4, 4), dtype="float16")
        try:
            root.attrs.update(attrs)
        except (TypeError, ValueError):
            return  # not storable as JSON attributes: no store can hold it
        _only_mtpd_errors(StoreReader, d)
