"""Distillation losses against plain reference computations of their formulas.

The references loop over levels, images, channels and boxes and slice each
image's valid region directly (never through ``batch.masks``), so they check
the masking as well as the arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtpd.trainer.losses import LOSSES, DistillBatch, build_loss, loss_defaults

LEVELS = (3, 4)
GRID = {3: (8, 8), 4: (4, 4)}  # padded grid per level (a 64x64 padded batch)
VALID = [{3: (8, 8), 4: (4, 4)}, {3: (5, 6), 4: (3, 3)}]  # image 1 is padded at the bottom and right
B, A, K = 2, 2, 3


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-7)


def masks() -> dict[int, torch.Tensor]:
    out = {}
    for lvl in LEVELS:
        m = torch.zeros(B, 1, *GRID[lvl])
        for b in range(B):
            h, w = VALID[b][lvl]
            m[b, :, :h, :w] = 1
        out[lvl] = m
    return out


def grid_anchors() -> torch.Tensor:
    """Square anchors, torchvision order: levels ascending, then (h, w, a)."""
    rows = []
    for lvl in LEVELS:
        s = 2**lvl
        for h in range(GRID[lvl][0]):
            for w in range(GRID[lvl][1]):
                for a in range(A):
                    cx, cy, half = (w + 0.5) * s, (h + 0.5) * s, s * (1.0 + 0.5 * a)
                    rows.append([cx - half, cy - half, cx + half, cy + half])
    return torch.tensor(rows)


def anchor_row(lvl: int, h: int, w: int, a: int) -> int:
    offset = sum(GRID[l][0] * GRID[l][1] * A for l in LEVELS if l < lvl)
    return offset + (h * GRID[lvl][1] + w) * A + a


def make_batch(cs: int = 4, ct: int = 6, seed: int = 0, same: bool = False) -> DistillBatch:
    """Random student (requires grad) and teacher (zero off the valid cells) on the padded grid."""
    g = torch.Generator().manual_seed(seed)
    m = masks()
    student, teacher = {}, {}
    for lvl in LEVELS:
        hw = GRID[lvl]
        teacher[f"fpn.p{lvl}"] = torch.randn(B, ct, *hw, generator=g) * m[lvl]
        teacher[f"cls.p{lvl}"] = 2 * torch.randn(B, A * K, *hw, generator=g) * m[lvl]
        if same:  # student equals teacher on valid cells, arbitrary on padding
            fs = teacher[f"fpn.p{lvl}"] + torch.randn(B, ct, *hw, generator=g) * (1 - m[lvl])
            ps = teacher[f"cls.p{lvl}"] + torch.randn(B, A * K, *hw, generator=g) * (1 - m[lvl])
        else:
            fs = torch.randn(B, cs, *hw, generator=g)
            ps = 2 * torch.randn(B, A * K, *hw, generator=g)
        student[f"fpn.p{lvl}"] = fs.requires_grad_()
        student[f"cls.p{lvl}"] = ps.requires_grad_()
    anchors = grid_anchors()
    # Ground truth: jittered copies of a few anchors, so some have IoU >= 0.5 and some do not.
    gt_boxes, gt_labels = [], []
    for b in range(B):
        rows = torch.randint(0, anchors.shape[0], (3,), generator=g)
        gt_boxes.append(anchors[rows] + torch.randn(3, 4, generator=g) * 2)
        gt_labels.append(torch.randint(0, K, (3,), generator=g))
    return DistillBatch(
        student=student,
        teacher=teacher,
        masks=m,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        anchors=anchors,
        num_anchors=A,
        num_classes=K,
        levels=LEVELS,
    )


def build(name: str, cs: int = 4, ct: int = 6, **params):
    torch.manual_seed(0)
    return build_loss(
        name, levels=LEVELS, student_channels=cs, teacher_channels=ct, num_anchors=A, num_classes=K, **params
    )


def conv1x1(x: torch.Tensor, conv) -> torch.Tensor:
    return x if isinstance(conv, torch.nn.Identity) else F.conv2d(x, conv.weight, conv.bias)


# ---------------------------------------------------------------- references


def ref_mgd(loss, batch: DistillBatch, seed: int, lam: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(())
    for lvl in LEVELS:
        keep = (torch.rand((B, 1, *GRID[lvl]), generator=g) >= lam).float()
        gen = loss.generation[f"p{lvl}"]
        for b in range(B):
            s = conv1x1(batch.student[f"fpn.p{lvl}"][b : b + 1], loss.align[f"p{lvl}"])
            x = F.conv2d(s * keep[b : b + 1], gen[0].weight, gen[0].bias, padding=1).relu()
            x = F.conv2d(x, gen[2].weight, gen[2].bias, padding=1)[0]
            h, w = VALID[b][lvl]
            total = total + ((x[:, :h, :w] - batch.teacher[f"fpn.p{lvl}"][b, :, :h, :w]) ** 2).sum()
    return total / B


def ref_mse(loss, batch: DistillBatch) -> torch.Tensor:
    total = torch.zeros(())
    for lvl in LEVELS:
        diffs = []
        for b in range(B):
            h, w = VALID[b][lvl]
            s = conv1x1(batch.student[f"fpn.p{lvl}"][b : b + 1], loss.adapters[f"p{lvl}"])[0]
            diffs.append(((s - batch.teacher[f"fpn.p{lvl}"][b])[:, :h, :w] ** 2).flatten())
        total = total + torch.cat(diffs).mean()
    return total


def ref_pkd(loss, batch: DistillBatch, eps: float = 1e-6) -> torch.Tensor:
    def norm(x: torch.Tensor) -> torch.Tensor:  # x: [C, h, w], one image's valid region
        return torch.stack([(c - c.mean()) / torch.sqrt(c.var(unbiased=False) + eps) for c in x])

    total = torch.zeros(())
    for lvl in LEVELS:
        diffs = []
        for b in range(B):
            h, w = VALID[b][lvl]
            s = conv1x1(batch.student[f"fpn.p{lvl}"][b : b + 1], loss.adapters[f"p{lvl}"])[0][:, :h, :w]
            t = batch.teacher[f"fpn.p{lvl}"][b, :, :h, :w]
            diffs.append(((norm(s) - norm(t)) ** 2).flatten())
        total = total + torch.cat(diffs).mean() / 2
    return total


def ref_cwd(loss, batch: DistillBatch, tau: float, target: str) -> torch.Tensor:
    total = torch.zeros(())
    for lvl in LEVELS:
        s_all = batch.student[f"{target}.p{lvl}"]
        if target == "fpn":
            s_all = conv1x1(s_all, loss.adapters[f"p{lvl}"])
        t_all = batch.teacher[f"{target}.p{lvl}"]
        c_count = t_all.shape[1]
        acc = torch.zeros(())
        for b in range(B):
            h, w = VALID[b][lvl]
            for c in range(c_count):
                p = torch.softmax(t_all[b, c, :h, :w].flatten() / tau, 0)
                q = torch.softmax(s_all[b, c, :h, :w].flatten() / tau, 0)
                acc = acc + (p * (p.log() - q.log())).sum()
        total = total + acc * tau**2 / (B * c_count)
    return total


def ref_kd(batch: DistillBatch, tau: float) -> torch.Tensor:
    terms = []
    for lvl in LEVELS:
        for b in range(B):
            h, w = VALID[b][lvl]
            p = torch.sigmoid(batch.teacher[f"cls.p{lvl}"][b, :, :h, :w] / tau).flatten()
            q = torch.sigmoid(batch.student[f"cls.p{lvl}"][b, :, :h, :w] / tau).flatten()
            terms.append(p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log())
    return torch.cat(terms).mean() * tau**2


def iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def ref_rm(batch: DistillBatch, thr: float = 0.5, low_quality: bool = True, temp: float = 1.0) -> torch.Tensor:
    """The formula with loops: each valid anchor to its best box at IoU >= thr; with ``low_quality``, then each
    box in order takes the valid anchors at its own highest IoU (mmdet's MaxIoUAssigner, min_pos_iou=0)."""
    anchors = batch.anchors.tolist()
    kls = []
    for b in range(B):
        boxes = batch.gt_boxes[b].tolist()
        owner: dict[tuple[int, int, int, int], int] = {}
        ious: dict[tuple[int, int, int, int], list[float]] = {}
        for lvl in LEVELS:
            vh, vw = VALID[b][lvl]
            for h in range(vh):
                for w in range(vw):
                    for a in range(A):
                        cell = (lvl, h, w, a)
                        ious[cell] = [iou(anchors[anchor_row(*cell)], box) for box in boxes]
                        if ious[cell] and max(ious[cell]) >= thr:
                            owner[cell] = ious[cell].index(max(ious[cell]))
        if low_quality:
            for m in range(len(boxes)):
                top = max((v[m] for v in ious.values()), default=0.0)
                if top > 0:
                    owner.update({cell: m for cell, v in ious.items() if v[m] == top})
        groups: dict[int, list[tuple[int, int, int, int]]] = {}
        for cell, m in owner.items():
            groups.setdefault(m, []).append(cell)
        for m, cells in groups.items():
            k = int(batch.gt_labels[b][m])
            st = torch.stack([batch.student[f"cls.p{l}"][b, a * K + k, h, w] for l, h, w, a in cells]).sigmoid()
            tt = torch.stack([batch.teacher[f"cls.p{l}"][b, a * K + k, h, w] for l, h, w, a in cells]).sigmoid()
            p, q = torch.softmax(tt / temp, 0), torch.softmax(st / temp, 0)
            kls.append((p * (p.log() - q.log())).sum())
    return torch.stack(kls).mean()


def ref_pfi(loss, batch: DistillBatch, pred: str = "logits", reduction: str = "norm") -> torch.Tensor:
    """The formula with loops over levels and images, on each image's valid cells."""
    total = torch.zeros(())
    for lvl in LEVELS:
        cells, norms = [], []
        for b in range(B):
            h, w = VALID[b][lvl]
            ps, pt = batch.student[f"cls.p{lvl}"][b], batch.teacher[f"cls.p{lvl}"][b]
            if pred == "probs":
                ps, pt = ps.sigmoid(), pt.sigmoid()
            fs = conv1x1(batch.student[f"fpn.p{lvl}"][b : b + 1], loss.adapters[f"p{lvl}"])[0]
            ft = batch.teacher[f"fpn.p{lvl}"][b]
            p_dif = ((ps - pt)[:, :h, :w] ** 2).mean(0)
            f_dif = ((fs - ft)[:, :h, :w] ** 2).mean(0)
            cells.append((p_dif * f_dif).flatten())
            norms.append((p_dif * f_dif).flatten().norm())
        padded_cells = batch.student[f"cls.p{lvl}"].shape[-2] * batch.student[f"cls.p{lvl}"].shape[-1]
        total = total + (torch.cat(cells).mean() if reduction == "mean" else sum(norms) / (B * padded_cells) / B)
    return total / len(LEVELS)


# ---------------------------------------------------------------- formula checks


@pytest.mark.parametrize("cs,ct", [(4, 6), (6, 6)])
def test_mgd_matches_reference(cs: int, ct: int) -> None:
    batch = make_batch(cs, ct)
    loss = build("mgd", cs, ct, lambda_mask=0.5, generator=torch.Generator().manual_seed(7))
    close(loss(batch), ref_mgd(loss, batch, seed=7, lam=0.5))


@pytest.mark.parametrize("cs,ct", [(4, 6), (6, 6)])
def test_mse_matches_reference(cs: int, ct: int) -> None:
    batch = make_batch(cs, ct)
    loss = build("mse", cs, ct)
    close(loss(batch), ref_mse(loss, batch))


@pytest.mark.parametrize("cs,ct", [(4, 6), (6, 6)])
def test_pkd_matches_reference(cs: int, ct: int) -> None:
    batch = make_batch(cs, ct)
    loss = build("pkd", cs, ct)
    close(loss(batch), ref_pkd(loss, batch))


@pytest.mark.parametrize("target,cs", [("fpn", 4), ("fpn", 6), ("cls", 4)])
def test_cwd_matches_reference(target: str, cs: int) -> None:
    batch = make_batch(cs, 6)
    loss = build("cwd", cs, 6, tau=3.0, target=target)
    assert loss.needs == (target,)
    close(loss(batch), ref_cwd(loss, batch, 3.0, target))


def test_kd_matches_reference() -> None:
    batch = make_batch()
    close(build("kd", tau=2.5)(batch), ref_kd(batch, 2.5))


@pytest.mark.parametrize("low_quality,temp", [(True, 1.0), (False, 1.0), (True, 0.2)])
def test_rm_matches_reference_on_random_boxes(low_quality: bool, temp: float) -> None:
    batch = make_batch(seed=3)
    expected = ref_rm(batch, low_quality=low_quality, temp=temp)
    assert expected.numel() == 1  # the random case has positives
    close(build("rm", low_quality=low_quality, temperature=temp)(batch), expected)


@pytest.mark.parametrize("cs,ct", [(4, 6), (6, 6)])
@pytest.mark.parametrize("pred,reduction", [("logits", "norm"), ("logits", "mean"), ("probs", "norm")])
def test_pfi_matches_reference(cs: int, ct: int, pred: str, reduction: str) -> None:
    batch = make_batch(cs, ct)
    loss = build("pfi", cs, ct, pred=pred, reduction=reduction)
    close(loss(batch), ref_pfi(loss, batch, pred, reduction))


# ---------------------------------------------------------------- rank mimicking, by hand


Cell = tuple[int, int, int, int]  # (level, h, w, anchor)


def hand_batch(same: bool = False) -> tuple[DistillBatch, list[Cell], list[Cell]]:
    """Two overlapping boxes on image 0 with hand-placed anchors; image 1's only match is on padding."""
    batch = make_batch(seed=5, same=same)
    anchors = torch.tensor([[200.0 + i, 200.0, 201.0 + i, 201.0] for i in range(batch.anchors.shape[0])])
    gt0, gt1 = [0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0]  # IoU(gt0, gt1) = 0.43
    placed = {
        (3, 0, 1, 0): [0.0, 0.0, 10.0, 10.0],  # gt0, IoU 1
        (3, 1, 0, 1): [0.0, 0.0, 10.0, 12.0],  # gt0, IoU 0.83 (gt1: 0.375)
        (4, 0, 0, 1): [0.0, 0.0, 10.0, 20.0],  # gt0, IoU exactly 0.5: positive
        (3, 2, 2, 0): [0.0, 0.0, 10.0, 21.0],  # IoU 0.476 with gt0: negative
        (3, 4, 5, 1): [4.0, 0.0, 14.0, 10.0],  # gt1, IoU 1
        (3, 0, 0, 0): [3.0, 0.0, 13.0, 10.0],  # IoU 0.54 with gt0 but 0.82 with gt1: goes to gt1
        (4, 1, 1, 0): [4.0, 0.0, 14.0, 11.0],  # gt1, IoU 0.91
        (3, 7, 7, 0): [40.0, 40.0, 50.0, 50.0],  # image 1's box, but on its padded cells (h=7 >= 5)
    }
    for cell, box in placed.items():
        anchors[anchor_row(*cell)] = torch.tensor(box)
    batch.anchors = anchors
    batch.gt_boxes = [torch.tensor([gt0, gt1]), torch.tensor([[40.0, 40.0, 50.0, 50.0]])]
    batch.gt_labels = [torch.tensor([1, 2]), torch.tensor([0])]
    pos0 = [(3, 0, 1, 0), (3, 1, 0, 1), (4, 0, 0, 1)]
    pos1 = [(3, 4, 5, 1), (3, 0, 0, 0), (4, 1, 1, 0)]
    return batch, pos0, pos1


def test_rm_hand_built_two_boxes() -> None:
    batch, pos0, pos1 = hand_batch()
    kls = []
    for cells, k in ((pos0, 1), (pos1, 2)):
        s = torch.stack([batch.student[f"cls.p{l}"][0, a * K + k, h, w] for l, h, w, a in cells]).sigmoid()
        t = torch.stack([batch.teacher[f"cls.p{l}"][0, a * K + k, h, w] for l, h, w, a in cells]).sigmoid()
        p, q = torch.softmax(t, 0), torch.softmax(s, 0)
        kls.append((p * (p / q).log()).sum())
    expected = (kls[0] + kls[1]) / 2  # image 1's box has no valid positive: not in the mean
    got = build("rm", low_quality=False)(batch)
    close(got, expected)
    close(got, ref_rm(batch, low_quality=False))
    got.backward()
    grads = [batch.student[f"cls.p{l}"].grad for l in LEVELS]
    assert grads[0][0, 1 * K + 1, 1, 0] != 0 and grads[1][0, 0 * K + 2, 1, 1] != 0
    assert grads[0][0, 0 * K + 1, 2, 2] == 0  # the negative anchor gets no gradient


def test_rm_zero_positives_is_zero_with_grad() -> None:
    batch = make_batch()
    batch.gt_boxes = [torch.tensor([[500.0, 500.0, 510.0, 510.0]]), torch.zeros(0, 4)]
    batch.gt_labels = [torch.tensor([0]), torch.zeros(0, dtype=torch.int64)]
    got = build("rm")(batch)
    assert got.item() == 0.0 and got.requires_grad
    got.backward()
    assert all(batch.student[f"cls.p{l}"].grad.abs().sum() == 0 for l in LEVELS)


def test_rm_rejects_wrong_anchor_count() -> None:
    batch = make_batch()
    batch.anchors = batch.anchors[:-1]
    with pytest.raises(ValueError, match="anchors"):
        build("rm")(batch)


# ---------------------------------------------------------------- properties shared by all losses

ALL = ["mgd", "mse", "pkd", "cwd", "kd", "rm", "pfi"]


def fresh(name: str, cs: int = 4, ct: int = 6):
    params = {"generator": torch.Generator().manual_seed(1)} if name == "mgd" else {}
    return build(name, cs, ct, **params)


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_student_and_loss_parameters(name: str) -> None:
    batch = make_batch(seed=3)
    loss = fresh(name)
    loss(batch).backward()
    read = [n for n in ("fpn", "cls") if n in loss.needs]
    for n in read:
        grads = [batch.student[f"{n}.p{l}"].grad for l in LEVELS]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), n
        assert sum(g.abs().sum() for g in grads) > 0, n
    params = list(loss.parameters())
    assert bool(params) == (name in ("mgd", "mse", "pkd", "cwd", "pfi"))  # adapters/generators, Cs != Ct
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_teacher_padding_does_not_matter(name: str) -> None:
    batch = make_batch(seed=3)
    loss = fresh(name)
    before = loss(batch)
    g = torch.Generator().manual_seed(9)
    for key, t in batch.teacher.items():
        lvl = int(key.split(".p")[1])
        batch.teacher[key] = t + 100 * torch.randn(t.shape, generator=g) * (1 - batch.masks[lvl])
    if name == "mgd":
        loss.generator = torch.Generator().manual_seed(1)  # the same random masks again
    close(loss(batch), before)


