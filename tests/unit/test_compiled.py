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
    model = models.build_model(cfg, tiny.plan_for(cfg), "cpu")
    assert "compiled layers: none (model.compile=auto: the device is cpu" in capsys.readouterr().out
    assert all(layer._compiled_call_impl is None for layer in model.get_base_model().model.layers)
    for clash, message in [("scaling.use_gpu=false", "the device is cpu"),
                           ("deepspeed.zero_stage=3", "ZeRO-3 gathers and releases"),
                           ("model.activation_offloading=true", "model.activation_offloading's saved-tensor hooks")]:
        extra = ["model.gradient_checkpointing=true"] if "offloading" in clash else []
        on = C.load(None, [f"model.name_or_path={tiny_model}", "model.compile=on", clash, *extra])
        with pytest.raises(C.ConfigError, match=f"model.compile=on: {message}"):
            tiny.plan_for(on, "cpu" if "use_gpu" in clash else "cuda")
    assert C.load(None, ["model.compile=off"]).fingerprint() == C.load(None, []).fingerprint()  # resumable


@pytest.mark.parametrize("method", ["lora", "full"])
def test_compiled_layers_train_as_the_eager_ones(tiny_model, method):
    """Three AdamW steps through three checkpointed layers: the same losses, compiled or not, within 1e-3; and the
    layers share one compiled graph (behind a frozen embedding the first layer's input needed no gradient and took
    a graph of its own, compiled at the first step too)."""
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
        eager = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": "off"})})
        model = models.build_model(eager, tiny.plan_for(eager))
        if backend:
            line = compiled.apply(model, tiny.plan_for(cfg, "cuda"), backend=backend)
            assert line.startswith("compiled layers: 3 x LlamaDecoderLayer")
        model.train()
        losses[backend] = tiny.adamw_losses(model, 3, lr=1e-3 if method == "full" else 1e-2)
    assert losses[aot_eager] == pytest.approx(losses[None], rel=1e-3)
    assert losses[None][-1] < losses[None][0]
    assert len(graphs) == 1


def test_auto_compiles_on_one_gpu_and_qlora_layers_must_recompute_their_dequantization(tiny_model):
    def plan(*overrides, device="cuda"):
        return tiny.plan_for(C.load(None, [f"model.name_or_path={tiny_model}", "scaling.use_gpu=true",
                                           "model.gradient_checkpointing=true", *overrides]), device)

    assert plan("method=lora").compile and plan("method=qlora").compile and plan("method=full").compile
    assert not plan("method=qlora", "scaling.num_workers=2").compile
    # QLoRA's layers outside a checkpoint too (activations.recompute_only).
    assert plan("method=qlora", "model.checkpointed_layers=1").compile
    assert plan("method=qlora", "model.gradient_checkpointing=false").compile
    assert plan("method=qlora", "model.gradient_checkpointing=false").recompute_only == ("bitsandbytes",)
    assert plan("method=lora", "model.checkpointed_layers=1").compile
    assert plan("method=full", "scaling.num_workers=2", "model.compile=on").compile
    assert plan("method=qlora").recompute_only == ("bitsandbytes",)
    assert not plan("method=qlora", device="cpu").recompute_only  # not compiled: no policy, no dispatch per op
    assert not plan("method=qlora", "model.compile=off").recompute_only
    assert not plan("method=lora").recompute_only


