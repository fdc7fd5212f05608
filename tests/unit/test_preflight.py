"""The driver says whether a run fits its GPUs before taking any: the memory estimator on the run's own config."""

import re
import subprocess
import sys
from dataclasses import replace

import pytest

from ftcluster import cluster, estimate, plan, preflight
from ftcluster import config as C
from ftcluster.hardware import Hardware


def fit(cfg, force=False, hw=None):
    """The driver's fit check of ``cfg`` on GPUs of ``resources.gpu_memory_gib`` (the data source unread)."""
    hw = hw or Hardware.gpu(cfg.resources.gpu_memory_gib, liger_installed=False)
    return preflight.check_fit(cfg, plan.make(cfg, hw, read_data=False), hw, force)


def test_a_run_that_fits_is_let_through_and_says_its_figure():
    cfg = C.load("configs/llama2_7b_qlora.yaml", ["resources.gpu_memory_gib=80"])
    line = fit(cfg)
    planned = plan.make(cfg, Hardware.gpu(80, liger_installed=False), read_data=False)
    need = estimate.estimate(plan.architecture(cfg).shape, plan.estimator_run(cfg, planned)).need / estimate.GiB
    assert f"memory: {need:.1f} GiB estimated per GPU" in line and line.endswith("of 80.0 GiB (given): fits")


def test_the_fit_verdict_and_its_refusal_name_where_the_gpus_memory_came_from():
    """The GPUs' memory is the setting's, this host's NVML or a joined Ray cluster's GPU nodes': the lines say which,
    so a verdict made on a head node's view of the cluster can be told from one made on the GPUs themselves."""
    from ftcluster import hardware

    cfg = C.load("configs/llama2_7b_qlora.yaml", ["scaling.use_gpu=true"])
    assert "(resources.gpu_memory_gib): fits" in fit(
        cfg, hw=hardware.here(C.load("configs/llama2_7b_qlora.yaml", ["scaling.use_gpu=true",
                                                                       "resources.gpu_memory_gib=80"])))
    nodes = [{"gpu_memory_gib": 79.1, "host_memory_gib": 900.0, "gpus": 8},
             {"gpu_memory_gib": 5.5, "host_memory_gib": 400.0, "gpus": 2}]
    joined = hardware.with_node_memory(cfg, Hardware(device="cuda", device_source="test"), nodes)
    assert joined.gpu_memory_gib == 5.5
    with pytest.raises(C.ConfigError, match=r"its GPUs have 5.5 \(the smallest GPU NVML shows on the Ray cluster's "
                                            r"2 GPU node\(s\)\)"):
        fit(cfg, hw=joined)
    # The setting still wins over the nodes, and says so.
    given = C.load("configs/llama2_7b_qlora.yaml", ["scaling.use_gpu=true", "resources.gpu_memory_gib=80"])
    kept = hardware.with_node_memory(given, hardware.here(given), nodes)
    assert kept.gpu_memory_gib == 80 and "(resources.gpu_memory_gib): fits" in fit(given, hw=kept)


def test_a_run_that_does_not_fit_is_refused_with_the_cheapest_fix_in_config_terms():
    cfg = C.load("configs/llama2_7b_lora.yaml", ["resources.gpu_memory_gib=14"])
    with pytest.raises(C.ConfigError, match=r"needs about \d+\.\d GiB per GPU and its GPUs have 14\.0.*cheapest change"
                                            r".*--force") as e:
        fit(cfg)
    # The fix is named as the overrides that make it, and they do make it fit.
    fix = str(e.value).split("cheapest change that fits: ", 1)[1].split(") -> ")[0].split("(", 1)[1].split()
    fixed = C.load("configs/llama2_7b_lora.yaml", ["resources.gpu_memory_gib=14", *fix])
    assert fit(fixed).endswith(": fits")
    assert "does NOT fit" in fit(cfg, force=True)
    assert "does NOT fit" in fit(cfg.model_copy(update={"resources": C.ResourcesConfig(
        gpu_memory_gib=14, check_fit=False)}))


