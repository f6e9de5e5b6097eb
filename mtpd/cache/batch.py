"""The read side of a store's codes once they sit on a training batch's grid: decoded where the batch lies.

Workers hand over codes (``mtpd.cache.store.StoreReader.read_codes``, placed on the batch grid by the trainer's
collate); ``decode_codes`` turns one store's codes into float32 maps on the batch's device, zeroes padded cells
of encodings whose zero code is not zero, and mirrors the channels of samples served by mirroring the 'orig'
view (their columns were reversed on the codes), by each output's mirror rule. Keys are built from the store's
header (output name, level), never parsed back out of strings.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtpd.cache.schema import StoredOutput
from mtpd.output_spec import OutputSpec


def decode_codes(
    codes: dict[str, Tensor],
    sides: dict[str, Tensor],
    outputs: dict[str, StoredOutput],
    masks: dict[int, Tensor],
    mirrored: Tensor | None = None,
) -> dict[str, Tensor]:
    """One store's ``{name}.p{level}`` codes [B, Cc, h, w] (channels-last memory) -> float32 maps [B, C, h, w].

    ``sides``: name -> [B, levels, ...] side parameters; ``outputs``: the store's ``header.outputs``;
    ``masks``: level -> [B, 1, h, w] valid cells; ``mirrored``: [B] bool, samples to mirror."""
    maps: dict[str, Tensor] = {}
    for name, o in outputs.items():
        for j, lvl in enumerate(o.levels):
            key = f"{name}.p{lvl}"
            if key not in codes:
                continue
            side = sides[name][:, j] if name in sides else None
            dec = o.encoding.decode(codes[key].permute(0, 2, 3, 1), side, j)  # [B, h, w, C]
            if not o.encoding.zero_is_zero:
                dec = torch.where(masks[lvl].permute(0, 2, 3, 1) > 0, dec, 0.0)
            if mirrored is not None and bool(mirrored.any()):
                dec = mirror_channels(dec, mirrored, o.spec)
            maps[key] = dec.permute(0, 3, 1, 2)
    return maps


def mirror_channels(dec: Tensor, rows: Tensor, spec: OutputSpec) -> Tensor:
    """``dec`` [B, h, w, C] with the channels of the samples in ``rows`` (bool [B]) mirrored by ``spec``'s rule;
    ``dec`` itself when the rule keeps channels as they are."""
    perm, sign = spec.mirror_channels()
    if perm == list(range(len(perm))) and all(s == 1.0 for s in sign):
        return dec
    p = torch.as_tensor(perm, device=dec.device)
    s = torch.as_tensor(sign, device=dec.device, dtype=dec.dtype)
    dec[rows] = dec[rows][..., p] * s  # decoding made ``dec``: writing into it is safe
    return dec
