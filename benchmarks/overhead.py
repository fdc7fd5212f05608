"""Where a step's time goes: the same worker ``setup`` and step loop as a Ray Train worker, run in this process
with no Ray, so a recipe's tokens/s can be compared with and without Ray around it.

    python -m benchmarks.overhead --config configs/X.yaml [overrides ...]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ftcluster import config as C
from ftcluster import engine
from ftcluster.records import Progress
from ftcluster.worker import setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = C.load(args.config, args.overrides)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    loop, _ = setup(cfg, 0, 1, device)
    logged = []
    engine.train(loop, Progress(), engine.Hooks(lambda r, kind: logged.append(r) if r.logged else None))
    for r in logged:
        print(f"step {r.step}: {r.tokens_per_s:,.0f} tok/s  MFU {100 * (r.mfu or 0):.1f}%  "
              f"peak {r.peak_allocated_gib} GiB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
