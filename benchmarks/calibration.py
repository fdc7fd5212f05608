"""The memory estimator's calibration table: the measured peak memory of every GPU run in the committed reports,
with the run's settings resolved from the very command that made it.

    python -m benchmarks.calibration > benchmarks/calibration.json

tests/unit/test_estimate.py holds ``ftcluster.estimate`` to within ±10% of each row.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from ftcluster import config as C
from ftcluster import estimate, plan
from ftcluster.hardware import Hardware
from ftcluster.estimate import Run
from ftcluster.presets import PRESETS
from ftcluster.records import Summary

ROOT = Path(__file__).resolve().parents[1]
CHUNKED_LOSS_SINCE = "ccfb9c9"
"""The commit from which the loss is ftcluster.activations' and ZeRO-3 gathers a decoder layer at a time: the
estimator models earlier runs with transformers' loss and DeepSpeed's default gather schedule."""
EXPANDABLE_SINCE = "322eb5a"
"""The commit from which workers run the CUDA allocator with expandable segments: NVML peaks of earlier runs carry
1.5-2.4 GiB more allocator slack than the estimator assumes, so only their torch peaks are compared."""


LIGER_SINCE = "83ee7a0"
"""The commit from which workers apply Liger's kernels (model.liger_kernel=auto; the GPU host has had liger-kernel
installed for every run since): the loss is its fused linear + cross-entropy outside ZeRO-3."""
SIZED_BUCKETS_SINCE = "c83b236"
"""The commit from which ZeRO-1/2 buckets hold at most the trainable elements, not DeepSpeed's 5e8."""
LAYER_SHARDS_SINCE = "9f5ca73"
"""The commit from which ZeRO-3 for adapters keeps the frozen base in layer shards (deepspeed.zero3_frozen=auto)."""
ZERO3_ON_ONE_WORKER_UNTIL = "9278bd9"
"""The last commit at which ZeRO-3 for adapters on one worker ran as ZeRO-3 (DeepSpeed's, then layer shards that
gathered copies of each layer from the one rank's whole shard); after it, the frozen base stays whole there and the
adapters run under ZeRO-2."""
KEPT_RECOMPUTED_WEIGHTS_AFTER = "9c017d5"
"""The last commit at which QLoRA dequantized a checkpointed layer's weights again in backward; after it, the
recompute's dequantized weights are kept for the backward (quantization.keep_recomputed_weights)."""
COMPILED_SINCE = {"lora": "59dca46", "full": "8658b23", "qlora": "606a26e"}
"""The commits from which model.compile=auto compiled each method's decoder layers on one GPU."""
UNCHECKPOINTED_QLORA_COMPILED_SINCE = "7823b38"
"""The commit from which model.compile=auto compiled QLoRA's decoder layers outside a checkpoint too
(activations.recompute_only); before it, only checkpointed QLoRA layers compiled."""
ZERO3_BUCKET_SINCE = "af1b04f"
"""The commit from which ZeRO-3's reduce bucket holds at most the trainable elements, not DeepSpeed's 5e8."""
SAVERS_BY_MEMORY_SINCE = "6230479"
"""The commit from which the plan decides the memory savers by the estimate against the GPU's memory; before it, by
the MLP's size alone, as it still does where the memory is not known."""
TILED_MLP_SINCE = "d2a4ab2"
"""The commit from which the plan tiles the MLP of long rows (model.tiled_mlp=auto); earlier runs ran it whole."""


def run_of(cfg: C.RunConfig, commit: str, liger: bool = True, gpu_memory_gib: float | None = None) -> Run:
    """The estimator's view of a run measured at ``commit``: its plan on a GPU of ``gpu_memory_gib`` (which the
    plan's memory savers are decided by) with Liger installed or not as the host had it (its report's versions),
    told which loss, ZeRO-3 gather schedule and ZeRO-1/2 bucket size its code had."""
    planned = plan.make(cfg, Hardware.gpu(gpu_memory_gib, liger_installed=liger), read_data=False)
    current = since(CHUNKED_LOSS_SINCE, commit)
    layer_shards = planned.frozen_base == "layer-shards"
    run = plan.estimator_run(
        cfg, planned, chunked_loss=current, layer_gather=current, sized_buckets=since(SIZED_BUCKETS_SINCE, commit),
        # Only ZeRO-3 has this bucket: other runs are today's whatever their commit.
        zero3_buckets=cfg.deepspeed.zero_stage != 3 or since(ZERO3_BUCKET_SINCE, commit),
        fused_loss=since(LIGER_SINCE, commit) and planned.loss == "liger-fused",
        layer_shards=layer_shards and since(LAYER_SHARDS_SINCE, commit),
        recomputed_weights_kept=plan.estimator_run(cfg, planned).recomputed_weights_kept
        and (cfg.method != "qlora" or not _at_or_before(commit, KEPT_RECOMPUTED_WEIGHTS_AFTER)))
    outside_a_checkpoint = not run.grad_ckpt or run.ckpt_layers is not None
    run = replace(run, compiled=run.compiled and since(COMPILED_SINCE[cfg.method], commit)
                  and not (cfg.method == "qlora" and outside_a_checkpoint
                           and not since(UNCHECKPOINTED_QLORA_COMPILED_SINCE, commit)))
    if planned.frozen_base == "whole" and cfg.deepspeed.zero_stage == 3 \
            and _at_or_before(commit, ZERO3_ON_ONE_WORKER_UNTIL):
        # ZeRO-3 on one worker was ZeRO-3 then, with its chunked loss: DeepSpeed's, or layer shards gathering copies
        # of each layer from the one rank's whole shard.
        run = replace(run, zero=3, fused_loss=False, layer_shards=since(LAYER_SHARDS_SINCE, commit))
    return run


