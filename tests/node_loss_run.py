"""A build that loses a worker node, in a process of its own (the test session's Ray stays untouched).

    python tests/node_loss_run.py ANN IMAGES WEIGHTS OUT

Starts a Ray cluster on loopback (a head without CPUs and two one-CPU worker nodes), builds a lossless store with
two actors of a slow teacher (``faults:slow_teacher``), and once the first shard has landed removes the first worker
node (its raylet and every worker process under it die at once, and with them one of the actors), then adds a spare
node for the replacement actor.
Prints the build's report as JSON; ``tests/test_cache.py`` checks it and the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (read from /proc: the workers a raylet started)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def main(ann: str, images: str, weights: str, out: str) -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])  # faults, on nodes
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from mtpd.cache.build import build_store
    from mtpd.data import ViewSpec
    from mtpd.teachers.registry import TeacherSpec

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    lost: list[str] = []

    def on_shard(shard: int, nbytes: int) -> None:
        if lost:
            return
        # Each one-CPU node holds one of the two one-CPU actors (the head has no CPU): this kills exactly one,
        # while it still has shards in flight (the slow teacher runs one forward at a time, 1 s each). A node
        # lost dies whole: its raylet and every worker under it at once, not a worker that outlives its raylet
        # long enough to deliver what it had in flight.
        doomed = _descendants(nodes[0].all_processes["raylet"][0].process.pid)
        lost.append(nodes[0].unique_id)
        cluster.remove_node(nodes[0], allow_graceful=False)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        cluster.add_node(num_cpus=1)  # where the replacement actor can start

    try:
        rep = build_store(
            TeacherSpec("faults:slow_teacher", weights),
            ann,
            images,
            out,
            views=ViewSpec(short=64, long=64, views=("orig", "hflip")),
            precision="lossless",
            workers=2,
            images_per_shard=1,  # ten shards: when the first lands, each actor still has shards to write
            progress=False,
            address=cluster.address,
            on_shard=on_shard,
        )
        print(json.dumps({"retries": rep.retries, "shards_written": rep.shards_written, "lost": lost}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
