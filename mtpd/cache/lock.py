"""One writer per store: a lock file beside the store names the builder that writes it.

zarr loses data silently when two writers meet on one shard (zarr-python #3683), so
``mtpd-cache build`` takes ``<store>.lock`` before it touches the store and a second
builder stops with a message naming the first. The file holds the writer's host, pid,
start time and a heartbeat the writer refreshes every ``HEARTBEAT_S`` seconds. A lock is
stale, and taken over, when its process is gone (same machine: host, boot and pid namespace)
or its heartbeat is older than ``STALE_AFTER_S`` (another machine, where the process cannot
be checked; hosts sharing a store need clocks within a few minutes of each other). Readers
never look at it. Stores at fsspec URLs are not locked (object stores have no
exclusive create): give each such store one builder.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from mtpd.cache.schema import StoreError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 10 * 60.0


def lock_path(store: str | os.PathLike) -> Path:
    p = Path(store)
    return p.with_name(p.name + ".lock")


def _this_machine() -> dict:
    """What tells this host's processes apart: boot id and pid namespace (containers sharing a hostname
    and a volume differ in the second), read from /proc where it exists."""
    out = {"host": socket.gethostname()}
    try:
        out["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        out["pidns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return out


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid from the writer)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return started is None or _start_time(pid) in (None, started)


class WriterLock:
    """``with WriterLock(store):`` holds the store's write lock (StoreError if another writer holds it)."""

    def __init__(self, store: str | os.PathLike) -> None:
        self.store, self.path = str(store), lock_path(store)
        self.me = {
            **_this_machine(),
            "pid": os.getpid(),
            "pid_start": _start_time(os.getpid()),
            "started": time.time(),
            "token": uuid.uuid4().hex,
        }
        self.lost: str | None = None  # why the lock is no longer ours, when it is not
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self.me, "heartbeat": time.time()}, f)
            self._beat = threading.Thread(target=self._heartbeat, name="mtpd-store-lock", daemon=True)
            self._beat.start()
            return
        raise StoreError(f"{self.store}: could not take the write lock {self.path}; another builder keeps taking it")

    def _read(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            # Torn or unreadable: judge it by the file's age alone.
            try:
                return {"heartbeat": path.stat().st_mtime}
            except FileNotFoundError:
                return {}

    def stale(self, holder: dict) -> bool:
        """Its writer is gone: a dead (or reused) pid on this very machine, else a heartbeat too old."""
        same = all(holder.get(k) == v for k, v in _this_machine().items()) and len(_this_machine()) == 3
        if same and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"], holder.get("pid_start"))
        return time.time() - float(holder.get("heartbeat", 0)) > STALE_AFTER_S

    def _take_over_if_stale(self) -> None:
        holder = self._read(self.path)
        if not holder:
            return  # released meanwhile: try again
        if not self.stale(holder):
            age = time.time() - float(holder.get("heartbeat", 0))
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
            raise StoreError(
                f"{self.store}: another build is writing this store (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, started {started}, last heartbeat {age:.0f} s ago); let it finish or stop it, "
                f"then rerun. A lock whose writer is gone is taken over by itself; if you know it is gone, delete "
                f"{self.path}"
            )
        # Move the stale lock aside, then check it was the one judged: a rival taking over at the
        # same moment may already have put a live lock there, which goes back (never over a newer one).
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside) != holder:
            try:
                os.link(aside, self.path)  # fails if a third builder created a lock meanwhile: it keeps it
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except OSError:
                pass  # a full or flaky disk: try again at the next beat (the lock turns stale only after minutes)

    def beat(self) -> None:
        """Refresh the heartbeat if the lock is still ours (write and rename: readers never see a torn file)."""
        holder = self._read(self.path)
        if holder.get("token") != self.me["token"]:
            self.lost = (
                f"the write lock {self.path} was taken over (now held by host {holder.get('host')}, pid "
                f"{holder.get('pid')})"
            )
            self._stop.set()
            return
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self.me, "heartbeat": time.time()}))
        os.replace(tmp, self.path)

    def check(self) -> None:
        """StoreError if another builder took the lock over (this build must stop writing)."""
        if self.lost:
            raise StoreError(f"{self.store}: {self.lost}; stopping this build, its finished shards are kept")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self._read(self.path).get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)
