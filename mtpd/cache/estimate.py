"""How big a store will be and how long its build will take, from a sample, before the real build.

The teacher runs over ``sample`` images drawn (seeded) from the dataset, through the builder
itself (one image per shard, in this process), so each image's stored bytes and time are
measured as the real build would produce them. Both are projected to the whole dataset with
their spread: the standard deviation over the sample and a 95 % interval of the total.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtpd.cache.build import build_stores
from mtpd.cache.inspect import store_info
from mtpd.cache.store import open_store
from mtpd.data import CocoDataset, ViewSpec
from mtpd.teachers.registry import TeacherSpec


@dataclass
class Estimate:
    images: int  # in the whole dataset
    sample: int
    bytes_per_image: float
    bytes_per_image_std: float
    seconds_per_image: float
    seconds_per_image_std: float
    device: str
    fixed_bytes: int = 0  # metadata and index of the sample store (small next to the outputs at scale)
    timed: int = 1  # images timed (the first one also loads the teacher: left out)

    def total_bytes(self) -> tuple[float, float]:
        """(projected store bytes, half-width of its 95 % interval)."""
        half = 1.96 * self.bytes_per_image_std / math.sqrt(self.sample) * self.images
        return self.bytes_per_image * self.images + self.fixed_bytes, half

    def total_seconds(self, devices: int = 1) -> tuple[float, float]:
        mean = self.seconds_per_image * self.images / devices
        half = 1.96 * self.seconds_per_image_std / math.sqrt(self.timed) * self.images / devices
        return mean, half


def _subset(ann: str, n: int, seed: int, out: Path) -> tuple[Path, int]:
    """A COCO file of ``n`` images drawn without replacement (seeded); returns it and the full count."""
    data = json.loads(Path(ann).read_text())
    total = len(data["images"])
    keep = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)
    images = [data["images"][i] for i in sorted(keep)]
    ids = {im["id"] for im in images}
    sub = dict(data, images=images, annotations=[a for a in data["annotations"] if a.get("image_id") in ids])
    out.write_text(json.dumps(sub))
    return out, total


def estimate(
    teacher: TeacherSpec,
    ann: str,
    images: str,
    views: ViewSpec,
    outputs: list[str] | None,
    precision: str,
    sample: int = 16,
    seed: int = 0,
    batch_size: int = 2,
) -> Estimate:
    """Measure ``sample`` images through the builder and project size and time to the whole dataset."""
    return estimate_presets(teacher, ann, images, views, outputs, [precision], sample, seed, batch_size, False)[0].cost


@dataclass
class PresetEstimate:
    """One precision of ``estimate_presets``: its cost, bytes per image per output, and its error per output and
    level against ``lossless`` (relative RMSE over the sample's stored cells; 0 for lossless itself)."""

    precision: str
    cost: Estimate
    output_bytes: dict[str, float]
    error: dict[str, dict[int, float]]


def estimate_presets(
    teacher: TeacherSpec,
    ann: str,
    images: str,
    views: ViewSpec,
    outputs: list[str] | None,
    precisions: list[str],
    sample: int = 16,
    seed: int = 0,
    batch_size: int = 2,
    errors: bool = True,
) -> list[PresetEstimate]:
    """Every precision's store of the same ``sample`` images from one teacher pass (``build_stores``), with
    ``lossless`` added as the reference when ``errors`` asks for errors; one result per precision asked for.
    The time is the shared pass's (teacher and every encoder), the same for each."""
    CocoDataset(ann, images)  # the whole file is valid before anything runs
    wanted = list(precisions)
    built = wanted + (["lossless"] if errors and "lossless" not in wanted else [])
    with tempfile.TemporaryDirectory(prefix="mtpd-estimate-") as tmp:
        sub, total = _subset(ann, max(2, sample), seed, Path(tmp) / "sample.json")
        outs = [str(Path(tmp) / f"store{i}") for i in range(len(built))]
        t0 = time.perf_counter()
        reports = build_stores(
            teacher,
            str(sub),
            images,
            built,
            outs,
            views=views,
            outputs=outputs,
            workers=0,
            images_per_shard=1,
            batch_size=batch_size,
            progress=False,
        )
        stamps = [reports[0].shard_done_at[s] for s in sorted(reports[0].shard_done_at)]
        # The first image also pays for loading the teacher and warming up: time the others.
        times = [b - a for a, b in zip(stamps, stamps[1:])] or [stamps[0] - t0]
        ref = open_store(outs[built.index("lossless")]) if errors else None
        results = []
        for prec, out, rep in zip(wanted, outs, reports):
            sizes = [rep.shard_bytes[s] for s in sorted(rep.shard_bytes)]
            fixed = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) - sum(sizes)
            cost = Estimate(
                total,
                len(sizes),
                statistics.fmean(sizes),
                _sd(sizes),
                statistics.fmean(times),
                _sd(times),
                teacher.device,
                max(0, fixed),
                len(times),
            )
            info = store_info(out)
            per_output = {n: o["stored_bytes"] / max(1, info["images_total"]) for n, o in info["outputs"].items()}
            error = _errors(open_store(out), ref) if ref is not None else {}
            results.append(PresetEstimate(prec, cost, per_output, error))
    return results


def _sd(xs: list[float]) -> float:  # the sample's standard deviation, not the population's
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _errors(store, ref) -> dict[str, dict[int, float]]:
    """Relative RMSE of ``store``'s decoded maps against ``ref``'s, per output and level, over every sample."""
    num: dict[str, dict[int, float]] = {}
    den: dict[str, dict[int, float]] = {}
    for i in range(ref.num_samples):
        got, want = store.read(i), ref.read(i)
        for name, maps in want.items():
            levels = ref.header.outputs[name].levels
            for lvl, a, b in zip(levels, got[name], maps):
                num.setdefault(name, {}).setdefault(lvl, 0.0)
                den.setdefault(name, {}).setdefault(lvl, 0.0)
                num[name][lvl] += float(np.square(a.astype(np.float64) - b).sum())
                den[name][lvl] += float(np.square(b.astype(np.float64)).sum())
    return {n: {lvl: math.sqrt(num[n][lvl] / max(den[n][lvl], 1e-30)) for lvl in num[n]} for n in num}
