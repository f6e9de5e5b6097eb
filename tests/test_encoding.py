"""Value encodings: each round trip within its stated bound, packing, the PCA fit, the presets."""

import math

import numpy as np
import pytest
import torch
from numcodecs import BitRound

from mtpd.cache.encoding import (
    PCA,
    Affine,
    EncodingError,
    Fp16,
    LogProbU8,
    ProductQuantizer,
    TopK,
    bitround,
    encoding_from_attrs,
    encoding_from_v1,
    pack,
    unpack,
)
from mtpd.cache.schema import PRECISIONS, describe_differences
from mtpd.output_spec import OutputSpec


def features(n=600, c=48, seed=0) -> torch.Tensor:
    """Correlated, non-Gaussian rows like conv features: a low-rank part, ReLU'd, plus noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g) @ torch.randn(8, c, generator=g)
    return torch.relu(z) * 2 + 0.1 * torch.randn(n, c, generator=g)


def roundtrip(enc, x, level=0):
    codes, side = enc.encode(x, level)
    return codes, side, enc.decode(codes[None], None if side is None else side[None], level)[0]


@pytest.mark.parametrize("keepbits", [None, 5, 7])
def test_fp16_bound(keepbits):
    enc = Fp16(keepbits)
    x = features()
    codes, side, y = roundtrip(enc, x)
    assert codes.dtype == torch.float16 and side is None
    nz = x.abs() > 1e-3  # subnormals keep absolute, not relative, precision
    rel = ((y - x).abs() / x.abs())[nz]
    assert rel.max() <= enc.rel_bound() + 1e-7
    if keepbits:  # low mantissa bits are zero: what makes the stream compress
        assert torch.all(codes.view(torch.int16) & ((1 << (10 - keepbits)) - 1) == 0)


def test_bitround_equals_numcodecs_bitround():
    h = (torch.randn(200_000, generator=torch.Generator().manual_seed(3)) * 50).half()
    for keepbits in (3, 5, 7):
        ours = bitround(h, keepbits).numpy().view(np.uint16)
        theirs = np.asarray(BitRound(keepbits).encode(h.numpy())).view(np.uint16)
        np.testing.assert_array_equal(ours, theirs)


def test_fp16_clips_instead_of_inf():
    codes, _ = Fp16().encode(torch.tensor([[1e6, -1e6]]), 0)
    assert torch.isfinite(codes.float()).all()


def test_logprob_u8_bound_and_monotone():
    logits = torch.linspace(-9, 12, 5001)[:, None]
    enc = LogProbU8()
    codes, _, y = roundtrip(enc, logits)
    assert codes.dtype == torch.uint8
    p, p_hat = torch.sigmoid(logits.double()), torch.sigmoid(y.double())
    above = p > 1.1e-4
    assert ((p_hat - p).abs() / p)[above].max() <= enc.prob_bound() * 1.001 + 1e-6
    assert torch.isfinite(y).all() and torch.all(y[1:] >= y[:-1])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_affine_bound_per_channel(bits):
    enc = Affine(bits)
    x = features(c=37)  # an odd channel count: packing pads and unpacking trims
    codes, side, y = roundtrip(enc, x)
    assert codes.shape == (x.shape[0], math.ceil(37 * bits / 8)) and side.shape == (2, 37)
    step = (x.amax(0) - x.amin(0)) / (2**bits - 1)
    assert torch.all((y - x).abs() <= step / 2 * (1 + 1e-4) + 1e-6)


def test_topk_keeps_each_cells_largest_scores():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(400, 720, generator=g) * 3 - 8  # COCO's 9 anchors x 80 classes: indices beyond 255
    enc = TopK(4, 720)
    codes, side, y = roundtrip(enc, logits)
    assert codes.shape == (400, 8) and codes.dtype == torch.uint16 and side is None
    assert enc.within_bound(logits, y, 0)
    top = logits.topk(4, dim=1).indices
    assert torch.equal(y.topk(4, dim=1).indices.sort(1).values, top.sort(1).values)
    per_anchor = TopK(2, 720, groups=9)  # the 2 largest of each anchor's 80 classes
    codes, _, y = roundtrip(per_anchor, logits)
    assert codes.shape == (400, 36) and per_anchor.within_bound(logits, y, 0)
    assert torch.equal((y > y.min()).reshape(400, 9, 80).sum(-1), torch.full((400, 9), 2))
    with pytest.raises(EncodingError, match="topk"):
        TopK(2, 720, groups=7)


def test_pack_unpack_inverse():
    for bits in (2, 4, 8):
        q = torch.randint(0, 2**bits, (5, 7, 13), dtype=torch.uint8)
        np.testing.assert_array_equal(unpack(pack(q, bits), bits, 13).numpy(), q.numpy())


@pytest.mark.parametrize("bits", [8, 4])
def test_pca_bound(bits):
    x = features(c=32)
    enc = PCA(rank=12, bits=bits)
    enc = enc.with_state(enc.fit([x]))
    codes, side, y = roundtrip(enc, x)
    assert codes.shape == (x.shape[0], math.ceil(12 * bits / 8))
    basis, mean = enc.state["basis"][0], enc.state["mean"][0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(12), atol=1e-5, rtol=0)
    residual = ((x - mean) - (x - mean) @ basis @ basis.T).pow(2).sum(1)
    quant = ((side[1] / 2) ** 2).sum()
    assert torch.all((y - x).pow(2).sum(1) <= (residual + quant) * (1 + 1e-3) + 1e-5)
    # A ReLU of an 8-rank signal in 32 channels: 12 components keep most of it.
    assert float((y - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.15


def test_pca_fit_is_deterministic_and_sign_fixed():
    x = features(c=24)
    a, b = PCA(rank=6).fit([x]), PCA(rank=6).fit([x.clone()])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    basis = torch.from_numpy(a["basis"][0])
    assert torch.all(basis.gather(0, basis.abs().argmax(0, keepdim=True)) > 0)


def test_pca_without_state_is_an_error():
    with pytest.raises(EncodingError, match="basis"):
        PCA(rank=4).encode(features(c=8), 0)


def test_attrs_round_trip_and_format1_names():
    for enc in (Fp16(), Fp16(5), LogProbU8(), Affine(4), PCA(rank=7, bits=4), TopK(4, 720), TopK(2, 720, 9)):
        assert encoding_from_attrs(enc.to_attrs()) == enc
    assert encoding_from_v1("fp16-bitround5") == Fp16(5)
    assert encoding_from_v1("logprob-uint8") == LogProbU8()
    with pytest.raises(EncodingError, match="newer mtpd"):
        encoding_from_attrs({"kind": "zfp"})


def test_presets_pick_encodings_by_kind():
    fpn = OutputSpec("fpn", "feature", (3, 4), 256)
    cls = OutputSpec("cls", "logits", (3, 4), 90, 9, 10)
    box = OutputSpec("box", "deltas", (3, 4), 36, 9)
    assert PRECISIONS["lossless"].encoding_for(fpn) == Fp16()
    assert PRECISIONS["compact"].encoding_for(cls) == LogProbU8()
    assert PRECISIONS["small"].encoding_for(fpn) == Affine(4)
    assert PRECISIONS["tiny"].encoding_for(fpn) == PCA(rank=128, bits=4)
    assert PRECISIONS["tiny"].encoding_for(box) == Affine(8)
    assert PRECISIONS["tiny"].encoding_for(cls) == TopK(8, 90) and PRECISIONS["small"].encoding_for(cls) == LogProbU8()
    micro = PRECISIONS["micro"]
    assert micro.encoding_for(fpn) == ProductQuantizer(2.0, rotate=True) and micro.encoding_for(box) == Affine(8)
    # class scores: one byte per anchor, 9 anchors x 10 classes -> 9 sub-vectors of 10 logits
    assert micro.encoding_for(cls) == ProductQuantizer(0.8, rotate=False)
    assert micro.encoding_for(cls).code_channels(90) == 9
    fcos = OutputSpec("cls", "logits", (3, 4), 80, 1, 80)  # anchor-free: one byte per cell
    assert micro.encoding_for(fcos).code_channels(80) == 1


def test_encoding_parameters_keep_their_types():
    """Parameters come back as their fields' types; a value of another type is a one-line error, not a cast."""
    enc = encoding_from_attrs({"kind": "topk", "k": 2, "channels": 90, "groups": 9})
    assert enc == TopK(2, 90, 9) and all(type(v) is int for v in (enc.k, enc.channels, enc.groups))
    assert encoding_from_attrs({"kind": "fp16", "keepbits": None}) == Fp16()
    for bad in ({"kind": "fp16", "keepbits": 5.5}, {"kind": "affine", "bits": "4"}, {"kind": "topk", "k": True}):
        with pytest.raises(EncodingError, match="is not int"):
            encoding_from_attrs(bad)
    with pytest.raises(EncodingError, match="unknown parameter"):
        encoding_from_attrs({"kind": "affine", "bits": 4, "scale": 1})


def test_a_preset_rule_sees_the_whole_output_spec():
    """Rules receive the spec, so a per-anchor code can be chosen (TopK with one group per anchor)."""
    from mtpd.cache.schema import Precision

    per_anchor = Precision(
        "per-anchor",
        lambda s: Fp16(),
        lambda s: TopK(k=2, channels=s.channels, groups=s.num_anchors),
        lambda s: Fp16(),
    )
    cls = OutputSpec("cls", "logits", (3, 4), 90, 9, 10)
    assert per_anchor.encoding_for(cls) == TopK(2, 90, 9)


def test_describe_differences_names_the_key():
    d = describe_differences({"teacher": {"name": "a", "w": 1}}, {"teacher": {"name": "b", "w": 1}})
    assert d == ["teacher.name: 'a' (store) vs 'b' (this run)"]
