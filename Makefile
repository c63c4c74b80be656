# The two set-up commands of the README: `make run` (the main job on the bundled
# reference model) and `make test`. Both create or reuse the local virtual
# environment .venv and install the package with torch pinned (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adpdm-installed

.PHONY: run test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[cpu,tools,test]'
	$(PY) -m pip list 2>/dev/null | grep -E '^torch ' 
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/adpdm build-engine reference
	$(VENV)/bin/adpdm sample build/reference --n 16 --steps 50 --out build/reference/samples.png

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build