@pytest.mark.parametrize("name", ["mse", "pkd", "cwd", "kd", "rm", "pfi"])
def test_student_padding_does_not_matter(name: str) -> None:
    # (mgd reads padding through its 3x3 generator on purpose; see its docstring.)
    batch = make_batch(seed=3)
    loss = fresh(name)
    before = loss(batch)
    g = torch.Generator().manual_seed(9)
    for key, s in batch.student.items():
        lvl = int(key.split(".p")[1])
        batch.student[key] = (s + 100 * torch.randn(s.shape, generator=g) * (1 - batch.masks[lvl])).detach()
    close(loss(batch), before)


@pytest.mark.parametrize("name", ["mse", "pkd", "cwd", "kd", "rm"])
def test_identical_student_and_teacher_give_zero(name: str) -> None:
    batch, _, _ = hand_batch(same=True)  # hand_batch guarantees rm has positives
    loss = build(name, 6, 6)
    assert all(
        isinstance(m, torch.nn.Identity)
        for m in loss.modules()
        if m is not loss and not isinstance(m, torch.nn.ModuleDict)
    )
    assert abs(loss(batch).item()) < 1e-6


def test_mgd_mask_rate_and_determinism() -> None:
    x = torch.ones(64, 1, 32, 32)
    masks_drawn = [
        build("mgd", lambda_mask=0.65, generator=torch.Generator().manual_seed(0)).random_mask(x) for _ in range(2)
    ]
    assert torch.equal(masks_drawn[0], masks_drawn[1])  # same seed, same masks
    assert abs(masks_drawn[0].mean().item() - 0.35) < 0.01  # a location is dropped with probability λ


