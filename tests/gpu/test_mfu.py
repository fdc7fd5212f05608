"""MFU on a GPU: against the GPU's dense bf16 datasheet peak (the figure other tools report), with the measured
matmul rate's beside it, in every logged line and the summary."""

import pytest
import torch

from ftcluster import launch, metrics
from tests.integration.test_recipes import shrunk

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_run_reports_mfu_against_the_datasheet_peak_and_the_measured_matmul_rate(tiny_model, tmp_path):
    name = torch.cuda.get_device_name(0)
    if metrics.datasheet_peak_flops(name) is None:
        pytest.skip(f"{name} is not in metrics.DATASHEET_TFLOPS")
    cfg = shrunk("configs/smollm2_135m_lora.yaml", tiny_model, tmp_path, workers=1)
    overrides = {"scaling": cfg.scaling.model_copy(update={"use_gpu": True}),
                 "ray": cfg.ray.model_copy(update={"local_mode": True}),
                 "training": cfg.training.model_copy(update={"max_steps": 12, "log_every": 4, "eval_every": 0,
                                                             "save_every": 0, "epochs": 1})}
    s = launch.run(cfg.model_copy(update=overrides))
    assert s["datasheet_tflops"] == metrics.datasheet_peak_flops(name) / 1e12
    assert 0 < s["mfu_datasheet"] < s["mfu"] < 1  # no GPU's matmuls run at its datasheet peak
    assert s["mfu_datasheet"] == pytest.approx(s["mfu"] * s["peak_matmul_tflops"] / s["datasheet_tflops"], rel=0.05)
