"""Each of ftcluster's patches of another library's internals (ftcluster/patches.py) against the installed library:
the behaviour it relies on is still there. A test here failing means upstream changed: re-check the patch, then its
version range in ``patches.PATCHES``."""

import importlib.metadata
import importlib.util
import inspect
import logging

import pytest
import torch

from ftcluster import patches

liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                           reason="liger-kernel is installed on GPU hosts only")


def test_every_patch_names_its_range_and_a_version_outside_it_is_warned_about(monkeypatch):
    assert {p.name for p in patches.PATCHES} >= {"ray_worker_preempted", "quiet_ray_train_reports",
                                                  "start_local_ray_cluster", "expandable_segments_now",
                                                  "cache_custom_autograd_functions", "deepspeed_nvtx",
                                                  "zero3_full_state_dict", "liger_apply_to_instance",
                                                  "init_module_weights", "linear4bit.adopt"}
    for p in patches.PATCHES:
        assert p.versions and p.why, p.name
    assert patches._out_of_range() == []  # the versions this project installs
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.0" if name == "ray" else real(name))
    told = patches._out_of_range()
    assert told and all(m.startswith("ray 9.0 is outside >=2.60,<2.61") for m in told)


def test_ray_trains_preemption_mark_is_the_worker_contexts_own():
    from ray.train.v2._internal.execution import context, preemption, train_fn_utils

    assert "preemption_context" in inspect.signature(context.TrainContext).parameters
    assert "preemption_info" in {f.name for f in preemption.PreemptionContext.__dataclass_fields__.values()}
    assert "preemption" in inspect.getsource(train_fn_utils.TrainFnUtils.get_preemption_info)
    assert patches.ray_worker_preempted() is False  # outside a Ray Train worker: no mark, no error


def test_ray_trains_report_logger_is_named_by_its_file():
    from ray.train.v2._internal.execution import context

    assert "logger = logging.getLogger(__file__)" in inspect.getsource(context)
    patches.quiet_ray_train_reports("WARNING")
    assert logging.getLogger(context.__file__).level == logging.WARNING


def test_rays_state_api_finds_its_server_by_the_variable_set_for_it():
    from ray.dashboard import utils

    assert "RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE" in inspect.getsource(utils)


def test_torch_has_the_allocator_setting_and_the_cache_flag_the_patches_set():
    import torch
    import torch._functorch.config

    assert callable(torch.cuda.memory._set_allocator_settings)
    # Off by default: the patch turns it on. Should torch turn it on itself, the patch is no longer needed.
    with torch._functorch.config.patch(autograd_cache_allow_custom_autograd_functions=False):
        patches.cache_custom_autograd_functions()
        assert torch._functorch.config.autograd_cache_allow_custom_autograd_functions is True
    assert torch._functorch.config._config["autograd_cache_allow_custom_autograd_functions"].default is False


def test_torch_names_the_kernel_sdpa_would_dispatch_a_call_to():
    from torch.nn.attention import SDPBackend

    q, k = torch.randn(1, 4, 16, 8, requires_grad=True), torch.randn(1, 2, 16, 8, requires_grad=True)
    chosen = patches.sdpa_backend(q, k, k, is_causal=True, enable_gqa=True)
    assert isinstance(chosen, SDPBackend) and chosen not in (SDPBackend.ERROR, SDPBackend.CUDNN_ATTENTION)


def test_deepspeeds_nvtx_switch_is_read_by_its_range_decorator_and_its_zero3_gather_exists():
    import deepspeed.utils.nvtx
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "enable_nvtx" in inspect.getsource(deepspeed.utils.nvtx.instrument_w_nvtx)
    saved = deepspeed.utils.nvtx.enable_nvtx
    try:
        patches.deepspeed_nvtx(False)
        assert deepspeed.utils.nvtx.enable_nvtx is False
    finally:
        deepspeed.utils.nvtx.enable_nvtx = saved
    assert callable(DeepSpeedEngine._zero3_consolidated_16bit_state_dict)


