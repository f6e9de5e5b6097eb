"""Shared helpers of the benchmarks: data, interleaved timing, memory, tables, RESULTS.md.

Every benchmark prints ratios of runs interleaved in one process tree: this
machine is shared (2 cores, other jobs training), so absolute times move from
minute to minute while ratios of runs taken side by side hold.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
REPO = BENCH_DIR.parent


# --- data ------------------------------------------------------------------------------


def _write_coco(out: Path, name: str, images: list[dict], annotations: list[dict], categories: list[dict]) -> dict:
    ann = out / "annotations" / f"instances_{name}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return {"ann": str(ann), "images": str(out / "images" / name), "num_images": len(images)}


def natural_images(out: str | Path, n: int, height: int, width: int, seed: int = 0, num_classes: int = 10) -> dict:
    """A COCO-format set of natural-image-like pictures ("dead leaves" model).

    Occluding discs and rectangles with power-law sizes, smooth shading and
    fine texture: the model reproduces natural images' scale invariance, edge
    statistics and ~1/f spectrum, which plain noise or the digits set lack, so
    teacher features on it are closer to what a store holds for COCO. The last
    few shapes drawn are unoccluded and become the annotated objects.
    """
    from PIL import Image, ImageDraw, ImageFilter

    out = Path(out)
    img_dir = out / "images" / "natural"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    r_min, r_max = 4.0, 0.35 * min(height, width)
    for i in range(n):
        canvas = Image.new("RGB", (width, height), tuple(int(c) for c in rng.uniform(0, 255, 3)))
        draw = ImageDraw.Draw(canvas)
        shapes = int(120 * height * width / 512**2) + 40
        boxes = []
        for k in range(shapes):
            # Radii with density ∝ r^-3 (inverse CDF): many small leaves, few large ones.
            u = rng.random()
            r = 1.0 / math.sqrt(u / r_min**2 + (1 - u) / r_max**2)
            cx, cy = rng.uniform(-r, width + r), rng.uniform(-r, height + r)
            color = tuple(int(c) for c in np.clip(rng.normal(128, 60, 3), 0, 255))
            box = (cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r * rng.uniform(0.5, 1.5))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
            if k >= shapes - 5 and r > 12:
                x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
                if x1 - x0 > 4 and y1 - y0 > 4:
                    boxes.append((x0, y0, x1, y1))
        canvas = canvas.filter(ImageFilter.GaussianBlur(0.8))
        pix = np.asarray(canvas, dtype=np.float32)
        # Low-frequency shading plus pixel texture, as lighting and surfaces add.
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        shade = (
            25 * np.sin(xx / width * rng.uniform(1, 4) + rng.uniform(0, 6)) * np.cos(yy / height * rng.uniform(1, 4))
        )
        pix = pix + shade[..., None] + rng.normal(0, 4, pix.shape).astype(np.float32)
        Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8)).save(img_dir / f"{i:06d}.png", compress_level=1)
        images.append({"id": i + 1, "file_name": f"{i:06d}.png", "height": height, "width": width})
        for x0, y0, x1, y1 in boxes or [(0.25 * width, 0.25 * height, 0.5 * width, 0.5 * height)]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(num_classes)) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(num_classes)]
    return _write_coco(out, "natural", images, annotations, cats)


# Colour photographs that scikit-image ships inside its wheel (no download): (loader, file name).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")


def photo_images(out: str | Path, n: int, num_classes: int = 10) -> dict:
    """A COCO-format set of up to ``len(PHOTOS)`` real colour photographs from ``skimage.data``, at their own sizes
    (300x451 to 500x741). Each image gets one dummy box (its central half, class 1): the benchmarks
    read teacher outputs, not labels, and ``CocoDataset`` wants a valid instances file."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("the photos dataset needs scikit-image: .venv/bin/pip install scikit-image") from None
    from PIL import Image

    out = Path(out)
    img_dir = out / "images" / "photos"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, name in enumerate(PHOTOS[:n]):
        pix = getattr(skimage.data, name)()
        pix = pix[0] if isinstance(pix, tuple) else pix  # stereo_motorcycle: (left, right, disparity)
        h, w = pix.shape[:2]
        Image.fromarray(pix[..., :3]).save(img_dir / f"{name}.png", compress_level=1)
        images.append({"id": i + 1, "file_name": f"{name}.png", "height": h, "width": w})
        box = [w / 4, h / 4, w / 2, h / 2]
        annotations.append(
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": box, "area": w * h / 4, "iscrowd": 0}
        )
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(num_classes)]
    return _write_coco(out, "photos", images, annotations, cats)


