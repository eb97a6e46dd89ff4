"""Convergence to Ceph: the convergence benchmark with the sandbox's real RBD store, `ceph`,
as the one target (bench_convergence.measure). A copy to RBD writes the image into the pool
and Glance then snapshots and protects it: slower per copy than a file store, with the same
requests on imagesync's side."""

from __future__ import annotations

from bench.bench_convergence import measure
from bench.common import Section


def run() -> Section:
    return measure(["ceph"], "Convergence to Ceph RBD",
                   "(the sandbox's one-OSD Ceph cluster, bluestore on a sparse file, pool "
                   "`images`) (`python bench/bench_convergence_ceph.py`).")


if __name__ == "__main__":
    print(run().markdown())
