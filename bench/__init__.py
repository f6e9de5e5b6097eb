"""Benchmarks of mtpd: each prints ratios of runs interleaved in one run and writes bench/RESULTS.md."""
