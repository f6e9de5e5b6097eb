"""Mirror rules per detector family: how a map of the original view becomes the flipped view's.

Each adapter declares a rule per output (``OutputSpec.mirror``). The rules are checked against the
families' own box coders: the code of a mirrored box at the mirrored anchor is the rule applied to
the code of the box at its anchor (RetinaNet/RPN deltas: dx negated; FCOS distances: l and r
swapped; GFL distributions: the l and r bin groups swapped). Through a store: an orig-only FCOS
store's mirrored box maps decode as the rule says, and their measured flip error stays small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_VIEW, tiny_build

from mtpd.cache.flip import mirror
from mtpd.cache.read import mirror_channels
from mtpd.cache.store import StoreReader
from mtpd.data import CocoDataset, ViewSpec, grid_size, prepare_view
from mtpd.models import adapter_for, build_arch, list_archs, output_specs
from mtpd.models.adapters import ADAPTERS, mirror_rule
from mtpd.output_spec import NEGATE_DX, NONE, REVERSE, SWAP_LR, OutputSpec
from mtpd.teachers.registry import TeacherSpec
from mtpd.trainer.sources import StoreTargets
from mtpd.trainer.targets import DistillDataset, collate

W = 128.0  # image width the boxes below are mirrored in


def hflip_boxes(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], 1)


def apply_rule(codes: torch.Tensor, spec: OutputSpec) -> torch.Tensor:
    """[N, C] codes (one anchor's or cell's channels per row) with ``spec``'s channel rule applied."""
    perm, sign = spec.mirror_channels()
    return codes[:, perm] * torch.tensor(sign)


BOXES = torch.tensor([[10.0, 20.0, 50.0, 44.0], [70.0, 5.0, 90.0, 100.0], [30.0, 30.0, 31.5, 60.0]])
ANCHORS = torch.tensor([[16.0, 16.0, 48.0, 48.0], [60.0, 20.0, 100.0, 90.0], [20.0, 40.0, 36.0, 56.0]])


@pytest.mark.parametrize("arch", ["retinanet_tiny", "fcos_tiny", "fasterrcnn_resnet50_fpn", "ssd_tiny"])
def test_rules_match_each_familys_box_coder(arch) -> None:
    """encode(flip(box), flip(anchor)) == rule(encode(box, anchor)), with the model's own coder."""
    model = build_arch(arch, 3, **({"levels": (2, 3, 4, 5)} if "rcnn" in arch else {}))
    specs = output_specs(model)
    name = "rpn_box" if "rpn_box" in specs else "box"
    spec = OutputSpec(name, "deltas", (3,), 4, 1, 0, specs[name].mirror)  # one anchor's 4 channels
    coder = model.rpn.box_coder if "rcnn" in arch else model.box_coder
    if hasattr(coder, "encode_single"):
        enc = coder.encode_single(BOXES, ANCHORS)
        enc_flipped = coder.encode_single(hflip_boxes(BOXES), hflip_boxes(ANCHORS))
    else:  # FCOS's BoxLinearCoder
        enc = coder.encode(ANCHORS, BOXES)
        enc_flipped = coder.encode(hflip_boxes(ANCHORS), hflip_boxes(BOXES))
    torch.testing.assert_close(enc_flipped, apply_rule(enc, spec))
    assert spec.mirror_rule == (SWAP_LR if arch == "fcos_tiny" else NEGATE_DX)


def gfl_encode(anchor_xyxy: torch.Tensor, box: torch.Tensor, reg_max: int, stride: float) -> torch.Tensor:
    """GFL's target: (l, t, r, b) from the anchor centre in strides, each as a two-hot over reg_max + 1 bins,
    laid out as mmdet's GFLHead lays its 4·(reg_max + 1) channels: l bins, t bins, r bins, b bins."""
    cx, cy = (anchor_xyxy[0] + anchor_xyxy[2]) / 2, (anchor_xyxy[1] + anchor_xyxy[3]) / 2
    dist = torch.stack([cx - box[0], cy - box[1], box[2] - cx, box[3] - cy]) / stride
    out = torch.zeros(4, reg_max + 1)
    for i, d in enumerate(dist.clamp(0, reg_max - 1e-3)):
        lo = int(d)
        out[i, lo], out[i, lo + 1] = lo + 1 - d, d - lo
    return out.reshape(-1)


