"""A preset with some of its encodings replaced, named by a string: ``small+features=transform:bits=2``.

Studies of new codes (and users with their own trade-off) need precisions that no preset names, in every
process that builds or reads a store (Ray workers included), so the whole choice travels in the name:
``BASE+ROLE=KIND[:PARAM=VALUE[,PARAM=VALUE]]...`` with ROLE one of ``features``, ``logits``, ``other``
(the roles of ``mtpd.cache.schema.Precision``), KIND an encoding (``mtpd.cache.encoding.ENCODINGS``) and
its parameters as the encoding's attributes spell them. Two values depend on the output and may be given
by what they mean: ``topk``'s ``groups=anchors`` (top-k per anchor; ``channels`` is always the output's),
and ``pca``'s ``rank=c/N`` (the output's channels divided by N). The store records the concrete encoding
of each output, so it reads back without this name.
"""

from __future__ import annotations

from typing import Callable

from mtpd.cache.encoding import ENCODINGS, Encoding, EncodingError, encoding_from_attrs
from mtpd.output_spec import OutputSpec

ROLES = ("features", "logits", "other")


def _value(text: str):
    """A parameter value as JSON would type it: int, float, bool, or the string itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _rule(kind: str, params: dict, where: str) -> Callable[[OutputSpec], Encoding]:
    if kind not in ENCODINGS:
        raise EncodingError(f"{where}: unknown encoding {kind!r}; choose from {', '.join(ENCODINGS)}")

    def rule(spec: OutputSpec) -> Encoding:
        p = dict(params)
        if kind == "topk":
            p["channels"] = spec.channels
            if p.get("groups") == "anchors":
                p["groups"] = spec.num_anchors
        if kind == "pca" and isinstance(p.get("rank"), str) and p["rank"].lower().startswith("c/"):
            p["rank"] = max(1, spec.channels // int(p["rank"][2:]))
        return encoding_from_attrs({"kind": kind, **p})

    return rule


def parse_overrides(text: str) -> dict[str, Callable[[OutputSpec], Encoding]]:
    """``ROLE=KIND[:P=V,...]`` parts joined by ``+`` -> role -> rule. EncodingError names the part at fault."""
    out = {}
    for part in text.split("+"):
        role, eq, enc = part.partition("=")
        if not eq or role not in ROLES or not enc:
            raise EncodingError(f"precision part {part!r}: write ROLE=KIND[:PARAM=VALUE,...], ROLE one of {ROLES}")
        kind, _, args = enc.partition(":")
        params = {}
        for item in filter(None, args.split(",")):
            key, eq, val = item.partition("=")
            if not eq:
                raise EncodingError(f"precision part {part!r}: parameter {item!r} is not PARAM=VALUE")
            params[key] = _value(val)
        out[role] = _rule(kind, params, f"precision part {part!r}")
    return out
