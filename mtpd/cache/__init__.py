"""Teacher stores: the format (schema, encoding, rows), Zarr I/O (store), the Ray builder (build),
info/verify (inspect).

Import the builder from ``mtpd.cache.build``: it pulls in Ray and the teachers,
which readers of stores (the trainer) do not need.
"""

from mtpd.cache.schema import FORMAT_VERSION, PRECISIONS, Precision, StoreError, StoreHeader, get_precision
from mtpd.cache.store import StoreReader, open_store

__all__ = [
    "FORMAT_VERSION",
    "PRECISIONS",
    "Precision",
    "StoreError",
    "StoreHeader",
    "StoreReader",
    "get_precision",
    "open_store",
]
