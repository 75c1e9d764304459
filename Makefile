# moe-ray: `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moe-ray-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build of torch first: an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m moe_ray.demo --out demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m benchmarks.bench_static
	PYTHONPATH=. $(PY) benchmarks/bench_reorder.py --sizes 1408,4096,8192 --scipy-max-n 8192
	PYTHONPATH=. $(PY) benchmarks/bench_dynamic.py
	PYTHONPATH=. $(PY) benchmarks/bench_plot.py
	$(PY) -m benchmarks.bench_fullwidth --models olmoe,deepseek

clean:
	rm -rf $(VENV) demo .pytest_cache
