"""A build that loses a worker node, in a process of its own (the test session's Ray stays untouched).

    python tests/node_loss_run.py ANN IMAGES WEIGHTS OUT

Starts a Ray cluster on loopback (a head without CPUs and two one-CPU worker nodes), builds a lossless store with
two actors of a slow teacher (``faults:slow_teacher``), and once the first shard has landed adds a spare node and
removes the first worker node (its raylet and worker processes die with it, and with them one of the actors).
Prints the build's report as JSON; ``tests/test_cache.py`` checks it and the store.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


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
        cluster.add_node(num_cpus=1)  # where the replacement actor can start
        # Each one-CPU node holds one of the two one-CPU actors (the head has no CPU): this kills exactly one.
        lost.append(nodes[0].unique_id)
        cluster.remove_node(nodes[0], allow_graceful=False)

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
