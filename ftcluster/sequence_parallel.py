"""Sequence parallelism: each row's tokens split over ``scaling.sequence_parallel`` (K) workers, through DeepSpeed's
Ulysses (ALST, arXiv 2506.13996; ``deepspeed.runtime.sequence_parallel.ulysses_sp``).

Every worker reads its own rows, as in data parallelism. DeepSpeed's data-loader adapter gathers the K rows of a
group's workers and hands each worker a 1/K slice of each in turn, so the group trains K rows one after the other,
each once, and each worker holds 1/K of a row's activations. Around attention, Ulysses' all-to-all trades tokens
for heads: each worker attends over the whole row with 1/K of the heads. The positions of the whole row are
gathered there too, and attention finds a packed row's examples from them (ftcluster/attention.py).

Each worker's loss is its slice's summed token loss over the row's whole count of target tokens: under ZeRO-0 to 2
DeepSpeed sums the group's gradients (and averages over the data-parallel groups), so the group's gradient is the
row's mean loss's, the same as one worker computing the whole row. ZeRO-3's reduce-scatter averages over every
worker instead (DeepSpeed 0.19: ``stage3.__avg_scatter_grads``, where ZeRO-1/2 divide by the data-parallel size),
so there each share counts K times (``gradient_scale``); tests/integration/test_sequence_parallel.py compares
both with whole rows.
"""

from __future__ import annotations

import torch

from ftcluster.data.formatting import IGNORE
from ftcluster.data.packing import ShardedBatches


def register(model, attention: str, k: int, micro_batch: int):
    """Route ``attention`` (transformers' name) through Ulysses for this process and make the sequence-parallel
    groups (consecutive ranks: a group stays on one node where it can). Returns the groups for DeepSpeed (its
    ``mpu``). Attention in eval mode is left whole: evaluation reads whole rows on each worker."""
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    deepspeed.init_distributed(dist_init_required=False)  # joins the process group the backend made
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attention, sequence_parallel_size=k,
        micro_batch_size=micro_batch, seq_length_is_variable=True, disable_in_eval=True)


class SequenceShards:
    """A worker's batches under sequence parallelism: the same rows and positions in an epoch as ``batches``
    (``ShardedBatches``), each turned into K slices, one per micro step. A batch holds this worker's slice of one
    group member's rows: ``input_ids``, ``position_ids``, ``shift_labels`` (the labels shifted before slicing),
    ``num_items_in_batch`` (the target tokens of the whole rows, for the loss) and ``num_tokens`` (this slice's
    share of the rows' real tokens, so that the workers' counts add up to the rows')."""

    def __init__(self, batches: ShardedBatches, mpu, device: torch.device, zero_stage: int):
        self.batches, self.device = batches, device
        self.group = mpu.get_sequence_parallel_group()
        self.k, self.rank = mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank()
        self.rows_per_micro_step = batches.rows_per_micro_step
        self.scale = gradient_scale(zero_stage, self.k)

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start_row: int = 0):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

        # The adapter gathers over the group's communicator: CUDA tensors for NCCL, host ones for gloo.
        gather_on = self.device if torch.distributed.get_backend(self.group) == "nccl" else torch.device("cpu")
        slices = UlyssesSPDataLoaderAdapter(self._whole(epoch, start_row), self.rank, self.group, self.k, gather_on)
        for batch in slices:
            count = (batch["shift_labels"] != IGNORE).sum().to(gather_on)
            torch.distributed.all_reduce(count, group=self.group)
            n = batch.pop("num_tokens")
            batch["num_tokens"] = n // self.k + (self.rank < n % self.k)
            batch["num_items_in_batch"] = count / self.scale
            # transformers computes a loss only when given labels; the shifted ones are the labels it uses.
            batch["labels"] = batch["shift_labels"]
            yield batch

    def _whole(self, epoch: int, start_row: int):
        for batch in self.batches.epoch(epoch, start_row):
            batch["num_tokens"] = int(batch["num_tokens"])  # gathered as an object: the adapter slices tensors
            yield batch

    def row_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The rows' mean token loss from this worker's share of it (for the log; the gradient flows through the
        shares)."""
        total = loss.detach().float() / self.scale
        torch.distributed.all_reduce(total, group=self.group)
        return total


def gradient_scale(zero_stage: int, k: int) -> int:
    """What each worker's loss share is multiplied by so that its ZeRO stage's gradient reduction gives the row's
    gradient (module docstring)."""
    return k if zero_stage == 3 else 1
