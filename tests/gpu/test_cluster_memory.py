"""On a GPU host: a Ray cluster's node gives the driver its GPUs' memory as NVML reads it there
(hardware.node_memory), the figure the plan and the fit check then use. In a process of its own, with a Ray cluster
of its own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, ray
from ftcluster import cluster, hardware
cluster.start_local()
print(json.dumps({"nodes": hardware.node_memory(), "here": hardware.visible_gpu_memory_gib(),
                  "gpus": ray.cluster_resources().get("GPU", 0)}))
"""


def test_a_ray_clusters_gpu_node_gives_its_gpus_memory():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["here"] and len(got["nodes"]) == 1
    node = got["nodes"][0]
    assert node["gpu_memory_gib"] == pytest.approx(got["here"]) and node["gpus"] == got["gpus"] >= 1
