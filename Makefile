# The two set-up commands of the README: `make run` (the main job on the bundled
# reference model) and `make test`. Both create or reuse the local virtual
# environment .venv and install the package with torch pinned (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adpdm-installed
# Serving (PyTriton) pins numpy<2, so its tests run in a second environment.
SERVE_VENV ?= .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.adpdm-installed

.PHONY: run test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[cpu,tools,test]'
	$(PY) -m pip list 2>/dev/null | grep -E '^torch ' 
	touch $(STAMP)

$(SERVE_STAMP): pyproject.toml constraints.txt
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(SERVE_VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[cpu,test,serve]'
	touch $(SERVE_STAMP)

run: $(STAMP)
	$(VENV)/bin/adpdm build-engine reference
	$(VENV)/bin/adpdm sample build/reference --n 16 --steps 50 --out build/reference/samples.png

test: $(STAMP) $(SERVE_STAMP)
	$(PY) -m pytest -q
	$(SERVE_VENV)/bin/python -m pytest -q tests/test_serving.py tests/test_serving_text.py tests/test_serving_sdxl.py tests/test_triton_repository.py

clean:
	rm -rf $(VENV) $(SERVE_VENV) build
