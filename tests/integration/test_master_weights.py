"""optimizer.master_weights=bf16: the optimizer steps the bf16 weights themselves (real DeepSpeed engines on CPU,
ZeRO-0 and ZeRO-2), and under ZeRO-0 the step loop clips the gradients and logs their norm."""

import gc

import pytest
import torch

from ftcluster import config as C
from ftcluster import engine, worker
from ftcluster.records import Progress
from tests import tiny


def _run(tiny_model, tmp_path, name, steps=6, **extra):
    """The worker's set-up and step loop, as a Ray worker runs them; returns the loop and its logged records."""
    cfg = C.load(None, tiny.tiny_overrides(tiny_model, tmp_path, name, **{
        "method": "full", "scaling.num_workers": 1, "training.max_steps": steps, "training.log_every": 1,
        "training.eval_every": 0, "training.save_every": 0, "optimizer.lr": 1e-3, **extra}))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loop, _ = worker.setup(cfg, tiny.plan_for(cfg), 0, 1, torch.device("cpu"))
    logged = []
    engine.train(loop, Progress(), engine.Hooks(lambda record, kind: logged.append(record) if record.logged else None))
    return loop, logged


def _moments(optimizer) -> list[torch.Tensor]:
    return [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]


def test_zero0_steps_the_bf16_weights_with_bf16_states_and_the_loop_clips(tiny_model, tmp_path, process_group):
    loop, logged = _run(tiny_model, tmp_path, "z0bf16", **{"deepspeed.zero_stage": 0,
                                                            "optimizer.master_weights": "bf16"})
    ds = loop.engine
    assert ds.optimizer is ds.basic_optimizer  # no fp32 wrapper around the client optimizer
    assert all(p.dtype == torch.bfloat16 for p in ds.module.parameters())
    assert _moments(ds.optimizer) and all(m.dtype == torch.bfloat16 for m in _moments(ds.optimizer))
    # DeepSpeed clips nothing here and keeps no norm; the loop's norm is logged at every step.
    assert ds.gradient_clipping() == 0.0 and loop.clip is not None and loop.clip.max_norm == 1.0
    norms = [r.grad_norm for r in logged]
    assert len(norms) == 6 and all(n is not None and n > 0 and torch.isfinite(torch.tensor(n)) for n in norms)
    assert logged[-1].loss < logged[0].loss
    assert gc.get_freeze_count() == 0  # the loop froze the collector's view after its first step, and gave it back


def test_zero0_bf16_losses_follow_fp32_master_weights(tiny_model, tmp_path, process_group):
    """The same steps with float32 copies stepped by DeepSpeed: the first loss is the same forward, and the next
    ones stay within 2% (bf16 rounding of each update is the only difference)."""
    _, fp32 = _run(tiny_model, tmp_path, "z0fp32", **{"deepspeed.zero_stage": 0})
    _, bf16 = _run(tiny_model, tmp_path, "z0bf16b", **{"deepspeed.zero_stage": 0, "optimizer.master_weights": "bf16"})
    assert bf16[0].loss == pytest.approx(fp32[0].loss, rel=1e-3)
    for a, b in zip(fp32, bf16):
        assert b.loss == pytest.approx(a.loss, rel=0.02)
    # DeepSpeed's norm (fp32 path) and the loop's (bf16 path) measure the same gradients at the first step.
    assert bf16[0].grad_norm == pytest.approx(fp32[0].grad_norm, rel=0.02)


def test_the_loop_clips_to_max_grad_norm_before_the_optimizer_steps(tiny_model, tmp_path, process_group):
    seen = []

    def norm_at_step(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.nn.utils.get_total_norm(grads)))

    base = {"deepspeed.zero_stage": 0, "optimizer.master_weights": "bf16", "training.max_grad_norm": 1e-3}
    cfg = C.load(None, tiny.tiny_overrides(tiny_model, tmp_path, "clip", **{
        "method": "full", "scaling.num_workers": 1, "training.max_steps": 3, "training.log_every": 1,
        "training.eval_every": 0, "training.save_every": 0, **base}))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    loop, _ = worker.setup(cfg, tiny.plan_for(cfg), 0, 1, torch.device("cpu"))
    loop.engine.basic_optimizer.register_step_pre_hook(norm_at_step)
    logged = []
    engine.train(loop, Progress(), engine.Hooks(lambda record, kind: logged.append(record) if record.logged else None))
    # The gradients' own norm is logged; the optimizer saw them scaled down to max_grad_norm.
    assert len(seen) == 3 and all(r.grad_norm > 0.1 for r in logged)
    assert seen == pytest.approx([1e-3] * 3, rel=0.02)


