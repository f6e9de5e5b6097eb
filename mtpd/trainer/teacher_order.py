"""Teacher ordering by measurement: how far a student's features are from each cached teacher.

MTPD orders teachers weaker to stronger by hand. Here the gap is measured on
a calibration subset: per FPN level, linear CKA (Kornblith et al., ICML 2019)
between the student's and the teacher's features over valid cells, which
needs no adapter when channel counts differ. Distance = 1 − mean CKA; the
nearest teacher comes first, so each stage's gap is as small as possible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtpd.cache.store import StoreReader
from mtpd.data import CocoDataset, ViewSpec
from mtpd.models import output_specs
from mtpd.models.detect import detector_forward
from mtpd.trainer.plan import Plan, PlanError
from mtpd.trainer.sources import StoreTargets
from mtpd.trainer.store_refs import stage_stores
from mtpd.trainer.targets import DistillDataset, check_store, make_loader


@dataclass
class TeacherDistance:
    store: str
    teacher: str
    weights: str  # the teacher's weights file (or none/default): one factory may have several stores
    distance: float  # 1 - mean linear CKA over levels
    cka: dict[int, float]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between [N, Cx] and [N, Cy] (rows: the same cells)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    num = (y.T @ x).pow(2).sum()
    den = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(num / den) if den > 0 else 0.0


@torch.no_grad()
def measure(
    student: nn.Module,
    stores: list[str],
    dataset: CocoDataset,
    n_images: int = 64,
    batch_size: int = 8,
    device: str = "cpu",
) -> list[TeacherDistance]:
    """Distances of ``student`` to each store's teacher on the first ``n_images`` images; nearest first."""
    student.eval().to(device)
    levels = output_specs(student)["fpn"].levels
    results = []
    for path in stores:
        reader = StoreReader(path)
        spec = ViewSpec.from_dict(reader.header.views)
        spec = ViewSpec(short=spec.short, long=spec.long, pad=spec.pad, mean=spec.mean, std=spec.std)
        check_store(reader, dataset, spec)
        ds = DistillDataset(dataset, spec, [reader], outputs=[["fpn"]])
        loader = make_loader(ds, batch_size, shuffle=False, workers=0, seed=0)
        xs: dict[int, list[Tensor]] = {lvl: [] for lvl in levels}
        ys: dict[int, list[Tensor]] = {lvl: [] for lvl in levels}
        seen = 0
        for batch in loader:
            teacher = StoreTargets(ds.feeds)(batch.to(device))[0][0]  # decoded as the trainer decodes them
            out = detector_forward(
                student, batch.images.to(device), batch.image_sizes, None, names=("fpn",), detect=False
            )
            for lvl in levels:
                key = f"fpn.p{lvl}"
                if key not in teacher:
                    continue
                m = batch.masks[lvl].to(device).bool().flatten()  # [B*H*W] valid cells
                s = out.outputs[key].permute(0, 2, 3, 1).reshape(-1, out.outputs[key].shape[1])[m]
                t = teacher[key].permute(0, 2, 3, 1).reshape(-1, teacher[key].shape[1])[m]
                xs[lvl].append(s.cpu())
                ys[lvl].append(t.cpu())
            seen += len(batch.image_ids)
            if seen >= n_images:
                break
        cka = {lvl: linear_cka(torch.cat(xs[lvl]), torch.cat(ys[lvl])) for lvl in levels if xs[lvl]}
        dist = 1.0 - sum(cka.values()) / max(len(cka), 1)
        t = reader.header.teacher
        results.append(TeacherDistance(path, t.get("name", "?"), str(t.get("weights", "?")), dist, cka))
    return sorted(results, key=lambda r: r.distance)


def _single_store(plan: Plan) -> dict[int, str]:
    """Stage index -> its one store (listed, or its named teacher's store under the cache root)."""
    out = {}
    for i, s in enumerate(plan.stages):
        stores = stage_stores(plan, s)
        if len(stores) == 1:
            out[i] = stores[0]
    return out


def reorder_plan(plan: Plan, order: list[str]) -> Plan:
    """``plan`` with its single-store stages in ``order`` (store paths, nearest first); other stages keep
    their place. Weight inheritance belongs to the first stage: it moves with the order."""
    single = {i: os.path.realpath(p) for i, p in _single_store(plan).items()}
    order = [os.path.realpath(p) if "://" not in p else p for p in order]
    ranked = [i for i, store in single.items() if store in order]
    if len(ranked) != len(order):
        raise PlanError("every ranked store must be the only store of exactly one stage of the plan")
    it = iter(sorted(ranked, key=lambda i: order.index(single[i])))
    stages = [plan.stages[next(it)] if i in ranked else s for i, s in enumerate(plan.stages)]
    inherit = next((s.inherit for s in plan.stages if s.inherit is not None), None)
    for s in stages:
        s.inherit = None
    stages[0].inherit = inherit
    plan.stages = stages
    return plan


def order_plan(
    plan: Plan, student: nn.Module, n_images: int = 64, device: str = "cpu"
) -> tuple[Plan, list[TeacherDistance]]:
    """Measure ``student`` against every single-store stage's teacher on the plan's train data and
    return the plan with those stages nearest-first (MTPD's weak-to-strong order, measured)."""
    stores = list(_single_store(plan).values())
    dataset = CocoDataset(plan.data.train_ann, plan.data.train_images)
    res = measure(student, stores, dataset, n_images, device=device)
    return reorder_plan(plan, [r.store for r in res]), res