def test_pfi_keeps_the_prediction_gap_gradient_by_default() -> None:
    batch = make_batch()
    build("pfi")(batch).backward()
    assert all(batch.student[f"cls.p{l}"].grad is not None for l in LEVELS)
    batch = make_batch()
    build("pfi", detach_pred=True)(batch).backward()
    assert all(batch.student[f"cls.p{l}"].grad is None for l in LEVELS)
    assert all(batch.student[f"fpn.p{l}"].grad is not None for l in LEVELS)


# ---------------------------------------------------------------- registry


def test_registry_contents_and_defaults() -> None:
    assert sorted(LOSSES) == sorted(ALL)
    assert loss_defaults("mgd") == {"weight": 2e-5, "lambda_mask": 0.65}
    assert loss_defaults("rm") == {"weight": 4.0, "iou_threshold": 0.5, "low_quality": True, "temperature": 1.0}
    assert loss_defaults("pfi") == {"weight": 1.5, "detach_pred": False, "pred": "logits", "reduction": "norm"}
    assert loss_defaults("pfi")["weight"] == 1.5 and loss_defaults("kd")["tau"] == 2.0
    assert loss_defaults("cwd") == {"weight": 1.0, "tau": 4.0, "target": "fpn"}
    for name, cls in LOSSES.items():
        assert cls.name == name and cls.needs and math.isfinite(cls.default_weight)
        params = {k: v for k, v in loss_defaults(name).items() if k != "weight"}
        assert build(name, **params).__class__ is cls  # defaults round-trip through build_loss


def test_unknown_loss_name_lists_registered() -> None:
    with pytest.raises(ValueError, match=r"unknown distillation loss 'fgd'.*cwd, kd, mgd, mse, pfi, pkd, rm"):
        build("fgd")


def test_unknown_param_is_named_with_accepted() -> None:
    with pytest.raises(ValueError, match=r"'mgd'.*unknown parameter\(s\) lamda_mask; accepted: generator, lambda_mask"):
        build("mgd", lamda_mask=0.5)
    with pytest.raises(ValueError, match=r"weight.*belongs to the stage"):
        build("kd", weight=2.0)
