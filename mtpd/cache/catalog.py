"""Stores under a cache root, found by identity: names, listing, use records, look-up, removal.

A store built without ``--out`` goes to ``ROOT/<teacher>-<dataset>-<hash>``, where the hash
covers the store's identity: teacher (name, config, weights sha256 or init seed), dataset
manifest, views, outputs with their encodings, precision, shard size and format version.
Building the same thing again finds it; anything different gets another name.

The root's ``.mtpd-catalog.json`` only caches what ``ls`` computed (sizes are a walk of
the folder): every entry is checked against its store's own metadata and recomputed when
that changed, and the file is rebuilt whenever missing or unreadable, so it never disagrees
with the disk. Readers need no lock; writes of use records and of the index are best effort
(a shared root may be read-only to most users).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from mtpd.cache.lock import WriterLock
from mtpd.cache.schema import StoreError, StoreHeader
from mtpd.cache.store import StoreReader
from mtpd.checkpoint import sha256_file
from mtpd.onnx_mapping import onnx_reference

INDEX = ".mtpd-catalog.json"
USES = "uses"  # one small JSON file per (run, stage) that read the store


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$MTPD_CACHE_ROOT``, else ``~/.cache/mtpd``: a local folder, as an absolute path."""
    given = str(root or os.environ.get("MTPD_CACHE_ROOT") or Path.home() / ".cache" / "mtpd")
    if "://" in given:
        raise StoreError(
            f"cache root {given}: a root is a local (or mounted shared) folder; for object storage "
            "build with --out URL and name stores in plans by path"
        )
    return Path(given).expanduser().resolve()


def identity(h: StoreHeader) -> dict:
    """What makes two stores the same: everything a student's targets depend on, and the layout."""
    t = h.teacher
    return {
        "format": h.format_version,
        "teacher": {
            "name": t.get("name"),
            "config": t.get("config", ""),
            "weights_sha256": t.get("weights_sha256", ""),
            "init_seed": (t.get("extra") or {}).get("init_seed"),
            # only when set, so that stores catalogued before AMP builds keep their names
            **({"amp": (t.get("extra") or {})["amp"]} if (t.get("extra") or {}).get("amp") else {}),
        },
        "dataset": h.dataset["manifest_sha256"],
        # only when recorded, so that stores catalogued before it keep their names
        **({"content": h.dataset["content_sha256"]} if h.dataset.get("content_sha256") else {}),
        "views": h.views,
        "precision": h.precision,
        "images_per_shard": h.images_per_shard,
        "outputs": {n: {**o.identity(), "dtype": o.code_dtype.name} for n, o in sorted(h.outputs.items())},
    }


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_.")[:limit] or "store"


def identity_digest(h: StoreHeader) -> str:
    return hashlib.sha256(json.dumps(identity(h), sort_keys=True).encode()).hexdigest()[:12]


def store_name(h: StoreHeader) -> str:
    return f"{_slug(str(h.teacher.get('name')))}-{_slug(Path(str(h.dataset['ann_file'])).stem)}-{identity_digest(h)}"


def store_path(root: Path, h: StoreHeader) -> Path:
    """Where the store of this identity lives under ``root``: an existing folder with the same identity (the
    readable prefix may differ, e.g. a renamed annotation file), else a new name."""
    digests = [identity_digest(h)]
    if h.dataset.get("content_sha256"):  # a store built before the content probe: its digest has none
        legacy = dataclasses.replace(h, dataset={k: v for k, v in h.dataset.items() if k != "content_sha256"})
        digests.append(identity_digest(legacy))
    for digest in digests:
        same = sorted(p for p in Path(root).glob(f"*-{digest}") if p.is_dir()) if Path(root).is_dir() else []
        if same:
            return same[0]
    return Path(root) / store_name(h)


# -- use records ----------------------------------------------------------------------------------
def record_use(store: str, run: str, stage: int, stage_name: str) -> bool:
    """Note that stage ``stage`` of run ``run`` read ``store`` (False where the store is read-only to us)."""
    if "://" in store:
        return False
    key = hashlib.sha1(f"{run}:{stage}".encode()).hexdigest()[:16]
    try:
        folder = Path(store) / USES
        folder.mkdir(exist_ok=True)
        (folder / f"{key}.json").write_text(
            json.dumps({"run": run, "stage": stage, "name": stage_name, "time": time.time()})
        )
        return True
    except OSError:
        return False


def uses(store: Path) -> list[dict]:
    out = []
    for f in sorted((store / USES).glob("*.json")) if (store / USES).is_dir() else []:
        try:
            rec = json.loads(f.read_text())
            out.append({"run": str(rec["run"]), "stage": rec.get("stage"), "time": float(rec["time"])})
        except (OSError, ValueError, TypeError, KeyError):
            continue  # a damaged record: the use is lost, the listing is not
    return out


