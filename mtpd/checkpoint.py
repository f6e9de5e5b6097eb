"""Reading and writing checkpoint files: the one place mtpd calls ``torch.load`` and ``torch.save``.

Files are read with ``weights_only=True``: tensors, numbers, strings, plain
containers and an allow-list of data types (numpy values, training-log buffers as
inert stand-ins), never pickled code, so a downloaded checkpoint cannot run anything.
Writes go to a temporary file renamed over the target, so a kill mid-save never
leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from mtpd.errors import MtpdError


class CheckpointError(MtpdError, ValueError):
    """A checkpoint that is missing, unreadable or does not fit; the message says what to do."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class _Inert:
    """Stands in for the objects of a training log (mmengine's ``HistoryBuffer``): their pickled
    state is kept as plain data and no method of theirs ever runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _attribute_name(obj: Any, name: str) -> str:
    # Pickled logs hold bound methods as getattr(obj, name): keep the name, never look the attribute up.
    return f"<{type(obj).__name__}.{name}>"


def _log_globals() -> list:
    """What mmengine training checkpoints pickle besides tensors, each either a plain-data type or an
    inert stand-in: numpy arrays, scalars and dtypes, training-log buffers and their bound-method names."""
    import numpy as np
    import numpy.dtypes

    core = (getattr(np, "_core", None) or np.core).multiarray  # numpy 2 / numpy 1
    out: list = [np.dtype, np.ndarray]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(core.scalar, f"{mod}.scalar"), (core._reconstruct, f"{mod}._reconstruct")]
    out += [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    out += [(_Inert, "mmengine.logging.history_buffer.HistoryBuffer")]
    out += [(_attribute_name, "builtins.getattr"), (_attribute_name, "__builtin__.getattr")]
    return out


_TRUSTED = False


def trust_checkpoints(trusted: bool = True) -> None:
    """``--trust-checkpoint``: in this process, a checkpoint the safe reader refuses is unpickled whole."""
    global _TRUSTED
    _TRUSTED = trusted


@contextlib.contextmanager
def trusted(trust: bool = True) -> Iterator[None]:
    """``trust_checkpoints(trust)`` for the reads inside the block only (when ``trust``; else no change)."""
    global _TRUSTED
    saved = _TRUSTED
    _TRUSTED = saved or trust
    try:
        yield
    finally:
        _TRUSTED = saved


def load(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """The object saved in ``path``, tensors on the CPU; CheckpointError naming the file otherwise.

    ``mmap``: map tensor storage instead of reading it (large weight files read in part);
    legacy pre-zipfile files cannot be mapped and are read whole. Only tensors, plain
    containers and the data types of training logs (``_log_globals``) are rebuilt; any other
    pickled object stops the read, naming its type, unless ``trust_checkpoints()`` was called.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p.resolve()} does not exist; pass the path of an existing file")
    allowed = _log_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors come in many types; all mean the same to the user
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(
            r"but got <class '([\w.]+)'>", text
        )
        if found is None or not isinstance(e, pickle.UnpicklingError):
            # torch's own text for a corrupt file only talks about weights_only: keep the type alone
            why = f"not a readable torch checkpoint ({type(e).__name__}); is it a file written by torch.save?"
            raise CheckpointError(f"cannot read checkpoint {p}: {why}") from None
        if _TRUSTED:
            return _load_pickled(p)
        raise CheckpointError(
            f"cannot read checkpoint {p}: it holds a pickled {found.group(1)}, which mtpd never unpickles (loading "
            "it could run code); re-save only its state dict, or pass --trust-checkpoint if you trust its source"
        ) from None


def _load_pickled(p: Path) -> Any:
    warnings.warn(f"{p}: loading it with full unpickling (--trust-checkpoint)", stacklevel=3)
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - same advice for every unreadable file
        raise CheckpointError(f"cannot read checkpoint {p}: {_first_line(e)}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (checkpoint identities in stores and manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename (atomic on one file system)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, p)


def split_state_dict(obj: Any, source: str | os.PathLike = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict, metadata) from a raw state dict or a dict holding ``model`` / ``state_dict``.

    A ``module.`` prefix left by DistributedDataParallel is removed; torch's per-module
    version metadata is kept (old torchvision heads rename keys on load by it).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict or a dict with 'model'/'state_dict', got {type(obj).__name__}"
        )
    meta: dict[str, Any] = {}
    sd: Any = obj
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            sd = obj[key]
            meta = {k: v for k, v in obj.items() if k != key}
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: no tensors found; expected a state dict or a dict with 'model'/'state_dict'")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    out: OrderedDict[str, Tensor] = OrderedDict(tensors)
    if hasattr(sd, "_metadata"):
        out._metadata = sd._metadata  # type: ignore[attr-defined]
    return out, meta


def load_state_dict(path: str | os.PathLike, *, mmap: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``split_state_dict(load(path))``: the weights in a file and whatever travels beside them."""
    return split_state_dict(load(path, mmap=mmap), path)
