"""The tiled MLP (model.tiled_mlp, DeepSpeed's TiledMLP): the same loss and gradients as the MLP run whole, its
intermediates held a slice at a time; where the plan turns it on, and what the estimate then counts."""

import pytest
import torch

from ftcluster import config as C, estimate as E, models, plan as P, tiled_mlp
from tests.unit.test_plan import CPU, GPU


def _grads(cfg, ids, tiled: bool):
    torch.manual_seed(0)
    run = cfg.model_copy(update={"model": cfg.model.model_copy(update={"tiled_mlp": "on" if tiled else "off"})})
    plan = P.make(run, CPU, read_data=False)
    assert plan.tiled_mlp is tiled
    model = models.build_model(run, plan)
    from torch.utils._python_dispatch import TorchDispatchMode

    class MLPOps(TorchDispatchMode):  # the ops run inside the MLPs
        inside, seen = False, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.inside:
                self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    ops, calls = MLPOps(), []
    for layer in model.modules():
        if type(layer).__name__.endswith("MLP"):
            layer.down_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-2]))
            layer.register_forward_pre_hook(lambda m, i: setattr(ops, "inside", True))
            layer.register_forward_hook(lambda m, i, o: setattr(ops, "inside", False))
    with ops:
        loss = model(input_ids=ids, labels=ids).loss
    assert "mm" in ops.seen or "addmm" in ops.seen
    # The slices' outputs are written into the row's output, not joined (which held it twice at once).
    assert "cat" not in ops.seen
    loss.backward()
    trained = len(calls)
    with torch.no_grad():  # evaluation
        evaluated = model(input_ids=ids, labels=ids).loss
    return (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, calls[:trained],
            evaluated, calls[trained:])


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_tiled_mlp_gives_the_whole_mlps_loss_and_gradients_a_slice_at_a_time(tiny_model, method, checkpointed):
    cfg = C.load(None, [f"model.name_or_path={tiny_model}", f"method={method}", "model.dtype=float32",
                        f"model.gradient_checkpointing={str(checkpointed).lower()}"])
    ids = torch.randint(5, 500, (2, 200), generator=torch.Generator().manual_seed(0))  # hidden 64: 4 slices
    whole_loss, whole, whole_calls, whole_eval, _ = _grads(cfg, ids, tiled=False)
    loss, grads, calls, evaluated, eval_calls = _grads(cfg, ids, tiled=True)
    assert torch.allclose(loss, whole_loss, rtol=1e-6)
    assert torch.allclose(evaluated, whole_eval, rtol=1e-6) and set(eval_calls) == {50}  # without grad, sliced too
    assert grads.keys() == whole.keys() and grads
    for name, g in grads.items():
        assert torch.allclose(g, whole[name], rtol=1e-4, atol=1e-6), name
    assert set(whole_calls) == {200}
    # Every down_proj call saw a slice: forward's of each row (50 tokens), backward's recompute of the flattened
    # rows (100); never the whole row.
    assert set(calls) == {50, 100} and len(calls) > len(whole_calls)


def test_the_plan_turns_on_the_memory_savers_a_length_needs_and_no_more_and_says_why():
    """``model.activation_offloading`` and ``model.tiled_mlp`` at ``auto``: off where the run fits the GPU without
    them (both leave the layers uncompiled, the faster step), on in ``plan.SAVERS``' order where it does not; by
    the MLP's size alone where the GPU's memory is not known; an explicit on or off honoured."""
    from dataclasses import replace

    yarn = ("model.config_overrides={rope_parameters: {rope_type: yarn, factor: 8.0, "
            "original_max_position_embeddings: 8192, rope_theta: 500000}}")

    def plan(*o, gpu=GPU):
        return P.make(C.load(None, ["model.name_or_path=meta-llama/Meta-Llama-3-8B", "method=qlora",
                                    "model.gradient_checkpointing=true", yarn, *o]), gpu, read_data=False)

    short = plan("data.max_seq_len=4096")
    assert not short.tiled_mlp and not short.activation_offloading and short.compile
    assert "auto: off, the run fits without it" in short.reasons["tiled_mlp"]
    long = plan("data.max_seq_len=65536")  # 37 GiB estimated without savers: fits an 80 GB GPU
    assert not long.tiled_mlp and not long.activation_offloading and long.compile

    small = replace(GPU, gpu_memory_gib=24.0)
    need = plan("data.max_seq_len=65536", "model.activation_offloading=off", "model.tiled_mlp=off", gpu=small)
    assert need.memory_gib > 0.9 * 24
    saved = plan("data.max_seq_len=65536", gpu=small)
    assert saved.memory_gib <= P.FIT_SHARE * 24 and saved.activation_offloading and not saved.compile
    assert saved.reasons["activation_offloading"].startswith("model.activation_offloading=auto: on (checkpoints in")
    assert f"needs {need.memory_gib:.1f} GiB estimated without the memory savers" in \
        saved.reasons["activation_offloading"]
    longest = plan("data.max_seq_len=262144", gpu=small)  # nothing fits: every saver, and the fit check refuses
    assert longest.tiled_mlp and longest.activation_offloading and longest.memory_gib > 24

    unknown = replace(GPU, gpu_memory_gib=None)
    assert not plan("data.max_seq_len=4096", gpu=unknown).tiled_mlp
    tiled = plan("data.max_seq_len=65536", "model.compile=auto", gpu=unknown)
    assert tiled.tiled_mlp and "5.2 GiB of MLP intermediates a layer for 65,536 tokens" in tiled.reasons["tiled_mlp"]
    assert not tiled.activation_offloading and "not known" in tiled.reasons["activation_offloading"]
    assert not tiled.compile and "tiled MLP" in tiled.reasons["compile"]
    with pytest.raises(C.ConfigError, match="model.compile=on: the tiled MLP"):
        plan("data.max_seq_len=65536", "model.compile=on", "model.tiled_mlp=on")
    assert not plan("data.max_seq_len=262144", "model.tiled_mlp=off", gpu=small).tiled_mlp
    assert not plan("data.max_seq_len=262144", "model.activation_offloading=off", gpu=small).activation_offloading
    assert plan("data.max_seq_len=4096", "model.tiled_mlp=on").tiled_mlp
    assert plan("data.max_seq_len=4096", "model.activation_offloading=true").activation_offloading  # YAML's on


def test_the_estimate_counts_a_tiled_mlp_slice_not_the_rows_intermediates():
    from dataclasses import replace

    shape = E.shape_of("llama-3-8b")
    run = E.Run(method="qlora", seq_len=131072, micro_batch=1, grad_ckpt=True, activation_offload=True,
                fused_loss=True)
    whole, tiled = E.estimate(shape, run), E.estimate(shape, replace(run, tiled_mlp=True))
    # The recomputed layer no longer holds its MLP's intermediates for the whole row (14 GiB at 128k), only its
    # input; one slice's intermediates and the input's gradient come instead (1.5 GiB).
    recomputed = "activations (one recomputed layer)"
    assert (whole.terms[recomputed] - tiled.terms[recomputed]) / 2**30 == pytest.approx(14.0, abs=0.1)
    assert tiled.terms["activations (a tiled MLP slice, and its input's gradient)"] / 2**30 == pytest.approx(
        1.47, abs=0.01)
    assert (whole.allocated - tiled.allocated) / 2**30 > 9
    assert tiled_mlp.slices(131072, 4096) == 32 and tiled_mlp.slices(100, 4096) == 1