def test_deepspeeds_autotuner_imports_without_mlflow_and_mlflow_still_imports_after_it():
    """Where the ``tracking`` extra installed mlflow, ``import deepspeed`` imported it for its autotuner, in every
    start; ftcluster's import refuses it to that module alone. In a fresh interpreter."""
    import subprocess
    import sys

    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed")
    probe = ("import sys, ftcluster, deepspeed, deepspeed.autotuning.autotuner as a; "
             "assert 'mlflow' not in sys.modules and not a.has_mlflow, 'deepspeed imported mlflow'; "
             "import mlflow; assert mlflow.log_metric")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_datasets_reads_its_offline_switch_at_each_call_and_logs_the_cache_fallback_where_the_patch_quiets_it():
    import datasets.config
    from datasets import load
    from datasets.packaged_modules.cache import cache
    from datasets.utils import file_utils

    from ftcluster import patches

    assert "config.HF_HUB_OFFLINE" in inspect.getsource(file_utils._raise_if_offline_mode_is_enabled)
    assert "_raise_if_offline_mode_is_enabled()" in inspect.getsource(load.dataset_module_factory)
    assert load.logger.name == "datasets.load" and cache.logger.name == "datasets.packaged_modules.cache.cache"
    before = datasets.config.HF_HUB_OFFLINE
    with patches.datasets_from_cache():
        assert datasets.config.HF_HUB_OFFLINE is True and not load.logger.isEnabledFor(logging.WARNING)
    assert datasets.config.HF_HUB_OFFLINE == before


def test_transformers_initialises_one_module_with_init_weights():
    from transformers import PreTrainedModel

    assert callable(PreTrainedModel._init_weights)


def test_bitsandbytes_matmul_still_keeps_a_view_of_the_packed_weight():
    """What ftcluster/linear4bit.py exists for: under ZeRO-3 the view keeps every gathered layer alive."""
    from bitsandbytes.autograd import _functions

    source = inspect.getsource(_functions.MatMul4Bit.forward)
    assert "B = B.view(" in source and "ctx.tensors = (None, B)" in source


def test_bitsandbytes_cpu_notice_comes_from_the_logger_the_filter_is_on():
    import bitsandbytes.backends.cpu.ops as ops

    assert "pip install kernels" in inspect.getsource(ops) and ops.logger.name == "bitsandbytes.backends.cpu.ops"
    record = logging.LogRecord(ops.logger.name, logging.WARNING, "ops.py", 1, "Failed to load ... `pip install "
                               "kernels` and the kernels >= 0.11.1", None, None)
    assert not all(f.filter(record) for f in ops.logger.filters)  # dropped
    assert all(f.filter(logging.LogRecord(ops.logger.name, logging.WARNING, "", 1, "other", None, None))
               for f in ops.logger.filters)


@liger
def test_liger_logs_an_optional_backend_that_does_not_import_on_the_logger_the_filter_is_on():
    from liger_kernel.backends import registry

    source = inspect.getsource(registry)
    assert "could not be imported" in source and registry.logger.name == "liger_kernel.backends.registry"
    assert any(isinstance(f, patches._DropNotice) for f in registry.logger.filters)


@liger
def test_liger_replaces_transformers_module_names_and_passes_keywords_to_its_loss():
    from liger_kernel.transformers.model import llama as liger_llama
    from transformers.models.llama import modeling_llama

    source = inspect.getsource(importlib.import_module("liger_kernel.transformers.monkey_patch"))
    assert "modeling_llama.LlamaRMSNorm = " in source  # the module-wide replacement the patch undoes
    assert inspect.Parameter.VAR_KEYWORD in {p.kind for p in inspect.signature(liger_llama.lce_forward).parameters.values()}
    assert modeling_llama.LlamaRMSNorm.__module__ == modeling_llama.__name__


