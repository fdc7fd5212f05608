# make compare : full FT vs LoRA vs QLoRA on the embedded default model, report in reports/default/ (SUITE=, ARGS=)
# make train : fine-tune the embedded default model (SmolLM2-135M-Instruct + LoRA; a CPU recipe when no GPU)
# make test  : the test suite (GPU tests run only where CUDA is available)
VENV ?= .venv
PY := $(VENV)/bin/python
PICK_RECIPE := import torch; print("configs/smollm2_135m_lora" + ("" if torch.cuda.is_available() else "_cpu") + ".yaml")

.PHONY: install compare train test
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

compare: install
	$(PY) -m benchmarks.compare --suite $${SUITE:-default} $(ARGS)

train: install
	$(PY) -m ftcluster.train --config $${RECIPE:-$$($(PY) -c '$(PICK_RECIPE)')} $(ARGS)

test: install
	$(PY) -m pytest tests -p no:cacheprovider --timeout=1200 --durations=10 $(ARGS)
