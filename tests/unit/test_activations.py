import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from ftcluster import activations, models
from ftcluster.config import load
from tests import tiny


@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_loss_equals_transformers_loss_and_gradient(monkeypatch, num_items):
    monkeypatch.setattr(activations, "LOSS_CHUNK_BYTES", 4 * 50 * 7)  # 7 rows a chunk: several chunks, a ragged end
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 50, dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100
    results = []
    for fn in (ForCausalLMLoss, activations.chunked_causal_lm_loss):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, labels, vocab_size=50, num_items_in_batch=num_items)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (ref, ref_grad), (ours, grad) = results
    assert ours.dtype == torch.float32 and torch.allclose(ours, ref, rtol=1e-6)
    # Both round float32 gradients to bf16; float32 sums in another order can land a value on the other side of a
    # rounding boundary, one bf16 step (2**-7 of its magnitude) apart. With atol=1e-6 alone, 11 of 800 seeded
    # cases failed (and the inputs were unseeded): CI's occasional red here.
    assert grad.dtype == torch.bfloat16 and torch.allclose(grad.float(), ref_grad.float(), atol=1e-6, rtol=2**-7)


def test_checkpointed_layers_give_the_same_loss_and_gradients(tiny_model):
    """All layers checkpointed, none, or only the first (model.checkpointed_layers=1): the same gradients; a
    checkpointed layer's forward runs again in backward, the others' once."""
    cfg = load(None, [f"model.name_or_path={tiny_model}", "method=lora", "model.dtype=float32"])
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    grads, mlp_calls = [], []
    for ckpt, count in ((False, None), (True, None), (True, 1)):
        torch.manual_seed(0)
        run = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"gradient_checkpointing": ckpt, "checkpointed_layers": count})})
        model = models.build_model(run, tiny.plan_for(run), "cpu")
        calls = {0: 0, 1: 0}
        for i, layer in enumerate(activations.decoder_layers(model)):
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        mlp_calls.append(calls)
    assert mlp_calls == [{0: 1, 1: 1}, {0: 2, 1: 2}, {0: 2, 1: 1}]
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
        assert torch.allclose(grads[0][name], grads[2][name], atol=1e-6), name


def test_checkpointing_more_layers_than_the_model_has_names_the_field(tiny_model):
    cfg = load(None, [f"model.name_or_path={tiny_model}", "model.gradient_checkpointing=true",
                      "model.checkpointed_layers=3"])
    with pytest.raises(Exception, match=r"model.checkpointed_layers=3: llama has 2 decoder layers"):
        tiny.plan_for(cfg)
    with pytest.raises(Exception, match=r"checkpointed_layers=1 needs model.gradient_checkpointing=true"):
        load(None, ["model.checkpointed_layers=1"])


def test_checkpointing_a_model_without_decoder_layers_names_the_field():
    with pytest.raises(Exception, match="model.gradient_checkpointing"):
        activations.checkpoint_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_offloaded_checkpoints_hold_only_each_layers_input_and_change_no_gradient(tiny_model):
    cfg = load(None, [f"model.name_or_path={tiny_model}", "method=lora", "model.dtype=float32"])
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = models.build_model(cfg, tiny.plan_for(cfg), "cpu")
        ckpt = activations.checkpoint_layers(model.get_base_model(), offload=offload)
        loss = model(input_ids=ids, labels=ids).loss
        if offload:  # what went to host memory: each layer's input, and nothing else
            assert ckpt.host.packed_bytes == ckpt.layers * ids.numel() * model.config.hidden_size * 4
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_activation_offloading_needs_checkpointing_and_auto_without_it_stays_off():
    with pytest.raises(Exception, match="model.activation_offloading=on needs model.gradient_checkpointing"):
        load(None, ["model.activation_offloading=true"])
    assert load(None, ["model.activation_offloading=auto"]).model.activation_offloading == "auto"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_host_copies_take_power_of_two_pieces_summing_to_the_tensor_and_give_it_back(dtype):
    # Torch's pinned allocator rounds each block up to a power of two: one block for a 2.75 GiB checkpoint took
    # 4 GiB. The pieces are each a power of two (but for a remainder under the smallest piece) and sum to the size.
    small = 2**10
    assert activations.pieces(2**34 + 2**31 + 2**30 + 12345, small) == [2**34, 2**31, 2**30, 2**13, 2**12, 12345 - 2**13 - 2**12]
    assert activations.pieces(0, small) == [] and activations.pieces(100, small) == [100]
    assert activations.pieces(360448 * 4096 * 2) == [2**31, 2**29, 2**28]  # a 360k-token row, 4096 wide: 2.75 GiB
    t = (torch.randn(3, 700, 257) * 100).to(dtype)
    parts = activations.to_host(t, pin=False)
    assert sum(p.numel() for p in parts) == t.numel() * t.element_size()
    assert all(n & (n - 1) == 0 for n in (p.numel() for p in parts[:-1]))
    assert torch.equal(activations.from_host(parts, t.shape, t.dtype, "cpu"), t)
