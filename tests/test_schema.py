"""Value encodings of the precision presets: error bounds and exactness."""

import numpy as np
import pytest

from mtpd.cache.schema import (
    PRECISIONS,
    bitround_fp16,
    decode_values,
    describe_differences,
    encode_values,
    probability_error_bound,
)


@pytest.mark.parametrize("keepbits", [5, 7])
def test_bitround_error_bound_and_idempotence(keepbits):
    x = np.random.default_rng(0).normal(0, 3, 10000).astype(np.float16)
    r = bitround_fp16(x, keepbits)
    rel = np.abs(r.astype(np.float64) - x) / np.maximum(np.abs(x.astype(np.float64)), 1e-30)
    nz = np.abs(x) > 1e-3  # subnormals keep absolute, not relative, precision
    assert rel[nz].max() <= 2.0 ** -(keepbits + 1) + 1e-12
    np.testing.assert_array_equal(bitround_fp16(r, keepbits), r)
    # Low mantissa bits are zero: that is what makes the stream compress.
    assert np.all(r.view(np.uint16) & ((1 << (10 - keepbits)) - 1) == 0)


def test_lossless_is_fp16_rounding():
    x = np.random.default_rng(1).normal(0, 1, 1000).astype(np.float32)
    q = encode_values(x, PRECISIONS["lossless"].encoding("feature"))
    assert q.dtype == np.float16
    np.testing.assert_array_equal(decode_values(q, "fp16"), x.astype(np.float16).astype(np.float32))


def test_logprob_uint8_probability_error():
    logits = np.linspace(-9, 12, 5001).astype(np.float32)
    enc = PRECISIONS["compact"].encoding("logits")
    q = encode_values(logits, enc)
    assert q.dtype == np.uint8
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    p_hat = decode_values(q, enc, as_logits=False)
    above = p > 1.1e-4
    assert np.max(np.abs(p_hat[above] - p[above]) / p[above]) <= probability_error_bound(enc) + 1e-6
    # Logits decode monotonically and finitely, even for p == 1.
    lg = decode_values(q, enc)
    assert np.all(np.isfinite(lg)) and np.all(np.diff(lg) >= 0)


def test_values_beyond_fp16_range_are_clipped_not_inf():
    q = encode_values(np.array([1e6, -1e6], np.float32), "fp16")
    assert np.all(np.isfinite(q.astype(np.float32)))


def test_describe_differences_names_the_key():
    d = describe_differences({"teacher": {"name": "a", "w": 1}}, {"teacher": {"name": "b", "w": 1}})
    assert d == ["teacher.name: 'a' (store) vs 'b' (this run)"]
