# make compare : full FT vs LoRA vs QLoRA on the embedded default model, report in reports/default/ (SUITE=, ARGS=)
# make train : fine-tune the embedded default model (SmolLM2-135M-Instruct + LoRA; a CPU recipe when no GPU)
# make test  : the test suite (GPU tests run only where CUDA is available); make test-fast: the unit tests alone
VENV ?= .venv
PY := $(VENV)/bin/python
PICK_RECIPE := import torch; print("configs/smollm2_135m_lora" + ("" if torch.cuda.is_available() else "_cpu") + ".yaml")

.PHONY: install compare train test test-fast
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

compare: install
	$(PY) -m benchmarks.compare --suite $${SUITE:-default} $(ARGS)

train: install
	$(PY) -m ftcluster.train --config $${RECIPE:-$$($(PY) -c '$(PICK_RECIPE)')} $(ARGS)

test-fast: install
	$(PY) -m pytest tests/unit -p no:cacheprovider --timeout=600 --durations=5 $(ARGS)

test: test-fast
	$(PY) -m pytest tests/integration tests/gpu -p no:cacheprovider --timeout=1200 --durations=10 $(ARGS)
