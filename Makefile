# moe-ray: `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moe-ray-installed

.PHONY: demo test bench install browser clean wheel

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build of torch first: an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The one installable artifact: dist/moe_ray-<version>-py3-none-any.whl, what a cluster runs (installed on
# every node, or in the image of cluster/image/Dockerfile). Built from the sdist (also in dist/) with the
# venv's setuptools (no download).
wheel: $(STAMP)
	$(PY) -m build --no-isolation --outdir dist .

demo: $(STAMP)
	$(PY) -m moe_ray.demo --out demo

# The report's browser test (tests/test_plotting.py) renders index.html in Debian's headless chromium:
# installed here where missing (as root, with apt-get); the test fails, not skips, under make test without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "moe-ray: chromium is missing and cannot be installed here (needs root and apt-get)"; fi; }

# The multi-node tests (tests/test_multinode.py) put Ray nodes in network namespaces (`ip netns`,
# iproute2): installed here where missing; without it (or root) they are skipped, saying why.
netns:
	@command -v ip >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; \
	  else echo "moe-ray: iproute2 is missing and cannot be installed here: the multi-node tests will be skipped"; fi; }

test: $(STAMP) browser netns
	MOE_RAY_BROWSER_REQUIRED=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m benchmarks.bench_static
	PYTHONPATH=. $(PY) benchmarks/bench_reorder.py --sizes 1408,4096,8192 --scipy-max-n 8192
	PYTHONPATH=. $(PY) benchmarks/bench_reorder_store.py
	PYTHONPATH=. $(PY) benchmarks/bench_dynamic.py
	PYTHONPATH=. $(PY) benchmarks/bench_plot.py
	PYTHONPATH=. $(PY) benchmarks/bench_causal.py
	$(PY) -m benchmarks.bench_fullwidth --models olmoe,deepseek

clean:
	rm -rf $(VENV) demo .pytest_cache dist build
