# dmattn_ops: the two README commands are `make demo` and `make test`.
# Every target first runs tools/bootstrap.py, which creates or reuses .venv, installs what is missing and
# (re)builds the extension when it is stale; it returns in about a second when everything is in place.

PYTHON ?= python3
VENV_PY := .venv/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: bootstrap demo test bench info clean

bootstrap:
	@$(PYTHON) tools/bootstrap.py

demo: bootstrap  ## eager / torch.compile / torch.export on a decode batch, vs the reference and torch SDPA
	$(VENV_PY) tools/demo.py

test: bootstrap  ## the test suite (pytest.ini); extra arguments: make test PYTEST_ARGS="-k causal"
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

bench: bootstrap  ## CPU decode benchmark against torch SDPA; e.g. BENCH_ARGS="--json /tmp/cpu_decode.json"
	$(VENV_PY) tools/bench_cpu.py $(BENCH_ARGS)

info: bootstrap  ## what this build contains
	$(VENV_PY) -m dmattn_ops

clean:  ## build outputs only; .venv stays
	rm -rf build *.egg-info dmattn_ops/_C*.so dmattn_ops/_build_config.py