def test_gfl_distribution_bins_swap_their_l_and_r_groups() -> None:
    reg_max, anchors = 7, 2
    spec = OutputSpec("box", "deltas", (3,), anchors * 4 * (reg_max + 1), anchors, 0, SWAP_LR)
    codes = torch.stack(
        [torch.cat([gfl_encode(a, b, reg_max, 8.0) for a, b in zip(ANCHORS[:anchors], BOXES[:anchors])])]
    )
    flipped = torch.stack(
        [
            torch.cat(
                [
                    gfl_encode(a, b, reg_max, 8.0)
                    for a, b in zip(hflip_boxes(ANCHORS[:anchors]), hflip_boxes(BOXES[:anchors]))
                ]
            )
        ]
    )
    torch.testing.assert_close(apply_rule(codes, spec), flipped)
    assert mirror_rule("fcos", "box") == SWAP_LR and mirror_rule("retinanet", "box") == NEGATE_DX


@pytest.mark.parametrize(
    "spec",
    [
        OutputSpec("fpn", "feature", (3,), 6),
        OutputSpec("box", "deltas", (3,), 12, 3, 0, NEGATE_DX),
        OutputSpec("box", "deltas", (3,), 8, 2, 0, SWAP_LR),
        OutputSpec("box", "deltas", (3,), 2 * 4 * 5, 2, 0, SWAP_LR),  # GFL: 5 bins per side
        OutputSpec("box", "deltas", (3,), 4),  # no rule declared: the kind's (deltas: dx)
    ],
)
def test_mirroring_twice_is_the_identity(spec) -> None:
    m = np.random.default_rng(0).normal(size=(3, 5, spec.channels)).astype(np.float32)
    once = mirror(m, spec)
    np.testing.assert_array_equal(mirror(once, spec), m)
    assert not np.array_equal(once, m)
    # The trainer's torch path (channels only; columns were reversed on the codes) agrees with numpy's.
    t = torch.from_numpy(m[:, ::-1].copy())[None]
    got = mirror_channels(t.clone(), torch.tensor([True]), spec)[0].numpy()
    np.testing.assert_array_equal(got, once)


def test_an_output_without_a_rule_cannot_be_mirrored() -> None:
    spec = OutputSpec("box", "deltas", (3,), 8, 2, 0, NONE)
    with pytest.raises(ValueError, match="--views orig,hflip"):
        spec.mirror_channels()
    with pytest.raises(ValueError, match="mirror rule 'flip'"):
        OutputSpec("box", "deltas", (3,), 8, 2, 0, "flip")


def test_every_adapter_declares_a_rule_for_each_box_output() -> None:
    """A new family that forgets its box rule would mirror with the deltas default: each adapter says its own."""
    for cls in ADAPTERS:
        archs = list_archs(cls.family)  # the family's tiny arch where it has one
        model = build_arch(min(archs, key=lambda n: "tiny" not in n), 3)
        assert adapter_for(model).family == cls.family
        for spec in adapter_for(model).output_specs().values():
            assert spec.mirror_rule != NONE, (cls.family, spec.name)
            if spec.kind == "deltas":
                assert spec.mirror in (NEGATE_DX, SWAP_LR), (cls.family, spec.name)
            else:
                assert spec.mirror_rule == REVERSE


@pytest.fixture(scope="module")
def fcos_orig_store(tmp_path_factory, digits) -> str:
    out = tmp_path_factory.mktemp("fcos") / "store"
    tiny_build(
        digits,
        out,
        TeacherSpec("fcos_tiny", "none", 10),
        views=ViewSpec(views=("orig",), **TINY_VIEW),
        outputs=("fpn", "cls", "box", "ctr"),
    )
    return str(out)