def test_ray_trains_error_record_keeps_its_last_line_and_the_traceback_goes_to_the_ranks_file(tmp_path):
    """Through Ray Train's own function that logs a worker's error: the record it logs is the one the patch reads."""
    import logging

    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    logger, seen = logging.getLogger("ray.train.v2._internal.util"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    patches.ray_train_error_to_file(tmp_path, 3)
    try:
        try:
            raise ValueError("row 7 has no text")
        except ValueError as e:
            construct_user_exception_with_traceback(e)
    finally:
        logger.removeHandler(handler)
        logger.filters.clear()
    kept = tmp_path / "worker_errors" / "rank3.txt"
    assert seen == [f"Error in training function: ValueError: row 7 has no text (traceback: {kept})"]
    assert "Traceback (most recent call last)" in kept.read_text() and "row 7 has no text" in kept.read_text()


def test_ray_trains_print_is_put_back_to_pythons_own(monkeypatch):
    import builtins

    from ray.train.v2._internal.execution.worker_group import worker
    from ray.train.v2._internal.logging import patch_print

    assert "patch_print_function()" in inspect.getsource(worker)  # what every Ray Train worker does at start
    assert "_original_print(*objects" in inspect.getsource(patch_print.redirected_print)  # and why it doubled
    monkeypatch.setattr(builtins, "print", patch_print.redirected_print)
    patches.ray_train_plain_print()
    assert builtins.print is patch_print._original_print


def test_the_driver_drops_rays_preemption_watcher_notice_from_the_worker_logs_it_prints(monkeypatch):
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    assert '"ray_print_logs",' in inspect.getsource(ray_worker.init) or '"ray_print_logs",' in inspect.getsource(
        ray_worker.connect)  # the handler ray.init registers to print the workers' lines
    printed = []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", lambda data: printed.append(data["lines"]))])
    patches.quiet_ray_preemption_watcher_notice()
    patches.quiet_ray_preemption_watcher_notice()  # once is enough: not wrapped twice
    notice = ("core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: '2ab2' has constructor "
              "arguments in the object store and max_restarts > 0.")
    dispatcher.emit({"lines": [notice, "step 2/4 loss 1.0"], "pid": 1, "is_err": True})
    dispatcher.emit({"lines": [notice], "pid": 1, "is_err": True})
    assert printed == [["step 2/4 loss 1.0"]]


def test_library_deprecations_and_deepspeeds_cpu_notice_are_not_shown(recwarn):
    import warnings

    with warnings.catch_warnings():
        patches.quiet_library_notices()
        warnings.warn_explicit("old", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("ours", FutureWarning, "plan.py", 1, module="ftcluster.plan")
    assert [str(w.message) for w in recwarn] == ["ours"]
    from deepspeed.accelerator import real_accelerator

    assert "Setting accelerator to CPU" in inspect.getsource(real_accelerator)
    record = logging.LogRecord("DeepSpeed", logging.WARNING, "", 1, "Setting accelerator to CPU. If you have ...",
                               None, None)
    assert not all(f.filter(record) for f in logging.getLogger("DeepSpeed").filters)
    # DeepSpeed's warning for the bitsandbytes optimizers ftcluster runs under ZeRO on purpose, and transformers'
    # line for the config attribute Liger's forward reads, as the libraries log them.
    from deepspeed.runtime import engine
    from transformers import LlamaConfig

    assert "You are using ZeRO with an untested optimizer" in inspect.getsource(engine)
    shown = []
    handler = logging.Handler()
    handler.emit = shown.append
    for name in ("DeepSpeed", "transformers.configuration_utils"):
        logging.getLogger(name).addHandler(handler)
    try:
        logging.getLogger("DeepSpeed").warning("**** You are using ZeRO with an untested optimizer, proceed with "
                                               "caution *****")
        assert LlamaConfig().use_return_dict is True
        logging.getLogger("DeepSpeed").warning("ours")
    finally:
        for name in ("DeepSpeed", "transformers.configuration_utils"):
            logging.getLogger(name).removeHandler(handler)
    assert [r.getMessage() for r in shown] == ["ours"]


def test_deepspeed_still_drops_frozen_parameters_by_named_parameters_which_skips_tied_ones():
    from deepspeed.runtime.engine import DeepSpeedEngine

    source = inspect.getsource(DeepSpeedEngine.module_state_dict)
    assert "self.module.named_parameters()" in source and "remove_duplicate=False" not in source


def test_a_compiled_module_and_a_models_attention_are_where_the_patches_read_them(tiny_model):
    import torch

    from ftcluster import config as C
    from tests import tiny

    layer = torch.nn.Linear(2, 2)
    assert not patches.is_compiled(layer)
    layer.compile(backend="eager")
    assert patches.is_compiled(layer)
    model = tiny.base_for(C.load(None, [f"model.name_or_path={tiny_model}", "model.attn_implementation=eager"]))
    assert patches.attention_of(model.config) == "eager"


def test_bitsandbytes_adam_state_goes_through_adam_moments_and_back():
    """What a resumed run on another worker count does to a bitsandbytes optimizer (checkpoint.to_universal):
    its states as AdamW moments, cut at other bounds (another worker count's partitions), quantized back in the
    optimizer's own layout. The next step is then the one the uninterrupted optimizer takes, up to the 8-bit
    rounding of the moments."""
    import bitsandbytes as bnb
    from bitsandbytes import functional as F

    torch.manual_seed(0)
    big, small = torch.nn.Parameter(torch.randn(20000)), torch.nn.Parameter(torch.randn(100))  # 8-bit; 32-bit
    opt = bnb.optim.AdamW8bit([big, small], lr=1e-2)
    for _ in range(3):
        big.grad, small.grad = torch.randn(20000), torch.randn(100)
        opt.step()
    moments = {k: patches.bnb_state_as_adam(v) for k, v in opt.state_dict()["state"].items()}
    assert moments[0]["exp_avg"].dtype == torch.float32 and moments[0]["step"] == 3
    assert torch.equal(moments[0]["exp_avg"], F.dequantize_blockwise(
        opt.state[big]["state1"], absmax=opt.state[big]["absmax1"], code=opt.state[big]["qmap1"], blocksize=256))
    assert torch.equal(moments[1]["exp_avg_sq"], opt.state[small]["state2"])  # 32-bit states pass as they are

    # Cut at a bound that is not a block's: each half, quantized in blocks of its own, holds the moments to within
    # the widest step of bitsandbytes' dynamic map (times the largest value).
    bounds = ((0, 10300), (10300, 9700))
    halves = [torch.nn.Parameter(big.detach().narrow(0, start, n).clone()) for start, n in bounds]
    cut = bnb.optim.AdamW8bit(halves, lr=1e-2)
    for p, (start, n) in zip(halves, bounds):  # as DeepSpeed's universal load leaves them
        cut.state[p] = {"step": 3, **{k: moments[0][k].narrow(0, start, n) for k in ("exp_avg", "exp_avg_sq")}}
    patches.bnb_state_from_adam(cut)
    for i, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
        held = torch.cat([F.dequantize_blockwise(cut.state[p][f"state{i}"], absmax=cut.state[p][f"absmax{i}"],
                                                 code=cut.state[p][f"qmap{i}"], blocksize=256) for p in halves])
        widest = cut.state[halves[0]][f"qmap{i}"].sort().values.diff().max()
        assert (held - moments[0][key]).abs().max() <= widest * moments[0][key].abs().max(), key
    assert all(cut.state[p]["step"] == 3 for p in halves)

    before, grad = big.detach().clone(), torch.randn(20000)
    big.grad, small.grad = grad.clone(), torch.randn(100)
    opt.step()
    for p, (start, n) in zip(halves, bounds):
        p.grad = grad.narrow(0, start, n).clone()
    cut.step()
    update = (big.detach() - before).abs().max()
    # The moments' 8-bit rounding in blocks of another layout moves an element's update by a few percent of the
    # step's largest update at most (3.3% here), a fraction of a percent on average (0.18%).
    moved = (torch.cat([p.detach() for p in halves]) - big.detach()).abs()
    assert moved.max() <= 0.05 * update and moved.mean() <= 0.005 * update


def test_ray_trains_fit_hands_the_controller_the_policies_the_trainer_replaces():
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, ResizeDecision
    from ray.train.v2.api import data_parallel_trainer

    fit = inspect.getsource(data_parallel_trainer.DataParallelTrainer.fit)
    assert "self._initialize_and_run_controller(" in fit and "scaling_policy=create_scaling_policy(" in fit
    assert "failure_policy=create_failure_policy(" in fit
    assert "self._is_retryable_error(" in inspect.getsource(DefaultFailurePolicy.make_decision)
    assert list(inspect.signature(ElasticScalingPolicy.make_decision_for_running_worker_group).parameters) == [
        "self", "worker_group_state", "worker_group_status"]
    assert {"num_workers", "resources_per_worker"} <= set(inspect.signature(ResizeDecision).parameters)
    # Both decisions size the group by _count_possible_workers over the coordinator's reservation, keyed by node ID.
    for decide in (ElasticScalingPolicy.make_decision_for_running_worker_group,
                   ElasticScalingPolicy.make_decision_for_non_running_worker_group):
        assert "self._count_possible_workers(reserved_resources)" in inspect.getsource(decide)
    assert "for resources in reserved_resources.values()" in inspect.getsource(
        ElasticScalingPolicy._count_possible_workers)
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator

    assert 'node.get("NodeID", "")' in inspect.getsource(coordinator)
    from ray.train import ScalingConfig

    trainer = patches.torch_trainer("/tmp/run", True, train_loop_per_worker=lambda: None,
                                    scaling_config=ScalingConfig(num_workers=(1, 2)))
    assert trainer.scaling_config.elasticity_enabled


def test_the_evaluation_wrapper_of_ligers_forward_skips_the_logits_and_still_shows_as_ligers_loss():
    import types

    from ftcluster import built

    calls = []

    def lce_forward(self, input_ids=None, labels=None, **kwargs):  # stands in for Liger's causal-LM forward
        calls.append(kwargs)

    lce_forward.__module__ = "liger_kernel.transformers.model.llama"
    model = torch.nn.Linear(2, 2)
    model.forward = types.MethodType(lce_forward, model)
    patches.liger_fused_loss_in_eval(model)
    patches.liger_fused_loss_chunks(model, 16)
    model.forward(input_ids=1, labels=1)
    model.forward(input_ids=1)
    assert calls == [{"skip_logits": True, "chunk_mem_const": 16}, {"chunk_mem_const": 16}]
    # What the built-run check reads: a wrapped forward that hid Liger's refused every run with the fused loss.
    assert built._module_of(vars(model)["forward"]).startswith("liger_kernel")


def test_torchs_jit_build_locks_by_a_file_baton_and_deepspeed_builds_its_cpu_op_by_name():
    """What torch_extension_locks_with_owner and deepspeed_without_shm_op replace (their effect:
    tests/integration/test_extension_locks.py and test_bad_inputs.py)."""
    import importlib

    import torch.utils.cpp_extension as ext

    source = inspect.getsource(ext._jit_compile)
    assert "FileBaton(os.path.join(build_directory, 'lock'))" in source and "baton.wait()" in source
    assert isinstance(ext.JIT_EXTENSION_VERSIONER.entries, dict)
    backend = importlib.import_module("deepspeed.comm.torch")
    assert "build_shm_op()" in inspect.getsource(backend.TorchBackend.__init__)
    users = [name for name, f in inspect.getmembers(backend.TorchBackend, inspect.isfunction)
             if "shm_comm_op" in inspect.getsource(f) or "inference_all_reduce_" in inspect.getsource(f)]
    assert users == ["__init__", "inference_all_reduce"]


@pytest.mark.parametrize("first", ["ftcluster", "the libraries"])
def test_the_lock_and_shm_op_patches_hold_however_the_process_imports_torchs_builder_and_deepspeed(first):
    """Wherever DeepSpeed joins a process group (a worker, a ZeRO-3 build a test makes rank by rank, a notebook),
    importing ftcluster first or last. In a fresh interpreter."""
    import subprocess
    import sys

    libraries = "import deepspeed, torch.utils.cpp_extension as ext; "
    probe = (("import ftcluster; " + libraries) if first == "ftcluster" else (libraries + "import ftcluster; ")) + (
        "import importlib; backend = importlib.import_module('deepspeed.comm.torch'); "
        "assert backend.build_shm_op() is None, 'the shm op'; "
        "assert ext.FileBaton.names_its_holder, 'the lock'")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
