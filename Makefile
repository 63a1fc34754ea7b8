# The two commands at the top of README.md: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test test-fast notebooks bench clean

# torch is pinned to the local CPU wheel first; the project then builds its
# extension against it (--no-build-isolation). Elsewhere bring your own torch.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -e ".[dev,examples]"

demo: install
	$(PYTHON) examples/demo.py

test: install
	$(PYTHON) -m pytest -q tests

test-fast:
	$(PYTHON) -m pytest -q -m "not slow and not notebooks" tests

notebooks: install
	$(PYTHON) -m pytest -q -m notebooks tests/test_notebooks.py

bench: install
	$(PYTHON) benchmarks/merge.py

clean:
	rm -rf build *.egg-info weightops/_C*.so
