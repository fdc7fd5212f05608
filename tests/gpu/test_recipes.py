"""Every recipe, shrunk to the tiny model on one GPU: the worker builds what the plan says, where the plan's GPU
decisions apply (compiled layers, Liger's kernels and fused loss, varlen attention). As
tests/integration/test_recipes.py on CPU, what was built is read back from the engine and the model."""

import pytest
import torch

from ftcluster import backends, built, worker
from tests import tiny
from tests.integration.test_recipes import CHECKED, RECIPES, shrunk

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_builds_on_one_gpu_what_its_plan_says(recipe, tiny_model, tmp_path):
    cfg = shrunk(recipe, tiny_model, tmp_path, workers=1)
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"use_gpu": True})})
    plan = tiny.plan_here(cfg)
    assert plan.device == "cuda"
    device = backends.local_process_group(plan)
    try:
        loop, _ = worker.setup(cfg, plan, 0, 1, device)  # refuses a build that differs from the plan
        observed = built.observe(loop.engine.module, loop.engine)
        assert observed == {k: getattr(plan, k) for k in CHECKED}
        print(f"GPU-RESULT {recipe}: " + ", ".join(f"{k}={v}" for k, v in observed.items()))
    finally:
        backends.destroy_local_process_group()
        torch.cuda.empty_cache()
