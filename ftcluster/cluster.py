"""Joining a Ray cluster for the driver: the one named, a running local one, or a new local one; then waiting
(boundedly) until it holds the run's workers."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ftcluster import patches
from ftcluster.config import ConfigError, RunConfig


def current_cluster_file() -> Path:
    """Where `ray start` records the local cluster's GCS address, which ``ray.init()`` with no address joins (Ray's
    own rule: under RAY_TMPDIR, else TMPDIR, else /tmp)."""
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(tmp) / "ray" / "ray_current_cluster"


def _answers(address: str, timeout_s: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def live_recorded() -> str | None:
    """The address of the cluster `ray start` recorded on this host, if it answers."""
    record = current_cluster_file()
    recorded = record.read_text().strip() if record.exists() else ""
    return recorded if recorded and _answers(recorded) else None


def join(cfg: RunConfig) -> bool:
    """``ray.init`` for the driver. With no ``ray.address`` and no RAY_ADDRESS, a cluster recorded on this host is
    joined only if it answers within seconds: a stale record (a cluster that died) would otherwise make Ray wait
    minutes for it. Returns whether the driver started a cluster of its own (nothing else will join it)."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    record = current_cluster_file()
    if address is None and record.exists():
        recorded = record.read_text().strip()
        if recorded and not _answers(recorded):
            print(f"ftcluster: the Ray cluster recorded in {record} ({recorded}) does not answer; "
                  "starting a local one (set ray.address to join a cluster)", flush=True)
            address = "local"
    if address == "local" or (address is None and not record.exists()):
        try:
            start_local()
        except Exception as e:  # noqa: BLE001 - every way Ray's own start fails (a timeout under load, its temp dir)
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"Ray's local cluster did not start ({type(e).__name__}: {first[:300]}). A host under heavy load can "
                "keep Ray's processes from starting within Ray's 30 s; so can an unusable temp directory "
                "(RAY_TMPDIR, else /tmp). Try again, start one yourself (`ray start --head`, then ray.address=auto), "
                "or train in this process without Ray (ray.local_mode=true, one worker).") from None
        return True
    named = address not in (None, "auto")
    if named and not _answers(address.split("://", 1)[-1], timeout_s=10.0):
        # Ray itself would retry for minutes, printing a warning every few seconds.
        field = "ray.address" if cfg.ray.address else "RAY_ADDRESS (the environment's)"
        raise ConfigError(f"{field}={address}: nothing answers there within 10 s (no Ray head at that host and "
                          "port, or a firewall between): start the cluster (`ray start --head` on its head node "
                          "prints the address), or unset it to start a local one")
    ray.init(address=address, log_to_driver=True)
    return False


def free_port() -> int:
    """A TCP port free on this host now (for a local cluster's GCS, or torch.distributed's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local(**init_kwargs) -> None:
    """A new local cluster whose processes find it, not the one `ray start` recorded on this host."""
    patches.start_local_ray_cluster(free_port(), **init_kwargs)


def wait_for_resources(cfg: RunConfig, use_gpu: bool, own_cluster: bool) -> None:
    """Refuse a run the cluster cannot hold, naming the fields and what the cluster has. A cluster the driver
    joined may be growing (an autoscaler): it gets ``ray.resources_wait_s`` to show the resources first; one the
    driver started itself is judged at once."""
    import ray

    deadline = time.monotonic() + (0 if own_cluster else cfg.ray.resources_wait_s)
    said = False
    while True:
        problem = check_cluster(cfg, use_gpu, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise ConfigError(problem)
        if not said:
            print(f"ftcluster: waiting up to {cfg.ray.resources_wait_s:g} s for the cluster: {problem}", flush=True)
            said = True
        time.sleep(2.0)


def worker_bundle(cfg: RunConfig, use_gpu: bool) -> dict[str, float]:
    """The resources one worker asks Ray for."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if use_gpu else {}), **s.resources_per_worker}


def check_cluster(cfg: RunConfig, use_gpu: bool, nodes: list[dict[str, float]]) -> str | None:
    """Why the cluster (each node's total resources) cannot hold the run's workers, or None. Ray would otherwise
    retry starting the worker group for as long as it is let, a traceback a minute. An elastic run
    (scaling.min_workers) starts on as few as min_workers, and grows when the cluster does."""
    bundle, n = worker_bundle(cfg, use_gpu), cfg.scaling.min_workers or cfg.scaling.num_workers
    fields = {"CPU": "scaling.cpus_per_worker", "GPU": "scaling.gpus_per_worker"}
    have = {k: sum(node.get(k, 0.0) for node in nodes) for k in bundle}
    if use_gpu and have.get("GPU", 0) == 0:
        return (f"the Ray cluster has no GPU over its {len(nodes)} node(s) (scaling.use_gpu="
                f"{str(cfg.scaling.use_gpu).lower()}): set scaling.use_gpu=false to train on CPUs, or join a "
                "cluster with GPUs")
    for k, per in bundle.items():
        if per * n > have[k] + 1e-9:
            field = fields.get(k, f"scaling.resources_per_worker.{k}")
            count = f"scaling.min_workers={n}" if cfg.scaling.min_workers else f"scaling.num_workers={n}"
            return (f"{count} x {field}={per:g} needs {per * n:g} {k}, and the Ray cluster has "
                    f"{have[k]:g} over {len(nodes)} node(s); lower scaling.num_workers or {field}, or add nodes")
    fits = [node for node in nodes if all(node.get(k, 0.0) + 1e-9 >= per for k, per in bundle.items())]
    if not fits:
        return (f"no node of the Ray cluster can hold one worker ({bundle}); its nodes have "
                f"{[{k: node.get(k, 0.0) for k in bundle} for node in nodes]}: lower scaling.cpus_per_worker, "
                "scaling.gpus_per_worker or scaling.resources_per_worker")
    return None
