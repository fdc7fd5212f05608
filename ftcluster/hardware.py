"""What a run will run on, as far as its plan needs to know: where the workers compute, how much memory their GPUs
have, which optional kernels this installation has, and whether there is a Ray cluster for the driver to join.
Facts only; ``ftcluster.plan`` makes the decisions from them."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ftcluster.config import RunConfig


@dataclass(frozen=True)
class Hardware:
    device: str
    """Where the workers compute: ``cuda`` or ``cpu``."""
    device_source: str
    """How ``device`` was found, for the plan's reason."""
    gpu_memory_gib: float | None = None
    """Memory of each worker's GPU: ``resources.gpu_memory_gib``, else the smallest GPU NVML shows on this host (or,
    once a Ray cluster is joined, on its GPU nodes)."""
    gpu_memory_source: str | None = None
    """Where ``gpu_memory_gib`` came from, for the lines that print it (the fit verdict, its refusal)."""
    liger_installed: bool = False
    varlen_kernel: bool = False
    """torch ships the variable-length flash-attention kernel (``torch.nn.attention.varlen``)."""
    ray_cluster: str | None = None
    """A Ray cluster the driver would join (RAY_ADDRESS, one this process started, or a live one `ray start`
    recorded on this host), described; None when there is none."""
    cpu_bf16: bool = True
    """This host's CPUs compute bfloat16 natively (AVX512-BF16 or AMX); most others emulate it, many times slower."""
    host_memory_gib: float | None = None
    """Memory available now on the host the workers run on: this one (no Ray cluster to join), else the smallest of
    the Ray cluster's nodes that answered once joined; None before a cluster is joined."""
    gpus_per_host: int | None = None
    """The most GPUs one of a joined Ray cluster's nodes has: as many workers may share its host memory. None where
    the workers run on this host (all of them share it)."""
    host_memory_source: str = "this host"
    """Whose ``host_memory_gib`` it is, for the lines that print it."""

    @classmethod
    def gpu(cls, gpu_memory_gib: float | None = None, liger_installed: bool | None = None) -> "Hardware":
        """A GPU machine, for planning a run elsewhere (the estimator, ``python -m ftcluster plan --device cuda``);
        the optional kernels as installed here unless said."""
        return cls(device="cuda", device_source="assumed", gpu_memory_gib=gpu_memory_gib,
                   gpu_memory_source="given" if gpu_memory_gib else None,
                   liger_installed=liger_installed if liger_installed is not None else liger_here(),
                   varlen_kernel=varlen_kernel_here())


def liger_here() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def varlen_kernel_here() -> bool:
    """Whether this torch has its varlen flash attention (``torch.nn.attention.varlen``, which holds
    ``varlen_attn``). Found, not imported: importing it imports TorchDynamo, the largest import of the driver's checks,
    which a driver whose workers run elsewhere, or ``ftcluster plan``, never needs (ftcluster/attention.py imports
    it where it runs)."""
    try:
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ImportError:
        return False


def cpu_bf16_here() -> bool:
    """Whether this host's CPUs have bfloat16 instructions (Linux's /proc/cpuinfo flags; assumed elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def visible_gpu_memory_gib() -> float | None:
    """The smallest GPU this host can see, by NVML (None without GPUs or a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        sizes = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total for i in range(n)]
    except Exception:  # noqa: BLE001 - no NVML, no driver, no GPU: the same answer
        return None
    return min(sizes) / 2**30 if sizes else None