def test_a_hub_4bit_70b_under_zero3_fits_24_gib_gpus_once_downloaded_it_loads_partitioned(tmp_path):
    """A hub id loaded whole onto each GPU (37 GiB at 70B) once refused this run; downloaded by the driver to a
    snapshot it loads as a local checkpoint does, a share on each GPU."""
    cfg = C.load("configs/llama3_70b_qlora.yaml", ["resources.gpu_memory_gib=24", "scaling.num_workers=16",
                                                   f"output.storage_path={tmp_path}"])
    assert "fits" in fit(cfg)
    planned = plan.make(cfg, Hardware.gpu(24), read_data=False)
    assert planned.model_download == str(tmp_path.resolve() / ".hub") == cfg.model.hub_cache
    assert "downloads its safetensors snapshot once" in planned.reasons["model_download"]


def test_cpu_runs_and_unknown_gpus_are_not_refused():
    tiny_cpu = C.load("configs/tiny_cpu.yaml")
    assert "CPU run" in fit(tiny_cpu, hw=Hardware(device="cpu", device_source="test"))
    # A driver host without GPUs and no resources.gpu_memory_gib: the GPUs' memory is not known.
    assert "fit not checked" in fit(C.load("configs/llama2_7b_qlora.yaml"), hw=Hardware.gpu(None))


def test_the_trainer_refuses_before_ray_and_leaves_no_run_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ftcluster.train", "--config", "configs/smollm2_135m_lora.yaml",
                           "resources.gpu_memory_gib=1", "scaling.use_gpu=true", "ray.local_mode=false",
                           f"output.storage_path={tmp_path}", "output.name=refused"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "per GPU and its GPUs have 1.0" in proc.stderr, proc.stderr[-2000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "refused").exists()


def test_a_cluster_too_small_for_the_workers_is_named_with_the_fields_to_change():
    cfg = C.load("configs/llama2_7b_qlora.yaml", ["scaling.num_workers=16", "scaling.resources_per_worker={nvme: 1}"])
    nodes = [{"CPU": 64.0, "GPU": 8.0, "nvme": 8.0}, {"CPU": 64.0, "GPU": 8.0, "nvme": 8.0}]
    assert cluster.check_cluster(cfg, True, nodes) is None
    short = cluster.check_cluster(cfg, True, nodes[:1])
    assert "scaling.num_workers=16 x scaling.gpus_per_worker=1 needs 16 GPU" in short and "has 8" in short
    assert "resources_per_worker.nvme" in cluster.check_cluster(cfg, False, [{"CPU": 64.0, "nvme": 1.0}] * 2)
    # An elastic run starts on as few as its min_workers, and grows when the cluster does.
    elastic = C.load("configs/llama2_7b_qlora.yaml", ["scaling.num_workers=16", "scaling.min_workers=8",
                                                      "ray.max_failures=-1"])
    assert cluster.check_cluster(elastic, True, nodes[:1]) is None
    assert "scaling.min_workers=8 x scaling.gpus_per_worker=1 needs 8 GPU" in cluster.check_cluster(
        elastic, True, [{"CPU": 64.0, "GPU": 4.0}])
    huge = C.load("configs/llama2_7b_qlora.yaml", ["scaling.num_workers=1", "scaling.cpus_per_worker=100"])
    assert "no node of the Ray cluster can hold one worker" in cluster.check_cluster(huge, True, nodes)


