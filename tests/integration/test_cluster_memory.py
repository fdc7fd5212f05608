"""A driver that joins a Ray cluster learns its nodes' memory from the nodes themselves (hardware.node_memory): a
Ray cluster of two nodes on this host, one of them declaring two GPUs (Ray schedules by the declaration; NVML,
which gives a GPU's memory, has no GPU to read here). In a process of its own: the test session's Ray is another."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent("""
    import json, ray
    from ray.cluster_utils import Cluster
    from ftcluster import cluster, config as C, hardware, plan, preflight

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    gpu_node = nodes.add_node(num_cpus=1, num_gpus=2)
    ray.init(address=nodes.address)
    nodes.wait_for_nodes()
    on_gpus = hardware.node_memory()
    cfg = C.load(None, ["model.name_or_path=meta-llama/Meta-Llama-3-8B", "method=qlora",
                        "model.config_overrides={rope_parameters: {rope_type: yarn, factor: 44.0, "
                        "original_max_position_embeddings: 8192, rope_theta: 500000}}",
                        "model.gradient_checkpointing=true", "model.activation_offloading=true", "data.max_seq_len=360448",
                        "resources.gpu_memory_gib=80", "scaling.num_workers=4", "scaling.use_gpu=true"])
    before = hardware.Hardware(device="cuda", device_source="test")
    hw = hardware.with_node_memory(cfg, hardware.on_ray_cluster(cfg, before, ray.cluster_resources()), on_gpus)
    try:
        line = preflight.check_host_memory(cfg, plan.make(cfg, hw, read_data=False), hw, force=True)
    except Exception as e:
        line = repr(e)
    print(json.dumps({"gpus": on_gpus, "here": hardware.available_host_memory_gib(),
                      "hw": [hw.host_memory_gib, hw.gpus_per_host, hw.host_memory_source, hw.gpu_memory_gib],
                      "line": line}))
""")


def test_a_joined_clusters_gpu_nodes_give_their_memory_and_gpu_count_to_the_host_memory_check():
    import json

    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(got["gpus"]) == 1 and got["gpus"][0]["gpus"] == 2  # the GPU node alone
    assert got["gpus"][0]["gpu_memory_gib"] is None  # no NVML here
    # The same host's memory, read a moment apart.
    assert abs(got["gpus"][0]["host_memory_gib"] - got["here"]) < 2
    host, per_host, source, gpu = got["hw"]
    assert abs(host - got["here"]) < 2 and per_host == 2 and gpu == 80
    assert source == "the smallest of the Ray cluster's 1 GPU node(s)"
    # Two of the four workers on a node: each of them keeps 88 GiB of checkpoints at this length.
    assert "176.0 GiB for the 2 worker(s) on one host" in got["line"], got["line"]
    assert "the smallest of the Ray cluster's 1 GPU node(s) has" in got["line"]
