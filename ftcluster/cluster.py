"""Joining a Ray cluster for the driver: the one named, a running local one, or a new local one; then waiting
(boundedly) until it holds the run's workers."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ftcluster import preflight
from ftcluster.config import ConfigError, RunConfig

CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")
"""Where `ray start` records the local cluster's GCS address, which ``ray.init()`` with no address joins."""


def _answers(address: str, timeout_s: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def join(cfg: RunConfig) -> bool:
    """``ray.init`` for the driver. With no ``ray.address`` and no RAY_ADDRESS, a cluster recorded on this host is
    joined only if it answers within seconds: a stale record (a cluster that died) would otherwise make Ray wait
    minutes for it. Returns whether the driver started a cluster of its own (nothing else will join it)."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address is None and CURRENT_CLUSTER_FILE.exists():
        recorded = CURRENT_CLUSTER_FILE.read_text().strip()
        if recorded and not _answers(recorded):
            print(f"ftcluster: the Ray cluster recorded in {CURRENT_CLUSTER_FILE} ({recorded}) does not answer; "
                  "starting a local one (set ray.address to join a cluster)", flush=True)
            address = "local"
    started = address == "local" or (address is None and not CURRENT_CLUSTER_FILE.exists())
    ray.init(address=address, log_to_driver=True)
    return started


def wait_for_resources(cfg: RunConfig, use_gpu: bool, own_cluster: bool) -> None:
    """Refuse a run the cluster cannot hold, naming the fields and what the cluster has. A cluster the driver
    joined may be growing (an autoscaler): it gets ``ray.resources_wait_s`` to show the resources first; one the
    driver started itself is judged at once."""
    import ray

    deadline = time.monotonic() + (0 if own_cluster else cfg.ray.resources_wait_s)
    said = False
    while True:
        problem = preflight.check_cluster(cfg, use_gpu, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise ConfigError(problem)
        if not said:
            print(f"ftcluster: waiting up to {cfg.ray.resources_wait_s:g} s for the cluster: {problem}", flush=True)
            said = True
        time.sleep(2.0)