@pytest.mark.parametrize("dont_write", [True, False])
def test_the_trainer_says_when_python_caches_no_bytecode(dont_write):
    """PYTHONDONTWRITEBYTECODE (set by many container images) makes every start compile torch and transformers from
    source: the trainer says so, and says nothing where bytecode is cached."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if dont_write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    out = subprocess.run([sys.executable, "-c", "from ftcluster.train import bytecode_note; print(bytecode_note())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    if dont_write:
        assert "PYTHONDONTWRITEBYTECODE is set" in out and "unset it" in out
    else:
        assert out == "None"


def test_a_bfloat16_run_on_a_cpu_without_bfloat16_is_told_so_at_start():
    cpu = Hardware(device="cpu", device_source="test", cpu_bf16=False)
    gpu_recipe = C.load("configs/smollm2_135m_lora.yaml")
    (note,) = preflight.notes(gpu_recipe, plan.make(gpu_recipe, cpu, read_data=False), cpu)
    assert "no bfloat16 instructions" in note and "model.dtype=float32" in note
    cpu_recipe = C.load("configs/smollm2_135m_lora_cpu.yaml")
    assert preflight.notes(cpu_recipe, plan.make(cpu_recipe, cpu, read_data=False), cpu) == []
    assert preflight.notes(gpu_recipe, plan.make(gpu_recipe, Hardware.gpu(), read_data=False), Hardware.gpu()) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible here")
def test_a_gpu_run_where_no_gpu_is_visible_says_so_and_names_use_gpu(tiny_model, tmp_path):
    cfg = C.load("configs/tiny_cpu.yaml", [f"model.name_or_path={tiny_model}", "model.random_init=false",
                                           "model.config_overrides={}", "scaling.num_workers=1",
                                           "scaling.use_gpu=true", f"output.storage_path={tmp_path}"])
    p = plan.make(cfg, Hardware(device="cuda", device_source="scaling.use_gpu=true"), read_data=False)
    assert p.in_process and p.device == "cuda"
    with pytest.raises(C.ConfigError, match=r"scaling.use_gpu=true, and this host has no GPU that torch can see.*"
                                            r"set scaling.use_gpu=false"):
        preflight.check_device(cfg, p)
    # On a Ray cluster without GPUs, the same field, not gpus_per_worker.
    no_gpus = cluster.check_cluster(cfg, True, [{"CPU": 8.0}, {"CPU": 8.0}])
    assert "the Ray cluster has no GPU over its 2 node(s)" in no_gpus and "scaling.use_gpu=false" in no_gpus


def test_rows_too_long_to_fit_are_refused_naming_the_longest_length_that_fits():
    rope = "{rope_parameters: {rope_type: yarn, factor: 128.0, original_max_position_embeddings: 4096}}"
    cfg = C.load("configs/llama2_7b_qlora.yaml", ["resources.gpu_memory_gib=80", "data.max_seq_len=524288",
                                                  f"model.config_overrides={rope}"])
    with pytest.raises(C.ConfigError, match=r"data.max_seq_len=\d+, the longest rows that fit") as e:
        fit(cfg)
    longest = int(re.search(r"data.max_seq_len=(\d+), the longest", str(e.value)).group(1))
    assert longest % 256 == 0 and fit(C.load("configs/llama2_7b_qlora.yaml", [
        "resources.gpu_memory_gib=80", f"data.max_seq_len={longest}", f"model.config_overrides={rope}"])).endswith(
        ": fits")
    assert "does NOT fit" in fit(C.load("configs/llama2_7b_qlora.yaml", [
        "resources.gpu_memory_gib=80", f"data.max_seq_len={longest + 256}", f"model.config_overrides={rope}"]),
        force=True)


def test_offloaded_checkpoints_the_host_cannot_hold_are_refused_naming_the_longest_rows_that_fit():
    # Llama-3-8B at 360,448 tokens: 32 layers x 2 x 4096 bytes a token = 88 GiB of pinned host memory a worker.
    yarn = ("model.config_overrides={rope_parameters: {rope_type: yarn, factor: 44.0, "
            "original_max_position_embeddings: 8192, rope_theta: 500000}}")
    cfg = C.load(None, ["model.name_or_path=meta-llama/Meta-Llama-3-8B", "method=qlora", yarn,
                        "model.gradient_checkpointing=true", "model.activation_offloading=true",
                        "data.max_seq_len=360448", "resources.gpu_memory_gib=80"])

    def host(gib, c=cfg, force=False):
        hw = Hardware(device="cuda", device_source="test", gpu_memory_gib=80, host_memory_gib=gib)
        return preflight.check_host_memory(c, plan.make(c, hw, read_data=False), hw, force)

    assert host(124) == "host memory: offloaded checkpoints 88.0 GiB for 1 worker(s) of the 124.0 GiB available on this host"
    with pytest.raises(C.ConfigError) as refused:
        host(64)
    # 90% of 64 GiB holds 57.6 GiB of checkpoints: 235,929 tokens, 235,776 in multiples of 256.
    assert "88.0 GiB for the 1 worker(s) on one host at data.max_seq_len=360448, and this host has 64.0" in str(
        refused.value)
    assert "Lower data.max_seq_len to 235776," in str(refused.value)
    with pytest.raises(C.ConfigError, match="176.0 GiB for the 2 worker"):  # two workers on one host: twice
        host(124, cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 2})}))
    assert "started anyway" in host(64, force=True)
    off = cfg.model_copy(update={"model": cfg.model.model_copy(update={"activation_offloading": False})})
    assert host(8, off) is None  # nothing offloaded: nothing to check
    unknown = Hardware(device="cuda", device_source="test", gpu_memory_gib=80)  # a cluster's hosts: not known here
    assert preflight.check_host_memory(cfg, plan.make(cfg, unknown, read_data=False), unknown) is None
    # A joined Ray cluster's nodes of 4 GPUs each: 4 of 8 workers share a node's memory.
    eight = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 8})})
    nodes = Hardware(device="cuda", device_source="test", gpu_memory_gib=80, host_memory_gib=500, gpus_per_host=4,
                     host_memory_source="the smallest of the Ray cluster's 2 GPU node(s)")
    with pytest.raises(C.ConfigError, match=r"352.0 GiB for the 4 worker\(s\) on one host .* and the smallest of the "
                                            r"Ray cluster's 2 GPU node\(s\) has 300.0 GiB"):
        preflight.check_host_memory(eight, plan.make(eight, nodes, read_data=False),
                                    replace(nodes, host_memory_gib=300))
    assert "352.0 GiB for 4 worker(s) of the 500.0 GiB available on the smallest" in preflight.check_host_memory(
        eight, plan.make(eight, nodes, read_data=False), nodes)
    halves = eight.model_copy(update={"scaling": eight.scaling.model_copy(update={"gpus_per_worker": 0.5})})
    with pytest.raises(C.ConfigError, match=r"704.0 GiB for the 8 worker\(s\) on one host"):  # two to a GPU
        preflight.check_host_memory(halves, plan.make(halves, nodes, read_data=False), nodes)


def _weights(directory, shards: int = 1):
    """A real safetensors checkpoint of a few tensors in ``directory``: one file, or shards and their index."""
    import json

    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    tensors = {f"model.layers.{i}.weight": torch.randn(64, 64) for i in range(4)}
    if shards == 1:
        save_file(tensors, directory / "model.safetensors")
        return directory / "model.safetensors"
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::shards]}
        save_file(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory / file


def test_a_checkpoint_cut_short_or_missing_a_shard_is_refused_naming_the_file(tmp_path):
    """What an interrupted download leaves is found from the files' headers, before any worker fails to open it."""
    def check(directory):
        preflight.check_weights(C.load(None, [f"model.name_or_path={directory}"]))

    whole = tmp_path / "whole"
    _weights(whole)
    check(whole)  # nothing to say
    cut = _weights(tmp_path / "cut")
    cut.write_bytes(cut.read_bytes()[:-1000])
    with pytest.raises(C.ConfigError, match=re.escape(f"{cut} is cut short: ") + r".*download the model again"):
        check(tmp_path / "cut")
    last = _weights(tmp_path / "sharded", shards=3)
    check(tmp_path / "sharded")
    last.unlink()
    with pytest.raises(C.ConfigError, match=f"1 of the 3 weight files model.safetensors.index.json names are not in "
                                            f".*{last.name}"):
        check(tmp_path / "sharded")
    (tmp_path / "sharded" / last.name).write_bytes(b"<html>rate limited</html>")
    with pytest.raises(C.ConfigError, match=f"{last.name} does not start with a safetensors header"):
        check(tmp_path / "sharded")