def test_grad_clip_scales_to_max_norm_and_zero_only_measures():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    p.grad = torch.full((4,), 3.0, dtype=torch.bfloat16)  # norm 6
    clip = engine.GradClip([p], max_norm=1.0)
    clip()
    assert float(clip.norm) == pytest.approx(6.0)
    assert float(torch.linalg.vector_norm(p.grad.float())) == pytest.approx(1.0, rel=1e-2)
    p.grad = torch.full((4,), 3.0, dtype=torch.bfloat16)
    off = engine.GradClip([p], max_norm=0.0)
    off()
    assert float(off.norm) == pytest.approx(6.0) and float(p.grad[0]) == 3.0


def test_one_rank_at_zero0_reduces_no_gradients(tiny_model, tmp_path, process_group):
    """DeepSpeed would copy every gradient into flat buckets, all-reduce them with itself and copy them back."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    calls = []
    real = DeepSpeedEngine.allreduce_gradients

    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    DeepSpeedEngine.allreduce_gradients = counted
    try:
        _run(tiny_model, tmp_path, "nosync", steps=2, **{"deepspeed.zero_stage": 0, "optimizer.master_weights": "bf16"})
        assert calls == []
        _run(tiny_model, tmp_path, "z2sync", steps=2, **{"deepspeed.zero_stage": 2})
        assert calls  # ZeRO-2 partitions gradients through its reduction, one rank or not
    finally:
        DeepSpeedEngine.allreduce_gradients = real


def test_zero2_bf16_master_weights_partition_bf16_weights_and_states(tiny_model, tmp_path, process_group):
    loop, logged = _run(tiny_model, tmp_path, "z2bf16", steps=3, **{"deepspeed.zero_stage": 2,
                                                                     "optimizer.master_weights": "bf16"})
    ds = loop.engine
    assert loop.clip is None and ds.gradient_clipping() == 1.0  # DeepSpeed's ZeRO clips over its partitions
    partitions = ds.optimizer.single_partition_of_fp32_groups  # named for fp32, holds what the optimizer steps
    assert partitions and all(p.dtype == torch.bfloat16 for p in partitions)
    assert all(m.dtype == torch.bfloat16 for m in _moments(ds.optimizer.optimizer))
    assert logged[-1].loss < logged[0].loss


@pytest.mark.parametrize("check", [None, True])
def test_zero_bf16_steps_check_no_gradient_for_overflow_unless_asked(tiny_model, tmp_path, process_group, check):
    """bf16 has no loss scale to lower: DeepSpeed's per-gradient overflow check (on by default) only costs host time,
    so ftcluster turns it off; ``deepspeed.overrides`` turns it back on."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    checks, real = [], DeepSpeedZeroOptimizer.check_overflow
    DeepSpeedZeroOptimizer.check_overflow = lambda self, *a, **k: checks.append(1) or real(self, *a, **k)
    extra = {} if check is None else {"deepspeed.overrides": "{bf16: {check_grad_overflow: true}}"}
    try:
        loop, logged = _run(tiny_model, tmp_path, f"z1-check-{check}", steps=3,
                            **{"deepspeed.zero_stage": 1, "model.dtype": "bfloat16", **extra})
    finally:
        DeepSpeedZeroOptimizer.check_overflow = real
    assert isinstance(loop.engine.optimizer, DeepSpeedZeroOptimizer)
    assert loop.engine.optimizer.check_grad_overflow is bool(check)
    assert len(checks) == (3 if check else 0)
    assert logged[-1].loss < logged[0].loss


