"""On a GPU, the worker's warm-up leaves NCCL's communicator built, so DeepSpeed's first collective (its broadcast
of the model) finds it rather than building it in the engine's setup."""

import os

import pytest
import torch
import torch.distributed as dist

from ftcluster import worker
from ftcluster.cluster import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def test_the_warm_up_builds_the_nccl_communicator():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        nccl = dist.distributed_c10d._get_default_group()._get_backend(device)
        assert not nccl._is_initialized()  # NCCL builds it at the first collective
        worker.CommunicatorWarmUp(device).join()
        assert nccl._is_initialized()
        tensor = torch.arange(4.0, device=device)
        dist.broadcast(tensor, src=0)
        assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        dist.destroy_process_group()
