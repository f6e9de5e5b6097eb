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

from mtpd.cache.build import build_store
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
    CocoDataset(ann, images)  # the whole file is valid before anything runs
    sizes: list[int] = []
    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mtpd-estimate-") as tmp:
        sub, total = _subset(ann, max(2, sample), seed, Path(tmp) / "sample.json")

        def on_shard(shard: int, nbytes: int) -> None:
            sizes.append(nbytes)
            stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        store = Path(tmp) / "store"
        build_store(
            teacher,
            str(sub),
            images,
            str(store),
            views=views,
            outputs=outputs,
            precision=precision,
            workers=0,
            images_per_shard=1,
            batch_size=batch_size,
            progress=False,
            on_shard=on_shard,
        )
        fixed = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) - sum(sizes)
    # The first image also pays for loading the teacher and warming up: time the others.
    times = [b - a for a, b in zip(stamps, stamps[1:])] or [stamps[0] - t0]

    def sd(xs: list[float]) -> float:  # the sample's standard deviation, not the population's
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    return Estimate(
        total,
        len(sizes),
        statistics.fmean(sizes),
        sd(sizes),
        statistics.fmean(times),
        sd(times),
        teacher.device,
        max(0, fixed),
        len(times),
    )