# -- listing --------------------------------------------------------------------------------------
def _size(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except FileNotFoundError:  # a build renamed or replaced it meanwhile
            continue
    return total


def _signature(path: Path) -> list:
    """Changes whenever the store's metadata, shard progress or use records change (file stats only)."""

    def newest(folder: Path, pattern: str) -> list[int]:
        stamps = []
        for f in folder.glob(pattern) if folder.is_dir() else []:
            try:
                stamps.append(f.stat().st_mtime_ns)
            except FileNotFoundError:
                continue
        return [len(stamps), max(stamps, default=0)]

    return [
        (path / "zarr.json").stat().st_mtime_ns,
        *newest(path / "index" / "shards", "**/*"),
        *newest(path / USES, "*.json"),
    ]


def _row(path: Path, reader: StoreReader) -> dict:
    h = reader.header
    status = reader.status()
    done_images = sum(len(h.shard_images(s)) for s, d in enumerate(status.done) if d)
    used = uses(path)
    t = h.teacher
    return {
        "name": path.name,
        "path": str(path),
        "teacher": t.get("name"),
        "weights": t.get("weights"),
        "weights_sha256": t.get("weights_sha256", ""),
        "amp": (t.get("extra") or {}).get("amp") or "off",
        "dataset": h.dataset.get("ann_file"),
        "manifest_sha256": h.dataset.get("manifest_sha256"),
        "content_sha256": h.dataset.get("content_sha256", ""),
        "images_done": done_images,
        "images_total": h.num_images,
        "complete": bool(status.done.all()),
        "views": list(h.views["views"]),
        "view_spec": dict(h.views),
        "short": h.views["short"],
        "long": h.views["long"],
        "outputs": sorted(h.outputs),
        "precision": h.precision,
        "bytes": _size(path),
        "created": (path / "index").stat().st_ctime,
        "last_used": max((u["time"] for u in used), default=None),
        "runs": sorted({u["run"] for u in used}),
    }


def scan(root: Path) -> tuple[list[dict], list[str]]:
    """(stores under ``root``, other folders there), through the index, recomputing what changed.

    A cached row is used only for the folder it was computed for and only while its signature
    holds; paths always come from the folder itself, never from the index."""
    root = Path(root)
    try:
        index = json.loads((root / INDEX).read_text())
        index = index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        index = {}  # missing or unreadable: rebuilt from the stores themselves
    rows, foreign, fresh = [], [], {}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    for path in folders:
        try:
            sig = _signature(path)
            entry = index.get(path.name)
            row = entry.get("row") if isinstance(entry, dict) and entry.get("signature") == sig else None
            if not isinstance(row, dict) or row.get("name") != path.name:
                row = _row(path, StoreReader(str(path)))
        except Exception:  # noqa: BLE001 - not a store, a damaged one, or one removed meanwhile: listed as such
            foreign.append(path.name)
            continue
        row = {**row, "path": str(path)}
        rows.append(row)
        fresh[path.name] = {"signature": sig, "row": row}
    if fresh != index and root.is_dir():
        try:
            tmp = root / f"{INDEX}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, root / INDEX)
        except OSError:
            pass  # a read-only shared root: the listing is still right, only not cached
    return rows, foreign


# -- look-up by teacher ---------------------------------------------------------------------------
def teacher_reference(name: str, weights: str) -> tuple[str, str, str | None]:
    """(teacher name, weights, weights sha256 or None) as a store of teacher ``name`` with ``weights`` records
    them: a weights file by its sha256; an ONNX teacher (``onnx:MAPPING``) by its resolved mapping path and graph
    file (the graph holds the weights), read from the mapping file without loading the graph."""
    if name.startswith("onnx:"):
        ident, model = onnx_reference(name[len("onnx:") :])  # the mapping file alone: no teacher module
        return ident, str(model), sha256_file(model) if model.is_file() else None
    sha = sha256_file(weights) if weights not in ("none", "default") and Path(weights).is_file() else None
    return name, weights, sha


def find_store(
    root: Path,
    teacher: str,
    weights: str,
    weights_sha256: str | None,
    manifest_sha256: str,
    views: dict,
    outputs: list[str],
    precision: str,
    amp: str = "off",
    exact_views: bool = False,
    content_sha256: str = "",
) -> str | None:
    """The newest complete store under ``root`` with this teacher and weights (a file's sha256, or
    ``none`` / ``default`` by name), dataset, views (a ``ViewSpec.to_dict()``: sizes, padding,
    normalisation and at least these views; ``exact_views``: these views and no other, for a stage that must
    mirror its flips from the original view), precision, at least these outputs and this teacher precision
    (``amp``: an AMP store never stands in for an fp32 one) and, where both record it, the same image content
    (``CocoDataset.content_probe``: two sets listing the same file names in other folders differ); None if none."""
    best = None
    for row in scan(root)[0]:
        if not (
            row["teacher"] == teacher
            and row["complete"]
            and row["manifest_sha256"] == manifest_sha256
            and row["precision"] == precision
            and set(outputs) <= set(row["outputs"])
            and row.get("amp", "off") == amp
            and not (content_sha256 and row.get("content_sha256") and row["content_sha256"] != content_sha256)
        ):
            continue
        if weights_sha256 and row["weights_sha256"]:
            same_weights = row["weights_sha256"] == weights_sha256
        else:  # none / default by name; a factory that loads its own file records no sha: by path
            same_weights = str(row["weights"]) == str(weights)
        stored_views = row.get("view_spec") or {}
        have, want = set(stored_views.get("views", [])), set(views["views"])
        keys = ("short", "long", "pad", "mean", "std", "augment")  # augment: absent on both sides when unused
        same_views = all(stored_views.get(k) == views.get(k) for k in keys) and (
            have == want if exact_views else want <= have
        )
        if same_weights and same_views and (best is None or row["created"] > best["created"]):
            best = row
    return None if best is None else best["path"]


# -- removal --------------------------------------------------------------------------------------
def remove(path: Path) -> None:
    """Delete a store; StoreError (naming the writer) if a build holds its lock, or saying why it cannot.

    Under the lock the store is first renamed to a hidden folder, so a deletion that fails half-way
    leaves no half-store behind under its name (``ls`` skips hidden folders)."""
    try:
        with WriterLock(path):  # taking the lock proves no live build writes it; releasing removes the lock
            aside = path.with_name(f".{path.name}.deleting-{os.getpid()}")
            os.rename(path, aside)
        shutil.rmtree(aside)
    except OSError as e:
        raise StoreError(f"{path}: cannot remove it ({e.strerror or e}); check your permissions on the root") from None
