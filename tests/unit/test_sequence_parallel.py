"""scaling.sequence_parallel: what the plan refuses and decides, the rows the collator makes for it, and the
boundaries attention reads from gathered positions (the training itself: tests/integration/
test_sequence_parallel.py)."""

import pytest
import torch

from ftcluster import attention
from ftcluster import config as C
from ftcluster import plan as P
from ftcluster.data.formatting import IGNORE
from ftcluster.data.packing import collate
from ftcluster.hardware import Hardware

GPU = Hardware(device="cuda", device_source="test", gpu_memory_gib=79.1, liger_installed=True, varlen_kernel=True)
CPU = Hardware(device="cpu", device_source="test")


def planned(*overrides, hw=GPU):
    return P.make(C.load(None, list(overrides)), hw, read_data=False)


def test_the_plan_splits_rows_over_groups_and_keeps_the_global_batch():
    plan = planned("scaling.num_workers=6", "scaling.sequence_parallel=3", "training.micro_batch_size=2")
    assert plan.sequence_parallel == 3 and plan.global_batch == 2 * 6  # each row trained once, by one group
    assert "2 data-parallel group(s)" in plan.reasons["sequence_parallel"]
    assert "sequence_parallel" in plan.describe() and P.Plan.from_json(plan.to_json()) == plan
    assert planned().sequence_parallel == 1


@pytest.mark.parametrize("overrides, hw, words", [
    (["scaling.num_workers=4", "scaling.sequence_parallel=3"], GPU,
     "scaling.sequence_parallel=3 must divide scaling.num_workers=4"),
    (["scaling.num_workers=6", "scaling.min_workers=3", "scaling.sequence_parallel=3", "ray.max_failures=2"], GPU,
     "unset scaling.min_workers"),
    (["scaling.num_workers=3", "scaling.sequence_parallel=3", "model.attn_implementation=eager"], GPU,
     "model.attn_implementation=eager"),
    (["scaling.num_workers=3", "scaling.sequence_parallel=3", "data.packing=true"], CPU,
     "or set data.packing=false"),
    # SmolLM2-135M: 9 attention heads, 3 key/value heads.
    (["scaling.num_workers=2", "scaling.sequence_parallel=2"], GPU, "has 9 attention heads and 3 key/value heads"),
])
def test_a_split_the_workers_heads_or_attention_cannot_take_is_refused_naming_the_field(overrides, hw, words):
    with pytest.raises(C.ConfigError, match="scaling.sequence_parallel") as e:
        planned(*overrides, hw=hw)
    assert words in str(e.value)


def test_packed_rows_on_gpus_take_the_varlen_kernel_which_reads_examples_from_positions():
    plan = planned("scaling.num_workers=3", "scaling.sequence_parallel=3", "data.packing=true")
    assert (plan.attention, plan.sequence_parallel) == ("varlen", 3)


def test_rows_to_split_are_as_wide_as_a_multiple_of_the_split_and_carry_positions_only():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE, 9]}]
    batch = collate(rows, pad_id=0, packed=False, split=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]  # padding: its own run of positions
    assert "attention_mask" not in batch and "cu_seq_lens_q" not in batch  # a 1-D tensor cannot be sliced by tokens
    assert int(batch["num_tokens"]) == 5


def test_attention_finds_each_example_of_gathered_rows_from_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert attention.boundaries(positions).tolist() == [0, 3, 5, 6, 10, 12]


def test_the_estimate_gives_each_worker_the_activations_of_its_slice_of_a_row():
    from ftcluster import estimate

    shape = estimate.shape_of_fields(P.PRESETS[estimate.preset_of("meta-llama/Llama-2-7b-hf")], "llama-2-7b")
    split = estimate.terms(shape, estimate.Run(method="qlora", gpus=4, seq_len=65536, sequence_parallel=4))
    assert split == estimate.terms(shape, estimate.Run(method="qlora", gpus=4, seq_len=16384))
    assert split != estimate.terms(shape, estimate.Run(method="qlora", gpus=4, seq_len=65536))


def test_compiled_layers_are_refused_around_ulysses_collectives():
    with pytest.raises(C.ConfigError, match="model.compile=on: Ulysses"):
        planned("scaling.num_workers=3", "scaling.sequence_parallel=3", "model.compile=on")
