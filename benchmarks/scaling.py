"""One recipe on 1, 2, 4 ... GPUs, side by side: tokens/s, per-GPU memory and scaling efficiency, written to
``reports/scaling-<suite>/<date>-<hardware>/``.

    python -m benchmarks.scaling --suite llama-7b --runs lora@zero2:1,2,4 --runs qlora@zero3:1,2,4
    python -m benchmarks.scaling --suite qlora-70b --runs qlora@zero3:2,4 --runs qlora@zero3+offload:2
    python -m benchmarks.scaling --suite qlora-70b --runs qlora@zero3+actoffload:2,4
    python -m benchmarks.scaling --from reports/scaling-llama-7b/<dir>/results.json      # re-render only

A run is ``METHOD@zeroSTAGE[+offload][+actoffload]:GPUS,...``: the suite's recipe for that method, at that ZeRO
stage (with ``deepspeed.offload_param=cpu`` for ``+offload``, ``model.activation_offloading=true`` for
``+actoffload``), once per GPU count. Each run is ``python -m ftcluster.train`` in
its own process, through ``benchmarks.compare``'s harness; runs that need more GPUs than the machine has are
recorded as skipped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks import compare, scaling_report, suites

RUN = re.compile(r"^(full|lora|qlora)@zero([0-3])(\+offload)?(\+actoffload)?:(\d+(?:,\d+)*)$")


@dataclass(frozen=True)
class Variant:
    method: str
    zero: int
    offload: bool
    activation_offload: bool = False

    @property
    def name(self) -> str:
        return (f"{self.method}@zero{self.zero}" + ("+offload" if self.offload else "")
                + ("+actoffload" if self.activation_offload else ""))

    def overrides(self, gpus: int) -> tuple[str, ...]:
        return (f"deepspeed.zero_stage={self.zero}", f"deepspeed.offload_param={'cpu' if self.offload else 'none'}",
                f"model.activation_offloading={str(self.activation_offload).lower()}", f"scaling.num_workers={gpus}")


def parse_runs(specs: list[str]) -> list[tuple[Variant, int]]:
    plan = []
    for spec in specs:
        m = RUN.match(spec)
        if not m:
            raise SystemExit(f"--runs {spec}: expected METHOD@zeroSTAGE[+offload][+actoffload]:GPUS,... "
                             "(e.g. qlora@zero3:1,2,4)")
        variant = Variant(m[1], int(m[2]), bool(m[3]), bool(m[4]))
        plan += [(variant, int(n)) for n in m[5].split(",")]
    return plan


def run(args, argv: list[str]) -> Path:
    gpus = compare.gpu_count()
    suite = suites.get(args.suite, gpu=gpus > 0)
    plan = parse_runs(args.runs)
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out or f"reports/scaling-{suite.name}/{stamp}-{compare.hardware_slug()}")
    work = Path(args.work or f"runs/bench/scaling-{suite.name}-{dt.datetime.now():%Y%m%d-%H%M%S}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    h = compare.Harness(suite, work, args.set, out / "results.json", compare.provenance(argv, "benchmarks.scaling"))
    h.results["suite"]["kind"] = "scaling"
    h.results["settings"] = {"runs": args.runs, "sets": args.set, "work_dir": str(work)}
    print(f"benchmarks.scaling: suite {suite.name}; {len(plan)} runs; logs in {work}", flush=True)
    for i, (variant, n) in enumerate(plan, 1):
        label = f"[{i}/{len(plan)}] {variant.name} on {n} GPU(s)"
        print(label, flush=True)
        base = {"kind": "train", "method": variant.method, "seed": 42, "variant": variant.name, "gpus": n}
        if gpus and n > gpus:  # on a CPU-only machine the "GPUs" are Ray CPU workers
            h.record({**base, "status": "skipped", "error": f"needs {n} GPUs, this machine has {gpus}"})
            continue
        rec = h.train(variant.method, 42, label, extra=variant.overrides(n),
                      name=f"{variant.name.replace('@', '-').replace('+', '-')}-{n}gpu")
        h.record({**rec, **base, "status": rec["status"]})
    scaling_report.render(h.results, out)
    print(f"report: {out / 'report.md'}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="llama-7b", help=f"one of {', '.join(suites.SUITES)}")
    p.add_argument("--runs", action="append", default=[], metavar="METHOD@zeroK[+offload]:N,N",
                   help="a method at a ZeRO stage on each GPU count (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                   help="a config override for every run, or for one method's runs")
    p.add_argument("--out", help="report directory (default reports/scaling-<suite>/<date>-<hardware>)")
    p.add_argument("--work", help="where runs and logs go (default runs/bench/scaling-<suite>-<time>)")
    p.add_argument("--from", dest="from_", type=Path, help="re-render a results.json without running anything")
    args = p.parse_args(argv)
    if args.from_:
        compare.rerender(args.from_, args.out, scaling_report.render)
        return
    if not args.runs:
        raise SystemExit("--runs: name at least one, e.g. --runs qlora@zero3:1,2,4")
    run(args, argv)


if __name__ == "__main__":
    main()