def digits_images(out: str | Path, n: int, size: int, seed: int = 0) -> dict:
    """The project's digits set (train split), ``n`` square images of ``size`` px."""
    from mtpd.data.digits import make_digits

    return make_digits(out, train=n, val=0, size=size, seed=seed)["train"]


# --- timing and memory -------------------------------------------------------------------


def interleave(
    runs: dict[str, Callable[[], float | None]],
    rounds: int,
    log: Callable[[str], None] = print,
    deadline: float | None = None,
) -> dict[str, list[float]]:
    """Run every candidate once per round, rotating the order each round.

    A callable returns its own measured seconds (or None to be timed whole).
    Rotation keeps any "runs right after X" effect from favouring one candidate.
    ``deadline`` (a ``time.monotonic()`` value): no round starts that would,
    at the pace of the rounds so far, end after it; at least one round always runs.
    """
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    started = time.monotonic()
    for r in range(rounds):
        if r > 0 and deadline is not None and time.monotonic() + (time.monotonic() - started) / r > deadline:
            log(f"  stopping after {r} round(s): another would pass the time budget")
            break
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            got = runs[n]()
            times[n].append(float(got) if got is not None else time.perf_counter() - t0)
        log(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n}={times[n][-1]:.3g}s" for n in names))
    return times


@dataclass
class Ratio:
    """Ratio of two candidates from per-round pairs (runs taken minutes apart do not mix)."""

    median: float
    low: float
    high: float
    per_round: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        if len(self.per_round) <= 1 or self.low == self.high:
            return f"{self.median:.3f}"
        return f"{self.median:.3f} [{self.low:.3f}–{self.high:.3f}]"


def ratio(num: Sequence[float], den: Sequence[float]) -> Ratio:
    pairs = [a / b for a, b in zip(num, den) if b > 0]
    if not pairs:
        return Ratio(float("nan"), float("nan"), float("nan"))
    return Ratio(statistics.median(pairs), min(pairs), max(pairs), pairs)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _status_kib(key: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_mib(pid: int | str = "self") -> float:
    """Peak resident memory (VmHWM) of a process, MiB."""
    return _status_kib("VmHWM", pid) / 1024


def rss_mib(pid: int | str = "self") -> float:
    return _status_kib("VmRSS", pid) / 1024


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux clear_refs 5), so a peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def set_threads(n: int) -> None:
    """Pin torch's and BLAS's intra-op threads: the same for every candidate of a run."""
    import torch

    torch.set_num_threads(max(1, n))


# --- tables and RESULTS.md -----------------------------------------------------------------


def fmt(x: object, digits: int = 3) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if x != 0 and (abs(x) >= 10**5 or abs(x) < 10 ** -(digits - 1)):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"
    return str(x)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table; floats to 3 significant digits."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(r) for r in cells])


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process (all its threads), from /proc: a benchmark's CPU-seconds of a worker."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CycleSampler:
    """Indices 0..n-1 over and over, ``length`` in all: one loader iterator lasts a whole benchmark (a new
    epoch would respawn the DataLoader's workers, which is not what a step or a read costs)."""

    def __init__(self, n: int, length: int) -> None:
        self.n, self.length = n, length

    def __iter__(self):
        return (i % self.n for i in range(self.length))

    def __len__(self) -> int:
        return self.length


def machine() -> str:
    import torch

    load = os.getloadavg()
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared; load average {load[0]:.1f} at the end of the run), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, no GPU"
    )


