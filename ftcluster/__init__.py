"""ftcluster: fine-tune large language models on clusters (see README.md; the flow is in docs/design.md)."""

from ftcluster import patches as _patches

# Before anything imports bitsandbytes (PEFT does), which logs its notice at import, or Liger's registry.
_patches.quiet_bitsandbytes_cpu_notice()
_patches.quiet_liger_backend_discovery()
# Before anything imports DeepSpeed.
_patches.deepspeed_autotuner_without_mlflow()
# As torch's C++ extension builder and DeepSpeed's torch backend are imported.
_patches.on_import()
