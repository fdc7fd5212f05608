"""A model named by a hub id: the driver downloads its snapshot once, before any worker starts, into
``model.hub_cache`` on the run's storage, and a download cut off mid-file resumes from the bytes it wrote; the
workers read the snapshot there and, under ZeRO-3, each rank loads only its share of the 4-bit model (counted in
parameter bytes per rank while it loads). The hub is tests/hub.py's, on localhost."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftcluster import config as C
from ftcluster import layer_shards, models, plan as P, sources
from ftcluster.cluster import free_port
from ftcluster.hardware import Hardware
from tests import tiny
from tests.hub import FakeHub
from tests.integration.test_training import RECIPE, REPO as CHECKOUT, records
from tests.tiny import tiny_overrides

REPO_ID = "ftc-test/tiny-llama-8"
LAYERS = 8
WORLD = 2


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory):
    """A tiny Llama of 8 decoder layers: enough layers for a rank's share to be far from the whole model."""
    out = tmp_path_factory.mktemp("hub") / "tiny-llama-8"
    return tiny.build_model(out, tiny.build_tokenizer(out), layers=LAYERS)


@pytest.fixture
def hub(hub_model):
    served = FakeHub(REPO_ID, hub_model)
    yield served
    served.close()


@pytest.fixture(scope="module")
def big_hub_model(tmp_path_factory):
    """Weights of over 20 MB: huggingface_hub writes a download to disk 10 MB at a time, so half of them cut off
    leaves a partial file to resume from."""
    out = tmp_path_factory.mktemp("hub") / "tiny-llama-8-wide"
    return tiny.build_model(out, tiny.build_tokenizer(out), layers=LAYERS, hidden=384)


def _hub_env(hub: FakeHub) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    return {**env, "HF_ENDPOINT": hub.url}


@pytest.mark.slow
def test_a_hub_id_is_downloaded_once_by_the_driver_and_a_cut_off_download_resumes(ray_local, big_hub_model,
                                                                                   tmp_path):
    """huggingface_hub resumes a download whose connection stalls from the bytes it wrote (10 MB at a time), in
    the same process. Since huggingface_hub 2.x (#4228) each process downloads into a file of its own, so a new
    driver starts a file again rather than going on from a killed one's."""
    hub = FakeHub(REPO_ID, big_hub_model)
    try:
        size = len(hub.files["model.safetensors"])
        assert size > 20 * 2**20
        hub.stall = "model.safetensors"  # the first download of the weights sends half of them, then stalls
        extra = {"model.name_or_path": REPO_ID, "method": "qlora", "deepspeed.zero_stage": 3,
                 "training.max_steps": 4, "model.random_init": False, "model.config_overrides": "{}",
                 "model.gradient_checkpointing": True}
        cmd = [sys.executable, "-m", "ftcluster.train", "--config", str(RECIPE),
               *tiny_overrides(tmp_path, tmp_path, "hub-run", **extra),
               f"ray.address={ray_local.get_runtime_context().gcs_address}"]
        cache = tmp_path.resolve() / ".hub"
        env = {**_hub_env(hub), "HF_HUB_DOWNLOAD_TIMEOUT": "3"}
        done = subprocess.run(cmd, cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        hub.close()
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    # It went on from the bytes it had written; every other file was fetched once, by the driver: the two workers
    # read the snapshot (the session's Ray workers have no HF_ENDPOINT: a download of theirs would have failed).
    assert hub.gets("model.safetensors") == [None, f"bytes={10 * 2**20}-"]
    assert all(len(hub.gets(name)) <= 1 for name in hub.files if name != "model.safetensors"), hub.log
    assert f"model: {REPO_ID} from the hub into {cache} (model.hub_cache), once for every worker" in out
    blobs = list((cache / f"models--{REPO_ID.replace('/', '--')}" / "blobs").iterdir())
    assert size in {b.stat().st_size for b in blobs} and not [b for b in blobs if b.name.endswith(".incomplete")]
    run_dir = tmp_path / "hub-run"
    assert {r["world_size"] for r in records(run_dir)} == {WORLD} and records(run_dir)[-1]["step"] == 4
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["model_download"] == str(cache) and plan["frozen_base"] == "layer-shards"
    # The adapter names the hub id it was trained on, not the cache it was read from.
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == REPO_ID


class CountingShards(layer_shards.LayerShards):
    """The layer-shard partitioner, counting, each time a module arrives, the base parameter bytes this rank holds:
    the modules built and not yet handed over, and the shards kept."""

    def plan(self, model):
        self.model, self.peak = model, 0
        super().plan(model)

    def __call__(self, params, owner=""):
        built = sum(p.data.numel() * p.data.element_size() for p in self.model.parameters()
                    if not p.is_meta and p.data.numel())
        self.peak = max(self.peak, built + sum(u.shard_bytes for u in self.units))
        super().__call__(params, owner)


def _load_on_rank(rank: int, port: int, cache: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    layer_shards.MIN_OUTSIDE_BYTES = 4096  # the tiny embedding and output layer are partitioned too, as a 70B's are
    cfg = C.load(None, [f"model.name_or_path={REPO_ID}", f"model.hub_cache={cache}", "method=qlora",
                        "deepspeed.zero_stage=3", "model.gradient_checkpointing=true", f"scaling.num_workers={WORLD}",
                        "scaling.use_gpu=false"])
    plan = P.make(cfg, Hardware(device="cpu", device_source="the test"), read_data=False)
    shards = CountingShards()
    model = models.build_model(cfg, plan, torch.device("cpu"), shards)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    out[rank] = {"frozen_base": plan.frozen_base, "peak": shards.peak, "held": shards.held_bytes(),
                 "full": shards.full_bytes(), "largest_unit": max(u.full_bytes for u in shards.units),
                 "outside": sum(p.data.numel() * p.data.element_size() for p in base if p.data.numel()),
                 "source": sources.resolve_source(cfg.model)[0]}
    dist.destroy_process_group()


def test_each_rank_loads_only_its_share_of_a_hub_snapshot(hub, tmp_path):
    """From the snapshot in a prepared cache, offline: the 4-bit model is read module by module, each decoder
    layer sharded as soon as it is read. A rank's peak is its half of the model and one layer; loaded whole, as a hub
    id once was, it would be the whole model."""
    from huggingface_hub import snapshot_download

    cache = tmp_path / "cache"
    snapshot_download(REPO_ID, cache_dir=cache, endpoint=hub.url)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_load_on_rank, args=(free_port(), str(cache), out), nprocs=WORLD)
        results = dict(out)
    for r in results.values():
        assert r["frozen_base"] == "layer-shards" and r["source"].startswith(str(cache))
        # What it keeps: its half of every unit (each shard padded to 256 bytes a rank).
        assert r["held"] <= r["full"] / WORLD + 256 * WORLD * (LAYERS + 2)
        # While loading: that, plus the one module (a decoder layer, or the embedding) being read.
        assert r["peak"] <= r["full"] / WORLD + r["largest_unit"] + 256 * WORLD * (LAYERS + 2)
        assert r["peak"] < 0.7 * r["full"]


def test_a_hub_id_that_cannot_be_reached_names_the_cache_it_looked_in(hub_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    cfg = C.load(None, [f"model.name_or_path={REPO_ID}", f"output.storage_path={tmp_path}"])
    with pytest.raises(C.ConfigError, match=rf"model.name_or_path={REPO_ID}: cannot read it from the Hugging Face "
                                            rf"hub or the local cache \({tmp_path.resolve() / '.hub'}\)"):
        sources.download(cfg.model)


@pytest.mark.parametrize("case", ["a misspelt id", "a hub that takes no connection"])
def test_a_hub_id_that_cannot_be_read_is_one_line_within_seconds(hub, tmp_path, case):
    """Through huggingface_hub's retries of each file, an unreachable hub once took the driver 49 s to say so."""
    import time

    env = _hub_env(hub)
    if case == "a hub that takes no connection":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    name = REPO_ID + "x"
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "ftcluster.train", "--config", str(RECIPE),
                           f"model.name_or_path={name}", f"output.storage_path={tmp_path}"],
                          capture_output=True, text=True, timeout=300, cwd=CHECKOUT, env=env)
    took = time.time() - started
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"model.name_or_path={name}: cannot read it from the Hugging Face hub or the local cache" in errors[0]
    if case == "a hub that takes no connection":
        assert f"the hub ({env['HF_ENDPOINT']}) could not be reached within 5 s" in errors[0]
    assert took < 40, f"{took:.0f} s to say so"
    assert not list(tmp_path.glob("*/config.yaml"))  # no run directory was claimed