def repo_path(value: str) -> str:
    """``value`` relative to the repository when it is an absolute path inside it: recorded results name no
    folder of the machine they ran on."""
    p = Path(value)
    if p.is_absolute() and p.is_relative_to(REPO):
        return str(p.relative_to(REPO))
    return value


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run (``argv`` None: this process's own arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([".venv/bin/python", f"bench/{script}"] + [shlex.quote(repo_path(a)) for a in args])


def write_section(title: str, body: str, key: str | None = None, path: Path = RESULTS) -> None:
    """Replace section ``## title`` of RESULTS.md (or its ``### key`` block) and nothing else: the writer
    ``mtpd-study --write`` uses."""
    from mtpd.study.report import write_section as write

    write(path, title, body, key)


def report(
    title: str,
    key: str | None,
    script: str,
    argv: Sequence[str],
    body: str,
    write: bool,
    log: Callable[[str], None] = print,
) -> str:
    """Print a benchmark's result and (unless ``write`` is false) put it in RESULTS.md."""
    full = (
        f"Command: `{command_line(script, argv)}`  \nMachine: {machine()}; {time.strftime('%Y-%m-%d %H:%M')}\n\n{body}"
    )
    log("\n" + full)
    if write:
        write_section(title, full, key)
        log(f"\n(written to {RESULTS.relative_to(REPO)}, section '{title}'{f' / {key}' if key else ''})")
    return full


# --- stores ----------------------------------------------------------------------------------


def build_stores(
    teacher_name: str,
    ann: str,
    images: str,
    stores: dict[str, tuple[str, list[str]]],
    views,
    num_classes: int,
    batch_size: int = 1,
    images_per_shard: int = 4,
    weights: str = "none",
    keep_raw: bool = False,
):
    """Several stores from one teacher pass, fresh, through the product's ``build_stores`` in this process:
    ``stores`` maps an output path to (precision, outputs); every store holds the union of the outputs.

    Returns (seconds of the teacher pass, CPU-seconds of encode + write per store (all threads of this process:
    what a build worker's host cores spend), raw outputs per shard if ``keep_raw``: shard -> [(sample,
    {"fpn.p3": [C, H, W] float32, ...})]).
    """
    import shutil

    from mtpd.cache.build import build_stores as product_build_stores
    from mtpd.teachers.registry import TeacherSpec

    outputs = sorted({o for _, outs in stores.values() for o in outs})
    for out in stores:
        shutil.rmtree(out, ignore_errors=True)  # a fresh store each run, as a benchmark wants (no resume)
    raws: dict = {}
    reports = product_build_stores(
        TeacherSpec(teacher_name, weights, num_classes),
        ann,
        images,
        [precision for precision, _ in stores.values()],
        list(stores),
        views=views,
        outputs=outputs,
        batch_size=batch_size,
        images_per_shard=images_per_shard,
        workers=0,
        progress=False,
        on_raw=(lambda shard, raw: raws.__setitem__(shard, raw)) if keep_raw else None,
    )
    return reports[0].teacher_seconds, {r.store: r.encode_cpu_seconds for r in reports}, raws


def build_store_local(
    teacher_name: str,
    ann: str,
    images: str,
    out: str,
    views,
    outputs: list[str],
    precision: str,
    batch_size: int = 1,
    images_per_shard: int = 4,
    weights: str = "none",
    num_classes: int | None = None,
) -> float:
    """One store through the product's own ``build_store`` in this process (no Ray: ``workers=0``), with its
    writer lock, calibration and flip measurement; returns the seconds spent."""
    from mtpd.cache.build import build_store
    from mtpd.teachers.registry import TeacherSpec

    t0 = time.perf_counter()
    build_store(
        TeacherSpec(teacher_name, weights, num_classes),
        ann,
        images,
        out,
        views=views,
        outputs=list(outputs),
        precision=precision,
        batch_size=batch_size,
        images_per_shard=images_per_shard,
        workers=0,
        progress=False,
    )
    return time.perf_counter() - t0
