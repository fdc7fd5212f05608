"""Liger kernels: where they apply, and the clean fallback where they cannot run (CPU, no install, another
architecture). The kernels themselves run in tests/gpu/test_liger.py."""

import pytest
import torch

from ftcluster import config as C
from ftcluster import kernels, models, plan
from ftcluster.hardware import Hardware
from tests import tiny


def test_auto_falls_back_on_cpu_and_the_cpu_model_is_transformers_own(tiny_model, capsys):
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "method=lora", "model.dtype=float32"])
    assert cfg.model.liger_kernel == "auto"
    model = models.build_model(cfg, tiny.plan_for(cfg, liger_installed=True), "cpu")
    assert "Liger kernels: none (Liger not applied: the device is cpu" in capsys.readouterr().out
    base = model.get_base_model()
    layer = base.model.layers[0]
    assert type(layer.mlp) is LlamaMLP and "forward" not in vars(layer.mlp)  # no instance patch
    assert type(layer.input_layernorm) is LlamaRMSNorm and "forward" not in vars(base)
    ids = torch.randint(5, 500, (1, 16))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_on_is_refused_where_it_cannot_run(tiny_model):
    on = C.load(None, [f"model.name_or_path={tiny_model}", "model.liger_kernel=on"])
    with pytest.raises(C.ConfigError, match="model.liger_kernel=on: the device is cpu"):
        tiny.plan_for(on, "cpu", liger_installed=True)
    with pytest.raises(C.ConfigError, match=r"model.liger_kernel=on: liger_kernel is not installed.*ftcluster\[liger\]"):
        tiny.plan_for(on, "cuda", liger_installed=False)
    gpt2 = plan.Architecture(model_type="gpt2", layers=2, shape=None)
    with pytest.raises(C.ConfigError, match="model_type 'gpt2'"):
        plan.make(on, Hardware(device="cuda", device_source="test", liger_installed=True), gpt2, read_data=False)


def test_the_plan_follows_the_mode_the_architecture_and_the_zero_stage(tiny_model):
    def planned(*overrides, arch=None):
        cfg = C.load(None, [f"model.name_or_path={tiny_model}", *overrides])
        return plan.make(cfg, Hardware(device="cuda", device_source="test", liger_installed=True), arch,
                         read_data=False)

    auto = planned("model.compile=off")
    assert kernels.kinds(auto) == dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                       fused_linear_cross_entropy=True)
    assert auto.loss == "liger-fused" and auto.liger_layers
    # ZeRO-3 partitions the output layer; the fused loss reads its weight outside the module's hooks.
    z3 = planned("deepspeed.zero_stage=3")
    assert z3.loss == "chunked" and z3.liger_layers and "ZeRO-3 partition" in z3.reasons["loss"]
    assert kernels.kinds(planned(arch=plan.Architecture("gpt2", 2, None))) is None
    off = planned("model.liger_kernel=off")
    assert kernels.kinds(off) is None and off.reasons["liger_layers"] == "Liger not applied: model.liger_kernel=off"
    # Compiled layers fuse their own norms, SwiGLU and RoPE (Liger's functions would break their graphs): the loss
    # alone stays Liger's; where ZeRO-3 also rules out the fused loss, nothing is.
    compiled = planned("method=lora", "model.compile=auto")
    assert kernels.kinds(compiled) == dict(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                           fused_linear_cross_entropy=True)
    assert "compiled layers fuse" in compiled.reasons["liger_layers"]
    assert planned("model.compile=auto", "deepspeed.zero_stage=3").liger_layers  # ZeRO-3 layers are not compiled
    assert not planned("method=qlora", "model.compile=auto", "model.gradient_checkpointing=true").liger_layers
    assert not planned("method=full", "model.compile=auto").liger_layers
    for eager in (["method=lora", "scaling.num_workers=2"], ["method=full", "model.compile=off"]):
        assert planned("model.compile=auto", *eager).liger_layers
