"""Each of ftcluster's patches of another library's internals (ftcluster/patches.py) against the installed library:
the behaviour it relies on is still there. A test here failing means upstream changed: re-check the patch, then its
version range in ``patches.PATCHES``."""

import importlib.metadata
import importlib.util
import inspect
import logging

import pytest

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
