"""The step loop trains in training mode from its first step: transformers loads a model in eval mode, where its
own modules would stay (the adapters, new modules, start in training mode) until the first evaluation ended."""

import torch

from ftcluster import config as C
from ftcluster import engine, worker
from ftcluster.records import Progress
from tests import tiny


def test_every_training_forward_runs_in_training_mode_and_evaluation_in_eval_mode(tiny_model, tmp_path,
                                                                                   process_group):
    cfg = C.load(None, tiny.tiny_overrides(tiny_model, tmp_path, "mode", **{
        "scaling.num_workers": 1, "training.max_steps": 2, "training.log_every": 1,
        "training.eval_every": 0, "training.eval_batches": 1, "training.save_every": 0}))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    loop, _ = worker.setup(cfg, tiny.plan_for(cfg), 0, 1, torch.device("cpu"))
    attention = next(m for name, m in loop.engine.module.named_modules() if name.endswith("layers.0.self_attn"))
    seen = []
    attention.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    engine.train(loop, Progress(), engine.Hooks(lambda record, kind: None))
    # Two steps of one micro batch each, then the final evaluation's one batch. (Ulysses attention, for one, runs
    # only in training mode: ftcluster/sequence_parallel.py.)
    assert seen == [True, True, False]
