"""The Ray instance a build starts for itself: loopback only, and quiet.

A local instance has no reason to be reachable from the network, so every Ray
process it starts (GCS, raylet, workers, object manager, runtime-env agent) binds
to 127.0.0.1; the dashboard is off. Ray turns a loopback ``_node_ip_address`` back
into the machine's address; what it honours is its single-machine mode (the one it
uses on macOS and Windows), which ``_loopback_only`` switches on for this start
only. Ray's start-up lines (token authentication, ports) go to Ray's session logs,
not the terminal, unless ``verbose``. Joining a cluster
(``--address``) is different: that cluster was started by ``ray start`` with the
addresses its operator chose, and mtpd only connects to it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import ray

_SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(num_cpus: int, verbose: bool = False, **init_kwargs) -> None:
    """``ray.init`` of a single-machine instance bound to loopback; start-up noise hidden unless ``verbose``.
    ``address="local"``: a new instance always, never the one ``/tmp/ray/ray_current_cluster`` names (a cluster
    started on the machine by ``ray start``, or one whose processes died and left the file behind, which
    ``ray.init()`` would try to join and refuse because of ``num_cpus``)."""
    quiet = contextlib.nullcontext() if verbose else _silenced()
    with quiet, _loopback_only():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=verbose,
            **init_kwargs,
        )


def ensure_ray(address: str | None, workers: int, verbose: bool = False) -> bool:
    """Start a local Ray instance unless one is running or an address is given; True if started here."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(max(workers, os.cpu_count() or 1), verbose)
    return True


@contextlib.contextmanager
def _loopback_only():
    """Ray's single-machine mode while a local instance starts: its node address is loopback, so every
    server binds there. The environment variable reaches the processes the start spawns (GCS, raylet, and
    through it the workers); the constant is what this process's ``get_node_ip_address`` reads. Both are
    restored afterwards, so joining a cluster later in this process works as usual."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_SINGLE_MACHINE_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE_VAR, None)
        else:
            os.environ[_SINGLE_MACHINE_VAR] = saved_env


@contextlib.contextmanager
def _silenced():
    """Redirect this process's stdout and stderr (file descriptors too: Ray's C++ parts write to them)."""
    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush()
    sys.stderr.flush()
    with (
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