def test_an_orig_only_fcos_store_serves_flips_with_l_and_r_swapped(digits, fcos_orig_store) -> None:
    """Through the training path: the flipped sample's box map is the orig map with columns reversed and
    l and r swapped, so every distance stays non-negative (negating dx made them negative)."""
    coco = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    ds = DistillDataset(coco, ViewSpec(views=("orig", "hflip"), **TINY_VIEW), [fcos_orig_store], flip=True)
    plain = DistillDataset(coco, ViewSpec(**TINY_VIEW), [fcos_orig_store])
    metas = [f.header.outputs for f in ds.feeds]
    i = next(i for i in range(len(ds)) if ds.view_of(i) == "hflip")
    got = StoreTargets(ds.feeds)(collate([ds[i]], metas))[0][0]
    orig = StoreTargets(ds.feeds)(collate([plain[i]], metas))[0][0]
    h, w = grid_size((TINY_VIEW["short"], TINY_VIEW["long"]), 8)
    g, o = got["box.p3"][0, :, :h, :w], orig["box.p3"][0, :, :h, :w]
    want = torch.flip(o, dims=[2])[[2, 1, 0, 3]]
    torch.testing.assert_close(g, want, rtol=0, atol=0)
    assert (g >= 0).all() and (o > 0).any()
    assert metas[0]["box"].spec.mirror == SWAP_LR


def test_the_fcos_flip_error_is_measured_with_its_rule(digits, fcos_orig_store) -> None:
    """The error recorded at build is that of the l/r swap, and the swap is closer to the teacher's real
    flipped maps than negating dx (the old rule, which made every mirrored l negative). A random teacher's
    maps are far from mirror-symmetric either way (~0.9), so the margin here is small."""
    recorded = StoreReader(fcos_orig_store).root.attrs["flip_error"]["box"]["P3"]["inside"]
    teacher = TeacherSpec("fcos_tiny", "none", 10).build()
    spec = teacher.output_specs()["box"]
    wrong = OutputSpec(spec.name, spec.kind, spec.levels, spec.channels, spec.num_anchors, 0, NEGATE_DX)
    coco = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    view = ViewSpec(views=("orig", "hflip"), **TINY_VIEW)
    err = {SWAP_LR: [0.0, 0.0], NEGATE_DX: [0.0, 0.0]}
    for i in range(4):  # the builder's calibration images
        maps = {}
        for v in ("orig", "hflip"):
            x, meta = prepare_view(coco.load_image(i), view, v)
            maps[v] = teacher(x[None], ["box"])["box.p3"][0].permute(1, 2, 0).numpy()
        h, w = grid_size(meta.size, 8)
        inside = np.zeros((h, w), bool)
        inside[:, 1:-1] = True
        for s in (spec, wrong):
            got = mirror(maps["orig"][:h, :w], s)
            err[s.mirror][0] += float(((got - maps["hflip"][:h, :w])[inside] ** 2).sum())
            err[s.mirror][1] += float((maps["hflip"][:h, :w][inside] ** 2).sum())
    swap, negate = ((e / r) ** 0.5 for e, r in err.values())
    assert recorded == pytest.approx(swap, rel=1e-3)
    assert swap < negate, (swap, negate)


def test_negate_dx_needs_four_channels_per_anchor_and_old_unknown_deltas_do_not_mirror() -> None:
    """A 9-anchor box map declared with one anchor would negate 9 channels of every 36: refused. A store written
    before headers carried rules, whose teacher recorded no family (mmdet, factories): its deltas get none."""
    from mtpd.cache.schema import _with_mirror

    with pytest.raises(ValueError, match="negate_dx needs 4 channels"):
        OutputSpec("box", "deltas", (3,), 36, 1, 0, NEGATE_DX).mirror_channels()
    old = {"name": "box", "kind": "deltas"}
    assert _with_mirror(dict(old), {"name": "mmdet:gfl", "extra": {}})["mirror"] == NONE
    assert _with_mirror(dict(old), {"name": "fcos_tiny", "extra": {"family": "fcos"}})["mirror"] == SWAP_LR
    assert _with_mirror({"name": "fpn", "kind": "feature"}, {"extra": {}})["mirror"] == ""
