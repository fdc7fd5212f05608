"""The worker's communicator warm-up: its barrier runs in its own thread, and its errors reach the worker."""

import os
import threading

import pytest
import torch
import torch.distributed as dist

from ftcluster import worker
from ftcluster.cluster import free_port


@pytest.fixture
def one_rank_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_warm_up_barrier_runs_outside_the_calling_thread(one_rank_group, monkeypatch):
    threads = []
    barrier = dist.barrier

    def recording_barrier(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return barrier(*args, **kwargs)

    monkeypatch.setattr(dist, "barrier", recording_barrier)
    warm_up = worker.CommunicatorWarmUp(torch.device("cpu"))
    warm_up.join()
    assert threads == ["communicator-warm-up"]
    assert not warm_up.thread.is_alive()


def test_a_failed_warm_up_is_raised_in_the_thread_that_joins_it():
    assert not dist.is_initialized()
    warm_up = worker.CommunicatorWarmUp(torch.device("cpu"))
    with pytest.raises(ValueError, match="process group"):
        warm_up.join()
