"""What a store recorded of resampling's error (``mtpd.cache.resample_error`` measures it): the attribute's key
for a policy, the lookup a stage makes, and the line it prints. No teacher code: a cached stage imports this."""

from __future__ import annotations

import json

from mtpd.data.augment import AugmentPolicy


def policy_key(policy: AugmentPolicy) -> str:
    """The store attribute's key of a policy's entry: its geometry (bank and seed do not change the error)."""
    d = policy.to_dict()
    return json.dumps({k: d[k] for k in ("scale", "crop", "flip")}, sort_keys=True)


def recorded_resample_error(attrs, policy: AugmentPolicy) -> dict | None:
    """The error a store recorded for ``policy``'s geometry (None: not measured)."""
    entry = dict(attrs.get("resample_error", {})).get(policy_key(policy))
    return None if entry is None else entry["error"]


def format_resample_error(err: dict | None) -> str:
    """One line per output and level: the relative RMSE per kind of transform."""
    if not err:
        return "not measured"
    return "; ".join(
        f"{name} {lvl} " + " ".join(f"{part} {e:.3f}" for part, e in parts.items())
        for name, levels in err.items()
        for lvl, parts in levels.items()
    )
