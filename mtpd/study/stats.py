"""Paired differences, their 90 % t-intervals, the noise floor and rule verdicts, on AP per row and seed.

Results are ``{row: {seed: AP}}`` with AP in [0, 1] as COCO evaluation reports it; everything here is in AP
points (×100), as tables print it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from mtpd.study.spec import Rule

Results = dict[str, dict[int, float]]


def t90(df: int) -> float:
    """Two-sided 90 % quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.95, df))


@dataclass
class Paired:
    """Per-seed differences ``a - b`` over the seeds both rows have, in AP points."""

    a: str
    b: str
    per_seed: dict[int, float]

    @property
    def n(self) -> int:
        return len(self.per_seed)

    @property
    def mean(self) -> float:
        return statistics.mean(self.per_seed.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.per_seed.values()) if self.n > 1 else math.nan

    @property
    def half_width(self) -> float:
        return t90(self.n - 1) * self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def cell(self) -> str:
        """``+1.23 [+0.45, +2.01]`` (one seed: the difference alone)."""
        return f"{self.mean:+.2f}" if self.n < 2 else f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired(results: Results, a: str, b: str) -> Paired | None:
    seeds = sorted(set(results.get(a, {})) & set(results.get(b, {})))
    if not seeds:
        return None
    return Paired(a, b, {s: 100 * (results[a][s] - results[b][s]) for s in seeds})


def mean_std(aps: list[float]) -> str:
    """``mean ± std`` of APs in points (one run: the value alone)."""
    pts = [100 * x for x in aps]
    return f"{pts[0]:.2f}" if len(pts) == 1 else f"{statistics.mean(pts):.2f} ± {statistics.stdev(pts):.2f}"


def noise_floor(results: Results) -> dict[str, float]:
    """The noise a single run carries: the std of a row's runs across seeds (rows with two or more), and
    ``pooled``, the root mean of their variances. A one-seed comparison of two rows moves by about
    ``pooled`` × √2 on seeds alone."""
    stds = {r: statistics.stdev([100 * v for v in d.values()]) for r, d in results.items() if len(d) > 1}
    if stds:
        stds["pooled"] = math.sqrt(statistics.mean([s * s for s in stds.values()]))
    return stds


@dataclass
class Verdict:
    rule: Rule
    passed: list[str]  # rows that meet the rule, in the rule's order
    checked: dict[str, Paired | None]  # every row's pair with the rule's ref (None: no common seeds)
    chosen: list[str]  # what the rule picks (its ref when no row passes)


def verdict(rule: Rule, results: Results, bytes_per_image: dict[str, float] | None = None) -> Verdict:
    """Apply ``rule``: a row passes when its paired mean is >= ``mean_at_least`` and the lower end of its 90 %
    interval is above ``low_above`` (one seed has no interval and never passes)."""
    checked = {r: paired(results, r, rule.ref) for r in rule.rows}
    passed = [
        r
        for r, d in checked.items()
        if d is not None and d.n > 1 and d.mean >= rule.mean_at_least and d.low > rule.low_above
    ]
    if not passed:
        chosen = [rule.ref]
    elif rule.pick == "first":
        chosen = passed[:1]
    elif rule.pick == "all":
        chosen = passed
    else:  # smallest: fewest store bytes per image (the ref among them), rows without a size last
        size = bytes_per_image or {}
        order = [*passed, rule.ref]
        chosen = [min(order, key=lambda r: (size.get(r, math.inf), order.index(r)))]
    return Verdict(rule, passed, checked, chosen)
