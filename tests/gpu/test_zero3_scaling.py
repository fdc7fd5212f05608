"""ZeRO-3 on several GPUs holds less per GPU than on one: the Llama-2-7B shape in QLoRA (seq 2048, micro batch 2,
gradient checkpointing, LoRA r=8 on q,v, paged 8-bit AdamW), through the command users run (Ray, DeepSpeed)."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import shapes, suites
from ftcluster import config as C
from ftcluster import launch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    ray.init()
    yield ray
    ray.shutdown()


def _run(tmp_path, gpus: int, *overrides) -> dict:
    model = shapes.ensure("llama-2-7b", suites.SHAPES_ROOT)
    cfg = C.load(REPO / "configs/bench/llama2_7b.yaml", [
        f"model.name_or_path={model}", "method=qlora", "optimizer.name=paged_adamw_8bit", "deepspeed.zero_stage=3",
        f"scaling.num_workers={gpus}", "training.max_steps=4", "training.log_every=2", "data.eval_fraction=0.0",
        f"output.storage_path={tmp_path}", f"output.name=qlora-7b-zero3-{gpus}gpu", *overrides])
    s = launch.run(cfg)
    print(f"\nGPU-RESULT qlora-7b-zero3-{gpus}gpu " + json.dumps(s), flush=True)
    return s


def test_qlora_7b_zero3_per_gpu_peak_falls_with_a_second_gpu(ray_gpu, tmp_path):
    """A second GPU takes half the 4-bit weights (3.5 GiB on one GPU) off each GPU, less the few layers gathered
    at a time. What does not shrink with the GPU count (activation checkpoints, a recomputed layer, the loss: about
    2.3 GiB here) keeps the ratio near 0.75 (3.97 against 5.28 GiB on 2x H200, reports/scaling-llama-7b/
    2026-11-27-4xh200*), not the 0.65 issue 12 hoped for; before the fix two GPUs held more than one (11.5 GiB
    against 7.2)."""
    from ftcluster import estimate as E

    one, two = _run(tmp_path, 1), _run(tmp_path, 2)
    assert one["final_step"] == two["final_step"] == 4
    half_the_weights = E.terms(E.shape_of("llama-2-7b"), E.Run(method="qlora"))["weights"] / 2 / E.GiB
    saved = one["peak_allocated_gib"] - two["peak_allocated_gib"]
    assert saved > 0.6 * half_the_weights, (one["peak_allocated_gib"], two["peak_allocated_gib"])
    assert two["peak_allocated_gib"] < 0.85 * one["peak_allocated_gib"]
