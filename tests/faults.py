"""Teachers that fail on purpose, for fault-injection tests (imported by Ray workers through PYTHONPATH)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from mtpd.teachers.registry import build_teacher


class CrashOnce:
    """Delegates to a real teacher; the first forward anywhere kills its process (a lost Ray worker)."""

    def __init__(self, inner, marker: Path) -> None:
        self.inner, self.marker = inner, marker
        self.identity = inner.identity

    def output_specs(self):
        return self.inner.output_specs()

    def to(self, device):
        self.inner.to(device)
        return self

    def __call__(self, images, outputs):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL)  # only the first caller anywhere crashes
        except FileExistsError:
            return self.inner(images, outputs)
        os.close(fd)
        os._exit(1)


def crash_once_teacher(weights: str = "none", num_classes: int | None = None) -> CrashOnce:
    inner = build_teacher("retinanet_tiny", weights=weights, num_classes=num_classes)
    return CrashOnce(inner, Path(os.environ["MTPD_TEST_CRASH_MARKER"]))


class Slow(CrashOnce):
    """Delegates to a real teacher, one forward at a time per process and 1 s each: a build long enough to be
    killed mid-way, whose actors still have shards in flight when their first one lands."""

    _lock = threading.Lock()

    def __init__(self, inner) -> None:
        self.inner = inner
        self.identity = inner.identity

    def __call__(self, images, outputs):
        with self._lock:
            time.sleep(1.0)
            return self.inner(images, outputs)


def slow_teacher(weights: str = "none", num_classes: int | None = None) -> Slow:
    return Slow(build_teacher("retinanet_tiny", weights=weights, num_classes=num_classes))
