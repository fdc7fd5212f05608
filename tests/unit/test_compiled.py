"""Compiled decoder layers: where they apply, the refusals, and that a compiled layer trains as the eager one does.
On CPU the test compiles through AOTAutograd without Inductor's code generation (backend aot_eager): it checks
what torch.compile traces (checkpointing, LoRA, the loss), in seconds; tests/gpu/test_compiled.py runs Inductor."""

import pytest
import torch

from ftcluster import compiled, models
from ftcluster import config as C
from tests import tiny


def test_auto_compiles_on_gpus_only_and_on_is_refused_where_it_cannot_run(tiny_model, capsys):
    assert C.load(None, []).model.compile == "auto"
    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "method=lora", "model.compile=auto"])
    model = models.build_model(cfg, "cpu")
    assert "compiled layers: no, the device is cpu" in capsys.readouterr().out
    assert all(layer._compiled_call_impl is None for layer in model.get_base_model().model.layers)
    for clash, message in [("scaling.use_gpu=false", "scaling.use_gpu=false"),
                           ("deepspeed.zero_stage=3", "deepspeed.zero_stage=3"),
                           ("model.activation_offloading=true", "model.activation_offloading=true"),
                           ("method=qlora", "method=qlora")]:
        extra = ["model.gradient_checkpointing=true"] if "offloading" in clash else []
        with pytest.raises(C.ConfigError, match=f"model.compile=on with {message}"):
            C.load(None, ["model.compile=on", clash, *extra])
    on = C.load(None, ["model.compile=on", "scaling.use_gpu=true"])
    with pytest.raises(C.ConfigError, match="model.compile=on: the device is cpu"):
        compiled.apply(model, on, "cpu")
    assert C.load(None, ["model.compile=off"]).fingerprint() == C.load(None, []).fingerprint()  # resumable


@pytest.mark.parametrize("method", ["lora", "full"])
def test_compiled_layers_train_as_the_eager_ones(tiny_model, method):
    """Three AdamW steps through three checkpointed layers: the same losses, compiled or not, within 1e-3; and the
    layers share compiled code (the first layer's input alone differs, needing no gradient behind a frozen
    embedding)."""
    cfg = C.load(None, [f"model.name_or_path={tiny_model}", f"method={method}", "model.dtype=float32",
                        "model.config_overrides={num_hidden_layers: 3}", "model.gradient_checkpointing=true",
                        "model.compile=on", "scaling.use_gpu=true"])
    graphs = []

    def aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    losses = {}
    for backend in (None, aot_eager):
        torch.manual_seed(0)
        model = models.build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": "off"})}))
        if backend:
            assert compiled.apply(model, cfg, "cpu", backend=backend).startswith("compiled layers: 3 x LlamaDecoderLayer")
        model.train()
        losses[backend] = tiny.adamw_losses(model, 3, lr=1e-3 if method == "full" else 1e-2)
    assert losses[aot_eager] == pytest.approx(losses[None], rel=1e-3)
    assert losses[None][-1] < losses[None][0]
    assert len(graphs) == (2 if method == "lora" else 1)
