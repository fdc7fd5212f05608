import gc
import weakref

import bitsandbytes as bnb
import pytest
import torch

from ftcluster import activations, linear4bit, models
from ftcluster.config import load
from tests import tiny


def _layer(cls, seed: int = 0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(128, 64, bias=True, dtype=torch.bfloat16)
    q = models.bnb_config(load(None, ["method=qlora"]), "bfloat16")  # 4 bits stored as bf16, as under ZeRO-3
    layer = models.linear_to_4bit(dense, q, torch.device("cpu"))
    layer.__class__ = cls
    layer.bias.requires_grad_(True)
    return layer


def _release_and_regather(layer, out):
    """What ZeRO-3 does between a layer's forward and its backward: the parameter's data is swapped for an empty
    tensor (released) and later for a fresh gathered copy. Returns whether the released copy stayed alive."""
    gathered = layer.weight.data
    regathered = gathered.clone()
    storage = weakref.ref(gathered.untyped_storage())
    layer.weight.data = torch.empty(0, dtype=gathered.dtype)
    del gathered
    gc.collect()
    kept_alive = storage() is not None
    layer.weight.data = regathered
    out.float().square().sum().backward()
    return kept_alive


@pytest.mark.parametrize("cls", [bnb.nn.Linear4bit, linear4bit.Linear4bit])
def test_a_released_weight_is_freed_only_by_ours(cls):
    layer = _layer(cls)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16, requires_grad=True)
    kept_alive = _release_and_regather(layer, layer(x))
    # bitsandbytes' matmul keeps a view of the weight's data until backward: under ZeRO-3 that is every gathered
    # layer of the model at once. Ours keeps the parameter, so the released copy is freed.
    assert kept_alive is (cls is bnb.nn.Linear4bit)
    assert x.grad is not None and layer.bias.grad is not None


def test_same_outputs_and_gradients_as_bitsandbytes():
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    results = []
    for cls in (bnb.nn.Linear4bit, linear4bit.Linear4bit):
        layer = _layer(cls)
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        _release_and_regather(layer, out)
        results.append((out.detach().float(), xi.grad.float(), layer.bias.grad.float()))
    for ours, theirs in zip(results[1], results[0]):
        # bf16 rounding of the same dequantized weights (bitsandbytes' CPU kernel rounds in other places).
        assert (ours - theirs).norm() / theirs.norm() < 1e-2


def test_adopt_changes_only_bitsandbytes_4bit_layers():
    model = torch.nn.Sequential(_layer(bnb.nn.Linear4bit), torch.nn.Linear(4, 4))
    assert linear4bit.adopt(model) == 1
    assert type(model[0]) is linear4bit.Linear4bit and type(model[1]) is torch.nn.Linear
    assert isinstance(model[0], bnb.nn.Linear4bit)  # PEFT still wraps it as a 4-bit layer


def _qlora_grads_and_dequantizations(tiny_model, monkeypatch, *overrides):
    cfg = load(None, [f"model.name_or_path={tiny_model}", "method=qlora", "model.gradient_checkpointing=true",
                      *overrides])
    torch.manual_seed(0)
    model = tiny.model_for(cfg)
    calls = []
    dequantize = linear4bit._dequantized
    monkeypatch.setattr(linear4bit, "_dequantized", lambda w, dtype: calls.append(w) or dequantize(w, dtype))
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    per_layer = []
    for layer in activations.decoder_layers(model):
        weights = [m.weight for m in layer.modules() if isinstance(m, linear4bit.Linear4bit)]
        per_layer.append(sum(any(c is w for w in weights) for c in calls) / len(weights))
    return grads, per_layer


def test_checkpointed_layers_keep_the_recomputed_weights_for_backward(tiny_model, monkeypatch):
    """Each 4-bit weight of a checkpointed layer is dequantized twice a step (forward, recompute) instead of three
    times, with the same gradients; a layer left out of checkpointing keeps nothing (it would hold its weights in
    bf16 until backward) and dequantizes twice as before (forward, backward)."""
    kept, per_weight_kept = _qlora_grads_and_dequantizations(tiny_model, monkeypatch)
    plain, per_weight_plain = _qlora_grads_and_dequantizations(tiny_model, monkeypatch,
                                                               "quantization.keep_recomputed_weights=off")
    # The first layer's q, k and v need no input gradient (a frozen embedding is below them): no backward there.
    assert per_weight_plain == [18 / 7, 3] and per_weight_kept == [2, 2]
    assert kept.keys() == plain.keys() and kept
    for name in kept:
        assert torch.equal(kept[name], plain[name]), name
    _, partly = _qlora_grads_and_dequantizations(tiny_model, monkeypatch, "model.checkpointed_layers=1")
    assert partly == [2, 2]  # the first layer recomputes and keeps; the second is not recomputed and keeps nothing


def test_keeping_recomputed_weights_is_on_by_default_except_under_zero3():
    """Where ZeRO-3 partitions the parameters to save memory, ``auto`` leaves the recomputed layer's 4-bit weights
    to be dequantized again; ``on`` keeps them there too. Only QLoRA with checkpointing has them."""
    def keeps(*overrides):
        return tiny.plan_for(load(None, ["method=qlora", "model.gradient_checkpointing=true", *overrides]),
                             "cuda").keep_recomputed_weights

    assert keeps() and keeps("deepspeed.zero_stage=2")
    assert not keeps("deepspeed.zero_stage=3", "scaling.num_workers=2")
    assert keeps("deepspeed.zero_stage=3", "scaling.num_workers=2", "quantization.keep_recomputed_weights=on")
    assert not keeps("quantization.keep_recomputed_weights=off")
    assert not keeps("model.gradient_checkpointing=false") and not keeps("method=lora")