def available_host_memory_gib() -> float | None:
    """Memory this host has available now (Linux's MemAvailable: free, and caches it can drop), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def ray_cluster_to_join(cfg: RunConfig) -> str | None:
    """The Ray cluster this driver would join, described, or None: ``ray.address``, RAY_ADDRESS, one started in
    this process, or a live one `ray start` recorded on this host (a stale record, left by a cluster that died, is
    no cluster). Ray is not imported to find out (0.3 s)."""
    from ftcluster import cluster

    if cfg.ray.address:
        return f"ray.address={cfg.ray.address}"
    if os.environ.get("RAY_ADDRESS"):
        return f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return "the Ray cluster this process already joined"
    recorded = cluster.live_recorded()
    return f"the Ray cluster `ray start` recorded on this host ({recorded})" if recorded else None


def here(cfg: RunConfig) -> Hardware:
    """This host, as the driver sees it before any cluster is joined: its GPUs (or ``scaling.use_gpu``), its
    installed kernels, and the cluster it would join."""
    use_gpu = cfg.scaling.use_gpu
    if use_gpu is None:
        import torch

        device, source = ("cuda" if torch.cuda.is_available() else "cpu"), "this host"
    else:
        device, source = ("cuda" if use_gpu else "cpu"), f"scaling.use_gpu={str(use_gpu).lower()}"
    joins = ray_cluster_to_join(cfg)
    given, visible = cfg.resources.gpu_memory_gib, None if cfg.resources.gpu_memory_gib else visible_gpu_memory_gib()
    return Hardware(device=device, device_source=source, gpu_memory_gib=given or visible,
                    gpu_memory_source="resources.gpu_memory_gib" if given else
                    "the smallest GPU NVML shows on this host" if visible else None,
                    liger_installed=liger_here(), varlen_kernel=varlen_kernel_here(),
                    ray_cluster=joins, cpu_bf16=cpu_bf16_here(),
                    host_memory_gib=None if joins else available_host_memory_gib())


def _node_memory() -> dict:
    """On a node: the smallest of its GPUs' memory (NVML), and the host memory it has available now."""
    return {"gpu_memory_gib": visible_gpu_memory_gib(), "host_memory_gib": available_host_memory_gib()}


def node_memory(timeout_s: float = 30.0) -> list[dict]:
    """The memory of the joined Ray cluster's GPU nodes, each from a task pinned to the node (it takes no CPU, so it
    waits for none): ``{"gpu_memory_gib", "host_memory_gib", "gpus"}`` per node that answered within
    ``timeout_s``. Nodes an autoscaler has not started yet are not among them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    probe = ray.remote(num_cpus=0)(_node_memory)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote():
            n["Resources"].get("GPU", 0) for n in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in late:
        ray.cancel(ref, force=True)
    out = []
    for ref in ready:
        try:
            out.append({**ray.get(ref), "gpus": int(refs[ref])})
        except Exception:  # noqa: BLE001 - a node that cannot answer leaves its memory unknown, as before
            continue
    return out


def on_ray_cluster(cfg: RunConfig, hw: Hardware, resources: dict[str, float]) -> Hardware:
    """``hw`` once the driver has joined a Ray cluster: its workers compute where the cluster has GPUs (unless
    ``scaling.use_gpu`` says)."""
    if cfg.scaling.use_gpu is not None:
        return hw
    has_gpus = resources.get("GPU", 0) > 0
    return replace(hw, device="cuda" if has_gpus else "cpu",
                   device_source="the Ray cluster's resources" + ("" if has_gpus else " (no GPU)"))


def with_node_memory(cfg: RunConfig, hw: Hardware, nodes: list[dict]) -> Hardware:
    """``hw`` with the memory of the Ray cluster's GPU nodes (``node_memory``), the smallest of each:
    ``resources.gpu_memory_gib`` still wins. As the driver found it where no node answered (none started yet)."""
    gpus = [n["gpu_memory_gib"] for n in nodes if n.get("gpu_memory_gib")]
    hosts = [n["host_memory_gib"] for n in nodes if n.get("host_memory_gib") is not None]
    if not hosts:
        return hw
    if cfg.resources.gpu_memory_gib:
        hw = replace(hw, gpu_memory_gib=cfg.resources.gpu_memory_gib, gpu_memory_source="resources.gpu_memory_gib")
    elif gpus:
        hw = replace(hw, gpu_memory_gib=min(gpus),
                     gpu_memory_source=f"the smallest GPU NVML shows on the Ray cluster's {len(nodes)} GPU node(s)")
    return replace(hw, host_memory_gib=min(hosts), gpus_per_host=max(n["gpus"] for n in nodes),
                   host_memory_source=f"the smallest of the Ray cluster's {len(nodes)} GPU node(s)")