def test_compiled_qlora_layers_are_told_to_recompute_the_dequantization(tiny_model):
    """QLoRA's checkpointed layers compiled through AOTAutograd's partitioner: bitsandbytes' dequantization reaches
    the partitioner marked must-recompute (on CUDA, Inductor otherwise saved its output, a layer's weights in bf16,
    for backward), the backward recomputes it, the forward saves no tensor of a weight's shape, and three AdamW
    steps give the eager losses."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch.utils.checkpoint import CheckpointPolicy

    from ftcluster import activations, linear4bit

    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "method=qlora", "model.compile=off",
                        "model.gradient_checkpointing=false", "optimizer.name=adamw"])
    tags, saved, backward_ops = [], [], []

    def partition(joint, inputs, **kwargs):
        tags.extend(n.meta.get("recompute") for n in joint.graph.nodes
                    if n.op == "call_function" and getattr(n.target, "namespace", None) == "bitsandbytes")
        forward, backward = min_cut_rematerialization_partition(joint, inputs, **kwargs)
        output = next(n for n in forward.graph.nodes if n.op == "output")
        saved.extend(tuple(str(d) for d in a.meta["val"].shape) for a in output.args[0]
                     if hasattr(a, "meta") and "val" in a.meta and a.op != "placeholder")  # inputs cost nothing
        backward_ops.extend(getattr(n.target, "namespace", None) for n in backward.graph.nodes)
        return forward, backward

    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: gm, partition_fn=partition)
    losses = {}
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = models.build_model(cfg, tiny.plan_for(cfg))
        activations.checkpoint_layers(model, must_recompute=frozenset({"bitsandbytes"}))
        if compile_:
            for layer in activations.decoder_layers(model):
                layer.compile(backend=backend)
        model.train()
        losses[compile_] = tiny.adamw_losses(model, 3, lr=1e-2)
    # The forward's dequantizations are tagged; the backward's own (no tag) are in the joint graph too.
    assert CheckpointPolicy.MUST_RECOMPUTE in tags and CheckpointPolicy.PREFER_RECOMPUTE not in tags
    assert "bitsandbytes" in backward_ops
    weight_shapes = {(str(m.out_features), str(m.in_features)) for m in model.modules()
                     if isinstance(m, linear4bit.Linear4bit)}
    assert weight_shapes
    assert not weight_shapes & set(saved)
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
    assert losses[False][-1] < losses[False][0]


def test_compiled_qlora_layers_outside_a_checkpoint_recompute_only_the_dequantization(tiny_model):
    """QLoRA's layers compiled without checkpointing, through AOTAutograd's partitioner. Plain, the forward saves
    tensors of a weight's shape for backward (bitsandbytes' dequantized weights: the memory of a 16-bit base). Under
    ``activations.recompute_only`` it saves none, and everything else it saved before: the layer is not
    recomputed. Three AdamW steps give the eager losses either way."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from ftcluster import activations, linear4bit

    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "method=qlora", "model.compile=off",
                        "model.gradient_checkpointing=false", "optimizer.name=adamw"])
    saved, losses = {}, {}
    for mode in ("eager", "plain", "recompute_only"):
        shapes = saved.setdefault(mode, [])

        def partition(joint, inputs, **kwargs):
            forward, backward = min_cut_rematerialization_partition(joint, inputs, **kwargs)
            output = next(n for n in forward.graph.nodes if n.op == "output")
            shapes.extend(tuple(str(d) for d in a.meta["val"].shape) for a in output.args[0]
                          if hasattr(a, "meta") and "val" in a.meta and a.op != "placeholder")
            return forward, backward

        torch._dynamo.reset()
        torch.manual_seed(0)
        model = models.build_model(cfg, tiny.plan_for(cfg))
        layers = activations.decoder_layers(model)
        if mode == "recompute_only":
            activations.recompute_only(layers, frozenset({"bitsandbytes"}))
        if mode != "eager":
            backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: gm, partition_fn=partition)
            for layer in layers:
                layer.compile(backend=backend)
        model.train()
        losses[mode] = tiny.adamw_losses(model, 3, lr=1e-2)
    torch._dynamo.reset()
    weight_shapes = {(str(m.out_features), str(m.in_features)) for m in model.modules()
                     if isinstance(m, linear4bit.Linear4bit)}
    kept_weights = [s for s in saved["plain"] if s in weight_shapes]
    assert kept_weights  # what recompute_only is for
    assert not weight_shapes & set(saved["recompute_only"])
    assert len(saved["recompute_only"]) == len(saved["plain"]) - len(kept_weights)
    assert losses["plain"] == pytest.approx(losses["eager"], rel=1e-2)
    assert losses["recompute_only"] == pytest.approx(losses["eager"], rel=1e-2)
    assert losses["eager"][-1] < losses["eager"][0]


def test_a_compiled_qlora_layer_comes_from_aotautograds_cache_at_the_next_start(tiny_model):
    """AOTAutograd's cache refused the QLoRA layer (its 4-bit matmul, linear4bit, is a custom autograd.Function; the
    checkpoint's recompute policy was a closure it could not pickle), so every start traced and partitioned it again
    (0.9 s of the 7B layer's 2.9 s on an H100). Now a second build of the same model (a new process, to torch:
    Dynamo reset, in-memory caches gone) loads the layer's forward and backward from the cache. Inductor itself, on
    CPU: this cache sits in front of it."""
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import fresh_cache

    from ftcluster import activations

    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "method=qlora", "optimizer.name=adamw",
                        "model.config_overrides={num_hidden_layers: 1}", "model.gradient_checkpointing=false",
                        "model.compile=on", "scaling.use_gpu=true"])

    def inductor(gm, example_inputs):
        return compile_fx(gm, example_inputs)

    with fresh_cache(), torch._functorch.config.patch(autograd_cache_allow_custom_autograd_functions=False):
        for start in ("cold", "warm"):
            torch._dynamo.reset()
            counters.clear()
            eager = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": "off"})})
            model = models.build_model(eager, tiny.plan_for(eager))
            # As on a GPU: checkpointed under the policy that has the compiled layer recompute the dequantization.
            activations.checkpoint_layers(model, must_recompute=frozenset({"bitsandbytes"}))
            compiled.apply(model, tiny.plan_for(cfg, "cuda"), backend=inductor)
            model.train()
            tiny.adamw_losses(model, 1, lr=1e-2)
            aot = dict(counters["aot_autograd"])
            assert not aot.get("autograd_cache_bypass"), (start, aot)
        assert aot.get("autograd_cache_hit") == 1
    torch._dynamo.reset()
