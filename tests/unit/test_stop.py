"""The per-step stop check: every worker answers the same, at the same step, and the answer never waits on the
step in flight (it is the previous step's reduction)."""

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftcluster import stop
from ftcluster.cluster import free_port


def _answers(rank: int, world: int, port: int, run_dir: str, resize_at: int, out: dict) -> None:
    """Six checks on each of ``world`` ranks; rank 0 (the only reader of the files) is asked for a resize at call
    ``resize_at`` (0: never) and to stop at call 4."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    check = stop.StopCheck(run_dir, torch.device("cpu"), poll_s=0.0)
    answers = []
    for call in range(1, 7):
        if call == resize_at and rank == 0:
            stop.request_resize(run_dir, 4)
        if call == 4 and rank == 0:
            stop.request(run_dir, "SIGTERM")
        dist.barrier()
        answers.append(check())
    out[rank] = answers
    dist.destroy_process_group()


def _spawned(run_dir, resize_at: int) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_answers, args=(2, free_port(), str(run_dir), resize_at, out), nprocs=2, join=True)
        return dict(out)


def test_a_stop_request_is_obeyed_by_every_worker_one_step_after_it_is_seen(tmp_path):
    answers = _spawned(tmp_path, resize_at=0)
    # Seen by rank 0 at the 4th call, reduced then, read at the 5th: by both workers.
    assert answers[0] == answers[1] == [None, None, None, None, "stop requested", "stop requested"]


def test_one_worker_obeys_at_once(tmp_path):
    check = stop.StopCheck(tmp_path, torch.device("cpu"), poll_s=0.0)
    assert check() is None
    stop.request(tmp_path, "SIGTERM")
    assert check() == "stop requested"


def test_a_resize_request_is_obeyed_by_every_worker_and_a_stop_request_wins_over_it(tmp_path):
    answers = _spawned(tmp_path, resize_at=2)
    assert answers[0] == answers[1] == [None, None, "resize", "resize", "stop requested", "stop requested"]
    assert stop.resize_pending(tmp_path)
    stop.clear(tmp_path)  # a new attempt obeys neither
    assert not stop.resize_pending(tmp_path) and not (tmp_path / stop.STOP_FILE).exists()


def test_a_checkpoint_is_due_by_time_an_interval_after_the_last_one():
    check = stop.StopCheck("/nonexistent", torch.device("cpu"), poll_s=0.0, save_every_s=0.3)
    assert check() is None
    time.sleep(0.35)
    assert check() == stop.TIMED
    check.saved()  # the worker saved it: the next is an interval away
    assert check() is None
    time.sleep(0.35)
    assert check() == stop.TIMED
    assert stop.StopCheck("/nonexistent", torch.device("cpu"), poll_s=0.0)() is None  # 0: never by time