def test_the_hub_probe_goes_through_the_proxy_the_environment_names(hub, monkeypatch):
    """Behind a proxy the hub's host may take no direct connection while huggingface_hub's requests reach it."""
    from huggingface_hub import constants

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # no direct route: no such host
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    sources._takes_connections.cache_clear()
    assert not sources.hub_answers()
    sources._takes_connections.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", hub.url)  # something that answers stands in for the proxy
    assert sources.hub_answers()
    sources._takes_connections.cache_clear()


@pytest.mark.parametrize("cached", [True, False])
def test_a_hub_dataset_is_read_from_the_datasets_cache_at_once_where_the_hub_takes_no_connection(tmp_path, cached):
    """datasets asks the hub for a dataset's card through huggingface_hub's retries (half a minute, printing a line
    for each) before it falls back on its cache, in the driver and again in every worker."""
    from tests.hub import cache_hub_dataset

    cache = tmp_path / "datasets"
    cache.mkdir()
    if cached:
        cache_hub_dataset(cache, "ftc-test/tiny-qa", [{"instruction": f"What is {i}+{i}?", "output": str(2 * i)}
                                                      for i in range(40)])
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_DATASETS_CACHE=str(cache), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "ftcluster", "plan", "--config", str(RECIPE),
                           "data.source=ftc-test/tiny-qa", f"output.storage_path={tmp_path / 'runs'}"],
                          capture_output=True, text=True, timeout=300, cwd=CHECKOUT, env=env)
    said = proc.stdout + proc.stderr
    assert "Retrying" not in said and "Traceback" not in said, said[-3000:]
    silent = f"the hub ({env['HF_ENDPOINT']}) could not be reached within 5 s"
    if cached:
        assert proc.returncode == 0, said[-3000:]
        assert f"data: ftc-test/tiny-qa (train) from the datasets cache ({cache}): {silent}" in proc.stdout
        assert "offline mode is enabled" not in said  # datasets' own notice: the user enabled nothing
    else:
        assert proc.returncode == 2, said[-3000:]
        assert (f"error: data.source=ftc-test/tiny-qa: cannot read it from the hub or the datasets cache to size it "
                f"(ConnectionError: {silent}, and the datasets cache ({cache}) does not hold it)") in proc.stderr
