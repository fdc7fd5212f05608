"""Where a step's time goes: the same worker ``setup`` and step loop as a Ray Train worker, run in this process
(and, with ``--ranks N``, in N-1 more on this host) with no Ray, so a recipe's tokens/s can be compared with and
without Ray around it, and rank 0's host time can be profiled function by function.

    python -m benchmarks.overhead --config configs/X.yaml [overrides ...]
    python -m benchmarks.overhead --ranks 2 --cprofile /tmp/z3.txt --config configs/X.yaml deepspeed.zero_stage=3

``--cprofile`` profiles rank 0's Python over the steps after the first ``--skip`` (the slowest functions by own time
and by cumulative time): on a GPU the steps are often host-bound, and this says which Python the host spends on.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftcluster import config as C
from ftcluster import engine, hardware
from ftcluster import plan as P
from ftcluster.cluster import free_port
from ftcluster.records import Progress
from ftcluster.worker import setup



class StepProfile:
    """cProfile over the optimizer steps after the first ``skip`` (start-up and the first steps' one-off work
    left out; the evaluation after the last step, if the recipe has one, counted in)."""

    def __init__(self, out: str, skip: int):
        self.out, self.skip, self.profile, self.steps = out, skip, cProfile.Profile(), 0

    def record(self, record) -> None:
        """Called at every logged step (``--cprofile`` logs every step)."""
        self.steps = record.step
        if record.step == self.skip:
            self.profile.enable()

    def write(self) -> None:
        self.profile.disable()
        text = io.StringIO()
        stats = pstats.Stats(self.profile, stream=text)
        text.write(f"rank 0, {self.steps - self.skip} steps after the first {self.skip}\n")
        for key in ("tottime", "cumulative"):
            stats.sort_stats(key).print_stats(45)
        with open(self.out, "w") as f:
            f.write(text.getvalue())
        print(f"host profile of rank 0: {self.out}", flush=True)


def _rank(rank: int, world: int, port: int, args) -> None:
    device = torch.device(f"cuda:{rank}" if torch.cuda.is_available() else "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    cfg = C.load(args.config, args.overrides)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    # The plan as the driver makes it (each rank makes the same one from the same config and host).
    plan = P.make(cfg, hardware.here(cfg)).for_workers(world)
    loop, _ = setup(cfg, plan, rank, world, device)
    logged = []
    profile = StepProfile(args.cprofile, args.skip) if args.cprofile and rank == 0 else None

    def hook(record, kind):
        if profile is not None:
            profile.record(record)
        if record.logged:
            logged.append(record)

    engine.train(loop, Progress(), engine.Hooks(hook))
    if profile is not None:
        profile.write()
    if rank == 0:
        for r in logged:
            print(f"step {r.step}: loss {r.loss:.4f}  {r.tokens_per_s:,.0f} tok/s  step {r.step_time_s:.3f} s  MFU {100 * (r.mfu or 0):.1f}%  "
                  f"peak {r.peak_allocated_gib} GiB", flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--ranks", type=int, default=1, help="processes on this host, one GPU each where there are GPUs")
    p.add_argument("--cprofile", help="write rank 0's host profile of the steps here")
    p.add_argument("--skip", type=int, default=3, help="steps left out of the profile at the start")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    # The config's worker count decides how ZeRO-3 partitions (one worker keeps a frozen base whole).
    args.overrides = [f"scaling.num_workers={args.ranks}", *args.overrides]
    if args.cprofile:
        args.overrides = [*args.overrides, "training.log_every=1"]
    C.load(args.config, args.overrides)  # a bad config fails here, before any process starts
    for attempt in range(3):
        try:
            mp.spawn(_rank, args=(args.ranks, free_port(), args), nprocs=args.ranks)
            return
        except mp.ProcessRaisedException as e:
            # The port was free when chosen and taken before rank 0 listened on it (seen on a GPU host, between
            # two runs): choose another. Any other failure is the run's own.
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise


if __name__ == "__main__":
    main()
