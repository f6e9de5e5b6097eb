"""What a build is asked to do (``BuildRequest``) and what it did (``BuildReport``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mtpd.cache.flip import FLIP_CALIBRATION
from mtpd.cache.schema import StoreHeader
from mtpd.data import ViewSpec
from mtpd.defaults import DEFAULT_PRECISION
from mtpd.teachers.registry import TeacherSpec


@dataclass
class BuildReport:
    store: str
    shards_total: int
    shards_written: int
    shards_skipped: int
    images: int
    seconds: float
    bytes_written: int
    header: StoreHeader = field(repr=False)
    shard_bytes: dict[int, int] = field(default_factory=dict, repr=False)  # shards this build wrote: bytes each
    shard_done_at: dict[int, float] = field(default_factory=dict, repr=False)  # ... and when (perf_counter)
    # In-process builds (workers 0) only: the teacher's wall seconds (shared by every store of one pass) and this
    # store's encode + write CPU seconds.
    teacher_seconds: float = 0.0
    encode_cpu_seconds: float = 0.0
    retries: int = 0  # Ray builds: shards written again after a worker, its process or its node was lost


@dataclass
class BuildRequest:
    """Everything one build is asked to do (``build_store``'s arguments, in one place)."""

    teacher: TeacherSpec
    ann: str
    images: str
    out: str
    views: ViewSpec = field(default_factory=ViewSpec)
    outputs: list[str] | None = None
    precision: str = DEFAULT_PRECISION
    batch_size: int = 2
    workers: int = 1
    images_per_shard: int = 16
    address: str | None = None
    storage_options: dict | None = None
    progress: bool = True
    on_shard: Callable[[int, int], None] | None = None
    verbose: bool = False  # the local Ray instance's start-up messages and worker logs
    repair: bool = False  # re-verify done shards and rewrite the damaged ones
    skip_bad: bool = False  # record unreadable images in the store and go on, instead of stopping
    flip_calibration: int = FLIP_CALIBRATION  # images to measure mirrored maps on (orig-only stores; 0: skip)
    # workers 0 only: called with (shard, the teacher's maps of its samples) before they are encoded (benchmarks
    # that compare codes with the float32 maps)
    on_raw: Callable[[int, list], None] | None = None
