"""Defaults shared by light and heavy modules alike (this module imports nothing)."""

# The store precision preset `mtpd-cache build`, a plan's `teacher:` entry and the demo use when none is
# named: the smallest preset whose students stay within 0.5 AP of lossless stores' (paired over 5 seeds, 90 %
# interval above -1 AP) in the bytes-vs-AP sweep (bench/studies/bytes_vs_ap.yaml; docs/stores.md "How small can a
# store be").
# `tiny` and PCA to C/4 lost 0.55 and 0.69 AP there, and KD from top-8 class scores 1.36 AP.
DEFAULT_PRECISION = "small"