def recorded_shape(model: str) -> str | None:
    """The preset a recorded run's model names. Its paths were the GPU host's: a directory of the same name here (a
    shape that benchmarks.shapes wrote on this machine, with its config.json) says nothing about that run."""
    name = Path(model).name
    return name if model.startswith("/") and name in PRESETS else estimate.preset_of(model)


def config_of(command: str | list[str], commit: str | None = None) -> C.RunConfig:
    """The config of a recorded ``python -m ftcluster.train --config ...`` command, its recipe read as it was at
    ``commit`` (a recipe changed since, as the default suite's ZeRO stage was, would misdescribe older runs; today's
    file where git does not know the commit). The model paths were on the GPU host: the settings are resolved
    without checking that files exist here."""
    argv = shlex.split(command) if isinstance(command, str) else command
    recipe = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[argv.index("--config") + 2:] if "=" in a]
    then = subprocess.run(["git", "show", f"{commit}:{recipe}"], cwd=ROOT, capture_output=True,
                          text=True) if commit else None
    raw = yaml.safe_load(then.stdout if then is not None and then.returncode == 0 else (ROOT / recipe).read_text())
    return C.from_dict(C.apply_overrides(raw, overrides), recipe)


def _had_liger(prov: dict) -> bool:
    """Whether the host of a report had liger-kernel: reports made before versions named it always ran with it."""
    versions = prov.get("versions", {})
    return "liger-kernel" not in versions or versions["liger-kernel"] is not None


def since(ancestor: str, commit: str) -> bool:
    """Whether ``commit`` has ``ancestor``'s change. Where git cannot tell (the GPU host has no history; exit 128),
    the commit is taken to be a recent one: a report made there is rendered by the code of its commit."""
    rc = subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, commit], cwd=ROOT,
                        capture_output=True).returncode
    return rc != 1


def _at_or_before(commit: str, last: str) -> bool:
    return subprocess.run(["git", "merge-base", "--is-ancestor", commit, last], cwd=ROOT,
                          capture_output=True).returncode == 0


def rows() -> list[dict]:
    out = []
    for results in sorted(ROOT.glob("reports/*/*/results.json")):
        doc = json.loads(results.read_text())
        prov = doc["provenance"]
        if not prov.get("gpus"):
            continue  # CPU runs: no device memory to calibrate against
        for t in doc.get("tries", []):  # benchmarks.long_context's tries, each a train command too
            if t.get("status") == "ok" and t.get("peak_allocated_gib"):
                cfg = config_of(t["command"], prov["git_commit"])
                if not since(TILED_MLP_SINCE, prov["git_commit"]):
                    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"tiled_mlp": "off"})})
                out.append(_row(results, prov, cfg, {"allocated": t["peak_allocated_gib"], "reserved": None,
                                                     "device": t.get("peak_device_used_gib")}))
        for r in doc.get("records", []):
            m = Summary.from_json(r.get("metrics") or {})
            if r.get("kind") != "train" or r.get("status") != "ok" or not m.peak_allocated_gib or r.get("shared"):
                continue  # a run beside others (compare --jobs) shared the device's memory with them
            out.append(_row(results, prov, config_of(r["command"], prov["git_commit"]),
                            {"allocated": m.peak_allocated_gib, "reserved": m.peak_reserved_gib,
                             "device": m.peak_device_used_gib}))
    return out


def _row(results: Path, prov: dict, cfg: C.RunConfig, measured: dict) -> dict:
    return {"source": str(results.relative_to(ROOT)), "gpu": prov["gpus"][0]["name"], "date": prov["date"],
            "commit": prov["git_commit"], "expandable_segments": since(EXPANDABLE_SINCE, prov["git_commit"]),
            "shape": recorded_shape(cfg.model.name_or_path),
            "run": asdict(run_of(cfg, prov["git_commit"], liger=_had_liger(prov),
                                 gpu_memory_gib=prov["gpus"][0].get("memory_gib")
                                 if since(SAVERS_BY_MEMORY_SINCE, prov["git_commit"]) else None)),
            "measured_gib": measured}


if __name__ == "__main__":
    json.dump(rows(), sys.stdout, indent=1)
    print()
