"""The per-step stop check on GPUs never makes the host wait for the step in flight: after it returns, the
GPU is still busy with work queued before it (a blocking all-reduce and ``.item()`` would have waited for all of
it)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftcluster import stop
from ftcluster.cluster import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def _rank(rank: int, port: int, run_dir: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    device = torch.device("cuda", rank)
    check = stop.StopCheck(run_dir, device, poll_s=0.0)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    # As in training, NCCL's communicator and cuBLAS are set up before the first step (their lazy set-up waits).
    dist.all_reduce(torch.ones(1, device=device))
    (a @ a).sum().item()
    # A first check once before the measured ones: on 2 H200s rank 0's first call found the GPU idle after it (the
    # only such call of 4; one-off set-up of the check's own transfers). Once per run it costs one step's overlap.
    check()
    torch.cuda.synchronize()
    busy = []
    for _ in range(4):
        for _ in range(40):  # a "step": tens of ms of matmuls on an H100, queued in well under a ms
            a = (a @ a).clamp_(-1, 1)
        answer = check()
        queued = torch.cuda.Event()
        queued.record()
        busy.append(not queued.query() and answer is None)  # the step's matmuls still running on the GPU
    torch.cuda.synchronize()
    out[rank] = busy
    dist.destroy_process_group()


def test_the_stop_check_leaves_the_step_in_flight_on_the_gpu(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(free_port(), str(tmp_path), out), nprocs=2, join=True)
        busy = dict(out)
    assert all(busy[0]) and all(busy[1]), busy
