"""Product quantisation (``mtpd.cache.pq``): exact row size, every sub-vector decoded to its nearest codeword (the
stated bound, which a shifted decode fails), less error than a scalar code in the same bytes on correlated rows,
attributes that round-trip, and a store built with it that reads back."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("faiss")

from test_transform_code import coded_store, fitted, full_rank, roundtrip  # noqa: E402

from mtpd.cache.encoding import EncodingError, ProductQuantizer, Transform, encoding_from_attrs  # noqa: E402
from mtpd.cache.pq import _faiss_codes  # noqa: E402


@pytest.mark.parametrize("bits,rotate", [(2.0, False), (2.0, True), (1.0, False)])
def test_rows_are_one_byte_per_subvector_and_decode_to_the_nearest_codeword(bits, rotate):
    torch.manual_seed(0)
    x = full_rank(n=3000, c=32)
    enc = fitted(ProductQuantizer(bits, rotate), x)
    assert enc.state["codebook"].shape == (2, int(32 * bits / 8), 256, 32 // int(32 * bits / 8))
    for level, rows in ((0, x[:1000]), (1, x[:500] * 1.5)):
        codes, y = roundtrip(enc, rows, level)
        assert codes.dtype == torch.uint8 and codes.shape == (len(rows), int(32 * bits / 8))
        assert enc.within_bound(rows, y, level)
        assert not enc.within_bound(rows, y + 0.5 * rows.std(0), level)  # a bound that can fail


def test_one_subvector_decoded_to_its_second_nearest_codeword_is_outside_the_bound():
    torch.manual_seed(0)
    x = full_rank(n=3000, c=32)
    enc = fitted(ProductQuantizer(2.0, rotate=False), x)
    rows = x[:200]
    codes, y = roundtrip(enc, rows)
    d2 = enc._distances(enc.subvectors(rows, 0), 0)
    second = d2.topk(2, dim=-1, largest=False).indices[..., 1]
    cell, sub = 17, 3
    wrong = codes.clone()
    wrong[cell, sub] = second[cell, sub].to(torch.uint8)
    assert enc.within_bound(rows, y, 0)
    assert not enc.within_bound(rows, enc.decode(wrong[None], None, 0)[0], 0)


def test_rows_with_a_large_norm_keep_their_low_energy_subvectors_within_the_bound():
    """256 channels with a common offset and a spectrum falling 1000x (RetinaNet-R50-like rows): the decode's
    float32 rounding scales with the row, so a tolerance scaled by each sub-vector's own norm failed low-energy
    sub-vectors whose codes were the nearest; a swapped code in a high-energy one still fails."""
    torch.manual_seed(0)
    c = 256
    mix = torch.randn(c, c) * torch.logspace(0, -3, c)
    x = torch.distributions.StudentT(4.0).sample((6000, c)) @ mix.T + 5.0 + torch.randn(c)
    enc = fitted(ProductQuantizer(2.0, rotate=True), x[:4000])
    rows = x[4000:]
    codes, y = roundtrip(enc, rows)
    assert enc.within_bound(rows, y, 0)
    z, book = enc.subvectors(rows, 0).double(), enc.state["codebook"][0].double()
    d2 = (z[:, :, None] - book[None]).pow(2).sum(-1)  # [n, M, 256], exact differences in float64
    chosen = d2.gather(-1, codes.long()[..., None])[..., 0]
    assert bool(torch.all(chosen <= d2.amin(-1) * (1 + 1e-6) + 1e-12))  # every code a nearest: the bound must hold
    wrong = codes.clone()
    wrong[5, 0] = d2[5, 0].topk(2, largest=False).indices[1].to(torch.uint8)  # sub-vector 0: the top component
    assert not enc.within_bound(rows, enc.decode(wrong[None], None, 0)[0], 0)


def test_the_cpu_search_by_faiss_picks_the_codewords_torch_picks():
    torch.manual_seed(0)  # full_rank's Student-t draws use the global generator
    x = full_rank(n=3000, c=32)
    enc = fitted(ProductQuantizer(2.0), x)
    z = enc.subvectors(x, 0)
    torch_codes = enc._distances(z, 0).argmin(-1).to(torch.uint8)
    faiss_codes = _faiss_codes(z, enc.state["codebook"][0])
    assert torch.equal(enc.encode(x, 0)[0], faiss_codes)  # encode on a CPU goes through faiss
    # faiss loads its AVX2 or AVX-512 build by CPU, and float32 distances round by kernel: a near-tie may go
    # either way. So: every faiss code is a nearest codeword by exact float64 distance, and near-ties are rare.
    z, book = z.double(), enc.state["codebook"][0].double()
    d2 = (z[:, :, None] - book[None]).pow(2).sum(-1)
    chosen = d2.gather(-1, faiss_codes.long()[..., None])[..., 0]
    assert bool(torch.all(chosen <= d2.amin(-1) * (1 + 1e-5) + 1e-9))
    assert float((faiss_codes == torch_codes).float().mean()) > 0.999


def test_a_level_with_fewer_cells_than_codewords_keeps_each_cell():
    x = full_rank(n=3000, c=16)
    enc = ProductQuantizer(2.0).with_state(ProductQuantizer(2.0).fit([x, x[:40]]))  # P7-like: 40 cells
    _, y = roundtrip(enc, x[:40], 1)
    assert torch.allclose(y, x[:40], atol=1e-5)


def test_less_error_than_the_transform_code_in_the_same_bytes_on_correlated_rows():
    """Channels mixed by a random rotation (as a network's are): codewords follow the rows' joint shape, where
    a scalar quantiser, even on principal axes, spends a grid per component."""
    x = full_rank(n=6000, c=32, seed=0)
    held = full_rank(n=2000, c=32, seed=1)
    rel = lambda y: float((y - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum()) ** 0.5  # noqa: E731
    pq, tc = fitted(ProductQuantizer(2.0, rotate=False), x), fitted(Transform(2.0), x)
    assert rel(roundtrip(pq, held)[1]) < 0.9 * rel(roundtrip(tc, held)[1])


def test_attrs_round_trip_and_errors():
    assert encoding_from_attrs(ProductQuantizer(2.0, False).to_attrs()) == ProductQuantizer(2.0, False)
    assert encoding_from_attrs({"kind": "pq", "bits": 2, "rotate": True}) == ProductQuantizer(2.0)
    with pytest.raises(EncodingError, match="does not divide"):
        ProductQuantizer(1.5).code_channels(64)  # 12 sub-vectors of 64 channels
    with pytest.raises(EncodingError, match="before its codebooks"):
        ProductQuantizer(2.0).encode(full_rank(c=8), 0)


def test_a_store_coded_by_it_reads_back(tmp_path, digits, tiny_teacher_ckpt):
    """Through the builder (calibration fits the codebooks into calib/) and the reader, against lossless."""
    s, rel = coded_store(tmp_path, digits, tiny_teacher_ckpt, "small+features=pq:bits=2,rotate=false")
    enc = s.header.outputs["fpn"].encoding
    assert enc == ProductQuantizer(2.0, False) and s.header.outputs["fpn"].code_channels == 64 * 2 // 8
    assert sorted(enc.state) == ["codebook", "mean", "rotation"]  # read back from calib/
    assert 0 < rel < 0.6
