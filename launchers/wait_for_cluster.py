"""Wait until a Ray cluster has every named node alive (and its GPUs); fail naming the nodes that are missing.

    python -m launchers.wait_for_cluster --address HOST:PORT --nodes n1 n2 [--gpus-per-node 8] [--timeout 300]
"""

from __future__ import annotations

import argparse
import sys
import time


def missing(nodes: list[dict], expected: list[str], gpus_per_node: float) -> list[str]:
    """The expected node names not alive in ``nodes`` (ray.nodes()), or alive with fewer GPUs than asked."""
    alive = {n["NodeName"]: n for n in nodes if n.get("Alive")}
    return [name for name in expected
            if name not in alive or alive[name]["Resources"].get("GPU", 0) < gpus_per_node]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True)
    p.add_argument("--nodes", nargs="+", required=True)
    p.add_argument("--gpus-per-node", type=float, default=0)
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    import ray

    deadline = time.monotonic() + args.timeout
    while True:
        try:
            if not ray.is_initialized():
                ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
            gone = missing(ray.nodes(), args.nodes, args.gpus_per_node)
        except (ConnectionError, RuntimeError) as e:  # the head is not up yet
            gone, reason = args.nodes, str(e)
        else:
            reason = ""
        if not gone:
            print(f"wait_for_cluster: {len(args.nodes)} node(s) up at {args.address}", flush=True)
            return
        if time.monotonic() > deadline:
            sys.exit(f"wait_for_cluster: after {args.timeout:.0f} s these nodes have not joined {args.address} "
                     f"with {args.gpus_per_node:g} GPU(s) each: {', '.join(gone)} {reason}".rstrip())
        time.sleep(2)


if __name__ == "__main__":
    main()
