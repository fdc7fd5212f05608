"""Liger kernels: where they apply, and the clean fallback where they cannot run (CPU, no install, another
architecture). The kernels themselves run in tests/gpu/test_liger.py."""

import pytest
import torch

from ftcluster import config as C
from ftcluster import kernels, models


def test_auto_falls_back_on_cpu_and_the_cpu_model_is_transformers_own(tiny_model, capsys):
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "method=lora", "model.dtype=float32"])
    assert cfg.model.liger_kernel == "auto"
    model = models.build_model(cfg, "cpu")
    assert "Liger kernels: not applied, the device is cpu" in capsys.readouterr().out
    base = model.get_base_model()
    layer = base.model.layers[0]
    assert type(layer.mlp) is LlamaMLP and "forward" not in vars(layer.mlp)  # no instance patch
    assert type(layer.input_layernorm) is LlamaRMSNorm and "forward" not in vars(base)
    ids = torch.randint(5, 500, (1, 16))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_on_is_refused_where_it_cannot_run():
    with pytest.raises(C.ConfigError, match="model.liger_kernel=on with scaling.use_gpu=false"):
        C.load(None, ["model.liger_kernel=on", "scaling.use_gpu=false"])
    cfg = C.load(None, ["model.liger_kernel=on", "scaling.use_gpu=true"])
    with pytest.raises(C.ConfigError, match="model.liger_kernel=on: the device is cpu"):
        kernels.plan(cfg, "llama", "cpu")
    if not kernels.installed():
        with pytest.raises(C.ConfigError, match=r"liger_kernel is not installed.*ftcluster\[liger\]"):
            kernels.check_driver(cfg, "llama")


def test_the_plan_follows_the_mode_the_architecture_and_the_zero_stage(monkeypatch):
    monkeypatch.setattr(kernels, "installed", lambda: True)
    auto = C.load(None, ["model.compile=off"])
    kinds, line = kernels.plan(auto, "llama", "cuda")
    assert kinds == dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    assert "fused linear cross-entropy" in line
    # ZeRO-3 partitions the output layer; the fused loss reads its weight outside the module's hooks.
    z3 = C.load(None, ["deepspeed.zero_stage=3"])
    kinds, line = kernels.plan(z3, "llama", "cuda")
    assert kinds["fused_linear_cross_entropy"] is False and kinds["swiglu"] and "no fused loss under ZeRO-3" in line
    assert kernels.plan(auto, "gpt2", "cuda")[0] is None
    with pytest.raises(C.ConfigError, match="model_type 'gpt2'"):
        kernels.check_driver(C.load(None, ["model.liger_kernel=on", "scaling.use_gpu=true"]), "gpt2")
    assert kernels.plan(C.load(None, ["model.liger_kernel=off"]), "llama", "cuda") == (
        None, "Liger kernels: off (model.liger_kernel=off)")
    # Compiled layers fuse their own norms, SwiGLU and RoPE (Liger's functions would break their graphs): the loss
    # alone stays Liger's; where ZeRO-3 also rules out the fused loss, nothing is.
    kinds, line = kernels.plan(C.load(None, ["method=lora", "model.compile=auto"]), "llama", "cuda")
    assert kinds == dict(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                         fused_linear_cross_entropy=True) and "compiled layers fuse" in line
    assert kernels.plan(C.load(None, ["model.compile=auto", "deepspeed.zero_stage=3"]), "llama", "cuda")[1] \
        .startswith("Liger kernels: RMSNorm")  # ZeRO-3 layers are not compiled
    assert not kernels.plan(C.load(None, ["method=qlora", "model.compile=auto", "model.gradient_checkpointing=true"]),
                            "llama", "cuda")[0]["rms_norm"]
    assert not kernels.plan(C.load(None, ["method=full", "model.compile=auto"]), "llama", "cuda")[0]["rms_norm"]
    for eager in (["method=lora", "scaling.num_workers=2"], ["method=full", "model.compile=off"]):
        assert kernels.plan(C.load(None, ["model.compile=auto", *eager]), "llama", "cuda")[0]["rms_norm"]