def _engine(tiny_model, tmp_path, name, **extra):
    cfg = C.load(None, tiny.tiny_overrides(tiny_model, tmp_path, name, **{
        "method": "full", "scaling.num_workers": 1, "training.max_steps": 6, "training.eval_every": 0,
        "training.save_every": 0, **extra}))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loop, _ = worker.setup(cfg, tiny.plan_for(cfg), 0, 1, torch.device("cpu"))
    return loop.engine


def test_zero0_float32_masters_are_the_optimizers_and_step_as_deepspeeds_do(tiny_model, tmp_path, process_group):
    """ZeRO-0 with float32 master weights (the default master_weights) on a bf16 model: the optimizer keeps the
    copies (optim.Float32Masters), DeepSpeed wraps nothing. The same steps as DeepSpeed's ZeRO-1 copies take, at a
    learning rate whose updates are below a bf16 weight's spacing: they accumulate in the copies, and the bf16
    weights come out as DeepSpeed's do, while stepping the bf16 weights themselves loses them."""
    from ftcluster.optim import Float32Masters

    lr = {"optimizer.lr": 2e-5, "training.max_grad_norm": 0.0}
    ours = _engine(tiny_model, tmp_path, "f32z0", **{"deepspeed.zero_stage": 0, **lr})
    assert isinstance(ours.optimizer, Float32Masters) and not ours.bfloat16_enabled()
    assert all(p.dtype == torch.bfloat16 for p in ours.module.parameters())
    # One flat float32 copy a parameter group (weights with decay, and norms without), as DeepSpeed's.
    assert [f.dtype for f in ours.optimizer.flats] == [torch.float32] * 2
    assert sum(f.numel() for f in ours.optimizer.flats) == sum(p.numel() for p in ours.module.parameters())
    assert all(m.dtype == torch.float32 for m in _moments(ours.optimizer))
    start = [p.detach().clone() for p in ours.module.parameters()]
    ours_losses = tiny.engine_losses(ours, 6)
    assert all(f.grad is None for f in ours.optimizer.flats)  # float32 gradients only during the step
    ds = _engine(tiny_model, tmp_path, "f32z1", **{"deepspeed.zero_stage": 1, **lr})
    ds_losses = tiny.engine_losses(ds, 6)
    bf16 = _engine(tiny_model, tmp_path, "bf16z0", **{"deepspeed.zero_stage": 0, "optimizer.master_weights": "bf16",
                                                       **lr})
    tiny.engine_losses(bf16, 6)

    assert ours_losses == pytest.approx(ds_losses, rel=1e-3)
    flat = lambda e: torch.cat([p.detach().float().flatten() for p in e.module.parameters()])
    moved = lambda e: int((flat(e) != torch.cat([s.float().flatten() for s in start])).sum())
    same_as_ds = (flat(ours) == flat(ds)).float().mean()
    assert same_as_ds > 0.999, same_as_ds
    assert moved(ours) > 2 * moved(bf16) > 0, (moved(ours), moved(bf16))


def test_zero0_float32_masters_live_in_the_checkpoint_and_a_resume_continues_from_them(tiny_model, tmp_path,
                                                                                        process_group):
    lr = {"deepspeed.zero_stage": 0, "optimizer.lr": 2e-5, "training.max_grad_norm": 0.0}
    first = _engine(tiny_model, tmp_path, "save", **lr)
    tiny.engine_losses(first, 3)
    masters = [m.clone() for m in first.optimizer.flats]
    # The copies hold what the bf16 weights cannot: a resume that rebuilt them from the weights would lose it.
    assert any(not torch.equal(m, p.float()) for m, p in zip(first.optimizer.views, first.optimizer.low))
    first.save_checkpoint(str(tmp_path / "ckpt"), tag="t")
    uninterrupted = tiny.engine_losses(first, 3)

    resumed = _engine(tiny_model, tmp_path, "load", **lr)
    resumed.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    for saved, loaded in zip(masters, resumed.optimizer.flats, strict=True):
        assert torch.equal(saved, loaded)
    assert tiny.engine_losses(resumed, 3) == pytest.approx(uninterrupted, rel=1e-6)
