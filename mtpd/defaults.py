"""Defaults shared by light and heavy modules alike (this module imports nothing)."""

# The store precision preset `mtpd-cache build`, a plan's `teacher:` entry and the demo use when none is
# named: decided by the bytes-vs-AP sweep (bench/bytes_vs_ap.py; README "How small can a store be").
DEFAULT_PRECISION = "lossless"
